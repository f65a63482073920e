"""The contract between the callbacks that contribute artifacts and the deploy stage that builds them.

A technique declares what it contributes (:class:`Contribution`); the deploy stage (``lightning_accel.deploy``)
builds every artifact from those declarations once per fit. Callbacks never call the stage: they subclass
:class:`DeployingCallback`, whose fit hooks do, and the stage registers itself here when ``lightning_accel.deploy``
is imported (``import lightning_accel`` does). The registry lets the techniques sit below the stage without
importing it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from torch import nn


@dataclass
class Contribution:
    """What one callback hands to the deploy stage. Every field is optional; set what the technique knows.

    Attributes:
        owner: The callback's name (for logs and the artifact records).
        channel_groups: The coupled channel groups that pruning zeroed (``pattern="channels"``, a
            ``ChannelGroups``): exports are slimmed.
        slim_path: Where the slim fp32 model goes (``.onnx`` or ``.pt2``).
        int8_model: Returns the prepared, calibrated int8 (fake-quant) model; called once, when the int8 export is
            built (PTQ calibrates a copy there).
        int8_path: Where the int8 ONNX model goes.
        check_inputs: Model inputs to check the int8 export on (validation batches, picked by the technique).
        on_mismatch: What an export that does not reproduce its model does: ``"warn"``, ``"raise"``, ``"ignore"``.
        precision: The training precision (``"bf16-mixed"``...), which chooses the half-precision dtype.
        half_path: Where the half-precision state dict goes.
        report_directory: The report's folder: every artifact is wanted, those nobody else placed go here.
        example: An example input to trace with when the module has no ``example_input_array`` (the report takes
            one from the first validation batch).
        pruned_parameters: The parameters pruning selected: the report's sparsity is over exactly these.
        classification: Whether the model's output is logits (the check then measures argmax agreement), as the
            technique's validation data shows; ``None``: judged from the output's shape.
        notes: Lines for the report (e.g. QAT's int8 quality at its start and at the end).
    """

    owner: str
    channel_groups: Any = None
    slim_path: str | Path | None = None
    int8_model: Callable[[], nn.Module] | None = None
    int8_path: str | Path | None = None
    check_inputs: list[Any] = field(default_factory=list)
    on_mismatch: str = "warn"
    precision: str | None = None
    half_path: str | Path | None = None
    report_directory: str | Path | None = None
    example: Any = None
    pruned_parameters: tuple[str, ...] = ()
    classification: bool | None = None
    notes: list[str] = field(default_factory=list)


class DeployingCallback(Callback):
    """Base of the callbacks that contribute artifacts: its fit hooks run the deploy stage, once per fit.

    Subclasses implement :meth:`deploy_contribution` and, where needed, :meth:`before_deploy` (end-of-fit work that
    the contribution depends on) and :meth:`dry_run_contribution` (a throwaway contribution to prove, before
    training, the exports where techniques meet). Overriding ``on_fit_start``/``on_fit_end`` must call ``super()``.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A new fit: its artifacts are built afresh at its end; the combined exports are proved once."""
        start_fit(self, trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build every artifact of this fit (the first caller builds, on rank 0; the others reuse the records)."""
        deploy_once(trainer, pl_module)

    def before_deploy(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """End-of-fit work the contribution needs; the stage calls it for every callback before asking any."""

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """What this callback contributes to the artifacts of the fit that ended; ``None``: nothing."""
        return None

    def dry_run_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """A throwaway contribution built from the untrained model, to prove the combined exports at fit start."""
        return None


@dataclass
class _Stage:
    """What ``lightning_accel.deploy`` registers: how to build a fit's artifacts and how to prove them early."""

    build: Callable[[Trainer, LightningModule], Any] | None = None
    dry_run: Callable[[Trainer, LightningModule], None] | None = None


_STAGE = _Stage()
_BUILT: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def register_stage(
    build: Callable[[Trainer, LightningModule], Any], dry_run: Callable[[Trainer, LightningModule], None]
) -> None:
    """Install the deploy stage (called by ``lightning_accel.deploy`` when it is imported)."""
    _STAGE.build, _STAGE.dry_run = build, dry_run


def start_fit(callback: DeployingCallback, trainer: Trainer, pl_module: LightningModule) -> None:
    """A new fit begins: the first deploying callback in the list forgets the last fit's artifacts and dry-runs.

    Every deploying callback gets ``on_fit_start``; the first of them in ``trainer.callbacks`` acts, so the stage
    runs once per fit whatever the list order.
    """
    first = next(c for c in trainer.callbacks if isinstance(c, DeployingCallback))
    if callback is not first:
        return
    _BUILT.pop(trainer, None)
    if _STAGE.dry_run is not None:
        _STAGE.dry_run(trainer, pl_module)


def deploy_once(trainer: Trainer, pl_module: LightningModule) -> Any:
    """The artifacts of this fit: built by the first caller on rank 0 (every callback's ``before_deploy`` first)."""
    if trainer in _BUILT:
        return _BUILT[trainer]
    for callback in trainer.callbacks:
        if isinstance(callback, DeployingCallback):
            callback.before_deploy(trainer, pl_module)
    if _STAGE.build is None:
        raise RuntimeError("the deploy stage is not installed: import lightning_accel (or lightning_accel.deploy)")
    deployment = _STAGE.build(trainer, pl_module)
    _BUILT[trainer] = deployment
    return deployment


def built_deployment(trainer: Trainer) -> Any:
    """The artifacts already built for this trainer's last fit, or ``None``."""
    return _BUILT.get(trainer)

"""What ``QuantizationAwareTraining`` does for group-wise weights (``weight_bits=4``): the int4 QAT driver.

The callback keeps its name, its YAML section and its step options; with group-wise weights it hands every hook to
this driver, which trains the rounded weights (:mod:`groupwise_qat`) from ``start_step`` on, evaluates as deployed,
and hands the deploy stage the ``MatMulNBits`` copy. There are no activation ranges to observe or reduce, so DDP
ranks agree by construction (identical weights round identically), and the state is a few plain values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.inputs import batch_picker, example_input
from lightning_accel._core.lightning import TrainingSteps, configure_model_early, validation_loader
from lightning_accel._core.stage import Contribution
from lightning_accel._core.validation import check_state_version
from lightning_accel.quantization.budget import BudgetResult
from lightning_accel.quantization.budget_int4 import BudgetData, weight_only_within_budget
from lightning_accel.quantization.calibration import check_batches
from lightning_accel.quantization.groupwise_qat import (
    group_qat_layers,
    group_qat_to_deployable,
    prepare_group_qat_,
    set_group_qat_active,
    strip_group_qat,
)
from lightning_accel.quantization.phases import resolve_qat_steps
from lightning_accel.quantization.progress import ProbeRecipe, end_probe, start_probe
from lightning_accel.quantization.settings import QAT_STATE_VERSION, require_example_input
from lightning_accel.quantization.weight_only import (
    WeightOnlySettings,
    describe_format,
    dry_run_weight_only,
    weight_only_settings,
)

#: How many leading arguments of a hook the driver takes (the rest, batch and outputs, it does not need).
_DRIVER_ARGUMENTS = {"setup": 3, "on_train_batch_start": 3, "state_dict": 0, "load_state_dict": 1}


def hands_over_to_weight_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """With group-wise weights (``weight_bits=4``) the driver's hook of the same name runs instead."""
    signature = inspect.signature(hook)

    @functools.wraps(hook)
    def choose(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.weight_only is None:
            return hook(self, *args, **kwargs)
        arguments = list(signature.bind(self, *args, **kwargs).arguments.values())[1:]  # Lightning passes keywords
        return getattr(self.weight_only, hook.__name__)(*arguments[: _DRIVER_ARGUMENTS.get(hook.__name__, 2)])

    return choose


def weight_only_driver(
    weight_bits: Any, activations: Any, embeddings: Any, group_size: Any, symmetric: Any, include: Any, exclude: Any
) -> GroupQATDriver | None:
    """The driver when QAT's arguments ask for group-wise weights (``weight_bits=4``), else ``None``."""
    if weight_bits != 4:
        return None
    settings = weight_only_settings(
        weight_bits, activations, embeddings, group_size, "rtn", symmetric, include, exclude
    )
    return GroupQATDriver(settings) if settings is not None else None


class GroupQATDriver:
    """Int4 (or int8) weight-only QAT under the ``QuantizationAwareTraining`` callback.

    Args:
        settings: Bits, group size, symmetry and selection.
    """

    def __init__(self, settings: WeightOnlySettings) -> None:
        self.settings = settings
        self.start_step: int | float = 0
        self.export_path: str | None = None
        self.model_input: Any = None
        self.on_mismatch = "warn"
        self.resolved_export_path: str | None = None
        self.started = False  # whether the rounding has been on (restored from checkpoints)
        self._start: int | None = 0
        self._training_steps = TrainingSteps()
        self._model: LightningModule | None = None
        self._layers: list[Any] = []  # the prepared layers (set at setup)
        self._active: bool | None = None  # the rounding switch last applied to them
        #: The quantized model's score when the rounding started (round to nearest of those weights) and at the
        #: end of fit: perplexity for a causal LM (see :mod:`progress`); ``{}`` when it could not be measured.
        self.at_start: dict[str, Any] | None = None
        self.at_end: dict[str, Any] | None = None
        self._probe: Any = None
        self.max_quality_loss: float | None = None
        #: What the quality budget held back at the end of fit, with the measured figures.
        self.budget: BudgetResult | None = None

    def configure(
        self,
        start_step: int | float,
        export_path: str | None,
        model_input: Any,
        on_mismatch: str,
        max_quality_loss: float | None = None,
    ) -> None:
        """The callback's validated options: where rounding starts, the export, its input, its check, the budget."""
        self.start_step, self.export_path = start_step, export_path
        self.model_input, self.on_mismatch = model_input, on_mismatch
        self.max_quality_loss = max_quality_loss
        self._start = start_step if isinstance(start_step, int) else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Prepare the layers (once), and before fitting dry-run the export."""
        configure_model_early(trainer, pl_module)
        layers = prepare_group_qat_(pl_module, self.settings)
        self._model = pl_module
        self._layers = list(layers.values())
        self._set_active(self.started)
        if self.export_path is not None and stage == "fit":
            require_example_input(pl_module, "QuantizationAwareTraining")
            self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
            probe_writable("QuantizationAwareTraining", "export_path", self.resolved_export_path)
            example = example_input(pl_module)
            name = "QuantizationAwareTraining"
            dry_run_weight_only(pl_module, self.settings, example, name, deployable=group_qat_to_deployable)
        rank_zero_info(
            f"QuantizationAwareTraining ({stage}): {len(layers)} layers train quantized "
            f"({describe_weight_only_settings(self.settings)}); other layers stay float"
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve a fractional ``start_step`` against this fit's length."""
        self._start = resolve_qat_steps(trainer.estimated_stepping_batches, self.start_step, None, None)[0]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Round from ``start_step`` on; when the rounding starts, score round-to-nearest of these weights."""
        active = self._training_steps.current(trainer, pl_module) >= self._start
        if active and self.at_start is None:
            self._probe_start(trainer, pl_module, batch)
        self.started = self.started or active
        self._set_active(active)

    def _probe_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if trainer.is_global_zero:
            # Round to nearest of the current weights: what the rounding starts from (no calibration data needed).
            recipe = ProbeRecipe(
                lambda plain, _: self.settings.quantize(plain), strip_group_qat, f"int{self.settings.bits}"
            )
            self._probe = start_probe(trainer, pl_module, self.model_input, recipe, [batch])
            self.at_start = {"metric": self._probe.metric, "value": self._probe.start} if self._probe else {}
        # Every rank keeps rank 0's figures: the callback's state must not differ between ranks.
        self.at_start = trainer.strategy.broadcast(self.at_start, src=0)

    def before_deploy(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the deployable copy at the end of fit against the start (the stage calls this before any build)."""
        if trainer.is_global_zero and self._probe is not None and self.started:
            self.at_end = end_probe(self._probe, group_qat_to_deployable(pl_module).eval()) or self.at_end

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count the batch; log whether the rounding is on."""
        self._training_steps.batch_done(pl_module)
        if not trainer.global_step % trainer.log_every_n_steps:  # logging costs more than the step's bookkeeping
            pl_module.log("qat/phase", float(self.started), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score as deployed: rounded once QAT has started (in this fit, or in the restored checkpoint)."""
        if trainer.state.fn == "fit" and self._start is not None:
            self._set_active(self._training_steps.current(trainer, pl_module) >= self._start)
        else:
            self._set_active(self.started)

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """The ``MatMulNBits`` copy of the trained weights, where it goes and what it is checked on."""
        path = self.resolved_export_path
        if path is not None and trainer.fast_dev_run:
            rank_zero_warn(f"QuantizationAwareTraining: fast_dev_run, so the export to {path} is skipped")
            path = None
        if not self.started:
            if path is not None:
                rank_zero_warn(
                    f"QuantizationAwareTraining: training ended before start_step {self._start}: there is no "
                    f"int{self.settings.bits} model, nothing was written to {path}"
                )
            return None
        notes = [f"QAT: {self._probe.describe()}."] if self._probe is not None and self._probe.end is not None else []
        return Contribution(
            owner="QuantizationAwareTraining",
            notes=notes,
            int8_model=lambda: self._deployable(trainer, pl_module, notes),
            int8_path=path,
            check_inputs=check_batches(trainer, pl_module, batch_picker(self.model_input, pl_module)),
            on_mismatch=self.on_mismatch,
        )

    def _deployable(self, trainer: Trainer, pl_module: LightningModule, notes: list[str]) -> Any:
        """The trained weights rounded as trained; with a budget, the most sensitive layers held back first.

        The budget scores, on validation batches (else training batches), each trained layer rounded alone, then
        steps the costliest back to 8-bit groups and float until the whole model is within it (round to nearest
        of the trained weights: what training rounded to).
        """
        if self.max_quality_loss is None:
            return group_qat_to_deployable(pl_module)
        trained = dataclasses.replace(self.settings, include=tuple(group_qat_layers(pl_module)), exclude=None)
        batches = validation_loader(trainer) or trainer.train_dataloader
        data = BudgetData(None, batches, self.model_input, owner="QuantizationAwareTraining")
        model, self.budget = weight_only_within_budget(strip_group_qat(pl_module), trained, data, self.max_quality_loss)
        notes.append(f"QAT: {self.budget.describe()}.")
        return model

    def dry_run_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """The deployable copy of the current weights, for the stage's combined dry run at fit start."""
        if self.export_path is None or trainer.fast_dev_run:
            return None
        return Contribution(owner="QuantizationAwareTraining", int8_model=lambda: group_qat_to_deployable(pl_module))

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the settings, whether QAT started, and the batch count."""
        settings = dataclasses.asdict(self.settings)
        for name in ("include", "exclude"):
            settings[name] = list(settings[name]) if settings[name] is not None else None
        return {
            "version": QAT_STATE_VERSION,
            "weight_only": settings,
            "quantized": self.started,
            "training_batches": self._training_steps.batches,
            "at_start": self.at_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; refuse a checkpoint trained with other group settings (or with int8 quantizers)."""
        check_state_version("QuantizationAwareTraining", state, QAT_STATE_VERSION)
        saved = state.get("weight_only")
        if saved is None:
            raise ValueError(
                "The checkpoint's QuantizationAwareTraining state holds int8 quantizers; this callback trains "
                f"{describe_weight_only_settings(self.settings)}. Set weight_bits to the checkpoint's to "
                "continue"
            )
        mine = self.state_dict()["weight_only"]
        differences = [f"{k}={saved[k]!r}" for k in mine if k in saved and saved[k] != mine[k]]
        if differences:
            raise ValueError(
                f"The checkpoint's QuantizationAwareTraining weights were trained with {', '.join(differences)}, which "
                f"this callback sets otherwise: set {', '.join(differences)} to continue from it"
            )
        self.started = bool(state.get("quantized", False))
        self.at_start = state.get("at_start", self.at_start)
        self._training_steps.batches = int(state.get("training_batches", 0))
        self._set_active(self.started)

    def _set_active(self, active: bool) -> None:
        """Switch the prepared layers only when the phase changes: walking them every step would cost real time."""
        if active != self._active:
            set_group_qat_active(self._layers, active)
            self._active = active


def describe_weight_only_settings(settings: WeightOnlySettings) -> str:
    """``"int4 groups of 32, symmetric"``."""
    return describe_format(settings.bits, settings.group_size, settings.symmetric, settings.activations)

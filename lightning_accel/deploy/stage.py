"""The deploy stage: every artifact of a trained model, built once, in one place.

The techniques *declare* what they contribute (:class:`Contribution`: channel groups, a quantized model, a
precision, the paths a user asked for); this module *builds* every artifact from those declarations, once per fit
on rank 0, whatever the callback order, and hands the records (:class:`Artifact`) to whoever reads them: the
callbacks' logs, the :class:`~lightning_accel.AccelerationReport` and ``lightning-accel export``, which measure
them and never build anything themselves.

A callback takes part by having a method ``deploy_contribution(trainer, pl_module) -> Contribution | None``.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_accel._core.files import atomic_write_bytes
from lightning_accel.deploy.check import ExportCheck
from lightning_accel.deploy.half import half_dtype, save_half, state_dict_bytes
from lightning_accel.deploy.int8 import as_evaluated
from lightning_accel.deploy.onnx import export_onnx, export_onnx_checked
from lightning_accel.deploy.slim import slim_checked, write_slim
from lightning_accel.deploy.sparse import save_sparse
from lightning_accel.pruning.groups import ChannelGroups, trainer_channel_groups
from lightning_accel.quantization.prepare import float_copy


@dataclass(frozen=True)
class Artifact:
    """One file the deploy stage wrote.

    Attributes:
        kind: What it is: ``"fp32 state dict"``, ``"bf16 state dict"``, ``"sparse int8"``, ``"fp32 ONNX"``,
            ``"slim fp32 ONNX"``, ``"slim .pt2"``, ``"int8 ONNX"``.
        path: Where it is.
        bytes: Its size on disk.
        runs_with: How to run or load it.
        checked_against: What its outputs were compared with, and the figures; ``None`` when not checked.
        requested_by: The callbacks that asked for it (the report included).
        check: The comparison's figures, where one ran in ONNX Runtime.
    """

    kind: str
    path: Path
    bytes: int
    runs_with: str
    checked_against: str | None
    requested_by: tuple[str, ...]
    check: ExportCheck | None = None


@dataclass
class Contribution:
    """What one callback hands to the deploy stage. Every field is optional; set what the technique knows.

    Attributes:
        owner: The callback's name (for logs and the artifact records).
        channel_groups: The coupled channel groups that pruning zeroed (``pattern="channels"``): exports are slimmed.
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
    channel_groups: ChannelGroups | None = None
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


@dataclass
class Deployment:
    """Everything the deploy stage built for one model.

    Attributes:
        artifacts: The files, by kind, in the order they were written.
        float_model: The float copy (eval mode, CPU) every float artifact came from.
        evaluated_int8: The int8 model as evaluated (fake quantization in eval mode), slimmed when the exports
            were; ``None`` without quantization.
        slim_model: The slim float model, with channel pruning.
        example: The example input the exports were traced with (``None``: no ONNX or latency).
        precision: The training precision.
        pruned_parameters: The parameters pruning selected (empty without pruning).
        notes: What was skipped, and why.
    """

    artifacts: dict[str, Artifact] = field(default_factory=dict)
    float_model: nn.Module | None = None
    evaluated_int8: nn.Module | None = None
    slim_model: nn.Module | None = None
    example: Any = None
    precision: str = "32-true"
    pruned_parameters: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def _merged_groups(contributions: Sequence[Contribution]) -> ChannelGroups | None:
    groups = [group for c in contributions if c.channel_groups is not None for group in c.channel_groups.groups]
    return ChannelGroups(groups) if groups else None


def _have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Builder:
    """Writes each artifact once and records it."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def record(self, kind: str, path: Path, runs_with: str, requested_by: Sequence[str], check: Any = None) -> None:
        checked = None
        if isinstance(check, ExportCheck):
            checked = f"the evaluated model in ONNX Runtime: {check}"
        elif isinstance(check, str):
            checked = check
        self.deployment.artifacts[kind] = Artifact(
            kind=kind,
            path=Path(path),
            bytes=Path(path).stat().st_size,
            runs_with=runs_with,
            checked_against=checked,
            requested_by=tuple(requested_by),
            check=check if isinstance(check, ExportCheck) else None,
        )


def build_artifacts(
    pl_module: nn.Module,
    contributions: Sequence[Contribution],
    example: Any = None,
    precision: str = "32-true",
) -> Deployment:
    """Build every artifact that ``contributions`` ask for, each once, and return their records.

    The artifacts a callback asked for by path are written there; a report (``report_directory``) wants every
    artifact, and those nobody else placed go into its folder. Errors in what a callback asked for propagate (its
    ``on_mismatch`` decides for a failed check); the report's own extras never fail the run: they become notes.

    Args:
        pl_module: The trained model (plain, or prepared by QAT).
        contributions: What each technique contributes (see :class:`Contribution`).
        example: The example input to trace with (``example_input_array``); ``None``: no ONNX files.
        precision: The training precision, unless a contribution names it.
    """
    precision = next((c.precision for c in contributions if c.precision), precision)
    if example is None:
        example = next((c.example for c in contributions if c.example is not None), None)
    pruned = tuple(name for c in contributions for name in c.pruned_parameters)
    deployment = Deployment(example=example, precision=precision, pruned_parameters=pruned)
    deployment.notes.extend(note for c in contributions for note in c.notes)
    builder = _Builder(deployment)
    report = next((c for c in contributions if c.report_directory is not None), None)
    report_dir = Path(report.report_directory) if report is not None else None
    groups = _merged_groups(contributions)
    float_model = float_copy(pl_module).eval().cpu().float()  # every artifact starts from fp32 (bf16-true too)
    deployment.float_model = float_model

    # Half precision: where MixedPrecision asked for it, else in the report's folder.
    dtype = half_dtype(precision)
    half = [c for c in contributions if c.half_path is not None]
    if half or report_dir is not None:
        short = "fp16" if dtype is torch.float16 else "bf16"
        path = save_half(float_model, Path(half[0].half_path) if half else report_dir / f"model.{short}.pt", dtype)
        owners = [c.owner for c in half] + ([report.owner] if report else [])
        builder.record(f"{_dtype_name(dtype)} state dict", path, "model.load_state_dict(torch.load(path))", owners)
        if half:
            rank_zero_info(f"{half[0].owner}: wrote the {dtype} state dict to {path} ({path.stat().st_size:,} bytes)")

    if report_dir is not None:
        path = atomic_write_bytes(report_dir / "model.fp32.pt", state_dict_bytes(float_model))
        builder.record("fp32 state dict", path, "model.load_state_dict(torch.load(path))", [report.owner])
        path = save_sparse(float_model, report_dir / "model.sparse.npz.xz")
        builder.record("sparse int8", path, "lightning_accel.load_sparse_(model, path)", [report.owner])

    have_ort = _have_onnxruntime()
    if report_dir is not None and not have_ort:  # the report's own ONNX files would go unchecked and unmeasured
        report_dir = None
    if example is None:
        if report is not None:
            deployment.notes.append(
                "No example input (set `example_input_array` on the module, or give validation data): no ONNX "
                "export and no latency."
            )
        return deployment
    if report is not None and not have_ort:
        deployment.notes.append(
            "onnxruntime is not installed (extra `onnx`): no ONNX files, ONNX Runtime latency or quality."
        )
    if report_dir is not None:
        path = export_onnx(float_model, report_dir / "model.fp32.onnx", example, on_mismatch="warn")
        builder.record("fp32 ONNX", path, "onnxruntime.InferenceSession(path)", [report.owner], "the float model")

    # Slim: channel pruning removes the zeroed channels for real; the slim model must compute the masked one.
    slim_wanted = [c for c in contributions if c.slim_path is not None]
    if groups is not None and (slim_wanted or report_dir is not None):
        small = slim_checked(float_model, example, groups)
        deployment.slim_model = small
        paths = [Path(c.slim_path) for c in slim_wanted]
        if report_dir is not None and not any(p.suffix == ".onnx" for p in paths):
            paths.append(report_dir / "model.slim.onnx")
        owners = [c.owner for c in slim_wanted] + ([report.owner] if report else [])
        for path in paths:
            write_slim(small, path, example)
            if path.suffix == ".pt2":
                builder.record("slim .pt2", path, "torch.export.load(path).module()", owners, "the slim model")
            else:
                builder.record("slim fp32 ONNX", path, "onnxruntime.InferenceSession(path)", owners, "the slim model")
        before = sum(p.numel() for p in float_model.parameters())
        after = sum(p.numel() for p in small.parameters())
        rank_zero_info(f"Deploy: the slim model has {after:,} parameters, {after / before:.1%} of {before:,}")

    # Int8: the model QAT trained or PTQ calibrated, slimmed like the float exports, checked against itself evaluated.
    quantizers = [c for c in contributions if c.int8_model is not None]
    for index, source in enumerate(quantizers):
        for_report = index == 0 and report_dir is not None  # the report measures the first int8 model
        if source.int8_path is None and not for_report:
            continue
        model = source.int8_model()
        if groups is not None:
            model = slim_checked(model, example, groups)
        if index == 0:
            deployment.evaluated_int8 = as_evaluated(model)
        path = Path(source.int8_path) if source.int8_path else report_dir / "model.int8.onnx"
        written, check = export_onnx_checked(
            model,
            path,
            example,
            check_inputs=source.check_inputs,
            on_mismatch=source.on_mismatch,
            classification=source.classification,
        )
        owners = [source.owner] + ([report.owner] if for_report else [])
        kind = "int8 ONNX" if index == 0 else f"int8 ONNX ({source.owner})"
        builder.record(kind, written, "onnxruntime.InferenceSession(path)", owners, check)
        slimmed = ", slimmed" if groups is not None else ""
        rank_zero_info(
            f"{source.owner}: wrote the int8 ONNX model{slimmed} to {written} ({written.stat().st_size:,} bytes)"
        )
    if report is not None and not quantizers:
        deployment.notes.append("The model is not quantized (no QAT/PTQ state): no int8 rows.")
    return deployment


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# --- once per fit, for the callbacks in a Trainer ----------------------------------------------------------------

_DEPLOYED: weakref.WeakKeyDictionary[Any, Deployment] = weakref.WeakKeyDictionary()


def contributions_of(callbacks: Sequence[Any], trainer: Any, pl_module: nn.Module) -> list[Contribution]:
    """Ask every callback that takes part (it has ``deploy_contribution``) what it contributes."""
    contributions = []
    for callback in callbacks:
        ask = getattr(callback, "deploy_contribution", None)
        contribution = ask(trainer, pl_module) if callable(ask) else None
        if contribution is not None:
            contributions.append(contribution)
    return contributions


def forget_deployment(trainer: Any) -> None:
    """Start a new fit: the next :func:`deploy_for_trainer` builds afresh (the callbacks call it at fit start)."""
    _DEPLOYED.pop(trainer, None)


def deploy_for_trainer(trainer: Any, pl_module: nn.Module) -> Deployment | None:
    """Build the artifacts of this fit once (rank 0), from every callback's contribution; later calls reuse them.

    Every lightning_accel callback calls this at the end of fit, so the first one to get there builds, whatever
    the list order, and the others (the report included) read the same records. Other ranks get ``None``.
    """
    if not trainer.is_global_zero:
        return None
    if trainer in _DEPLOYED:
        return _DEPLOYED[trainer]
    contributions = contributions_of(trainer.callbacks, trainer, pl_module)  # each warns of what it skips
    if trainer.fast_dev_run:
        deployment = Deployment(notes=["fast_dev_run: no artifact was built"])
    else:
        example = getattr(pl_module, "example_input_array", None)
        example = tuple(example) if isinstance(example, list) else example
        deployment = build_artifacts(pl_module, contributions, example, precision=str(trainer.precision))
    _DEPLOYED[trainer] = deployment
    return deployment


def dry_run_for_trainer(trainer: Any, pl_module: nn.Module, probe: Contribution) -> None:
    """Build the exports that combine techniques (slimmed int8) from a throwaway probe, before training.

    Each callback dry-runs its own export at setup; only at fit start, once every setup has run, is it known
    whether another technique changes that export (channel pruning slims the int8 model). ``probe`` is the
    quantization callback's contribution with ``int8_model`` building a copy calibrated on the example input.
    """
    # Only the channel groups matter here; the contributions themselves describe the trained model, at fit end.
    groups = trainer_channel_groups(trainer.callbacks)
    example = getattr(pl_module, "example_input_array", None)
    if groups is None or example is None or not trainer.is_global_zero:
        return
    try:
        model = slim_checked(probe.int8_model(), example, groups)
        with tempfile.TemporaryDirectory() as directory:
            export_onnx(model, Path(directory) / "dry_run.onnx", example, on_mismatch="ignore")
    except Exception as error:
        raise RuntimeError(
            f"{probe.owner}: the slimmed int8 export of {type(pl_module).__name__} fails on its example_input_array, "
            f"so it would fail at the end of fit. Checked before training: {type(error).__name__}: {error}"
        ) from error

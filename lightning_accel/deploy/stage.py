"""The deploy stage: every artifact of a trained model, built once, in one place.

The techniques *declare* what they contribute (:class:`Contribution`: channel groups, a quantized model, a
precision, the paths a user asked for); this module *builds* every artifact from those declarations, once per fit
on rank 0, whatever the callback order, and hands the records (:class:`Artifact`) to whoever reads them: the
callbacks' logs, the :class:`~lightning_accel.AccelerationReport` and ``lightning-accel export``, which measure
them and never build anything themselves.

A callback takes part by subclassing :class:`~lightning_accel._core.stage.DeployingCallback`, whose fit hooks run
this stage (installed by :func:`install`) once per fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_accel._core.files import atomic_write_bytes
from lightning_accel._core.inputs import example_input
from lightning_accel._core.stage import Contribution, DeployingCallback, register_stage
from lightning_accel.deploy.compose import dry_run_combined_exports, slim_evaluated
from lightning_accel.export.check import ExportCheck
from lightning_accel.export.half import half_dtype, save_half, state_dict_bytes
from lightning_accel.export.sparse import save_sparse
from lightning_accel.pruning.groups import ChannelGroups
from lightning_accel.pruning.slim import slim_checked, write_slim
from lightning_accel.quantization.convert import as_evaluated
from lightning_accel.quantization.export import export_onnx, export_onnx_checked
from lightning_accel.quantization.prepare import float_copy
from lightning_accel.quantization.weight_only import export_weight_only_onnx, group_quantized_layers


@dataclass(frozen=True)
class Artifact:
    """One file the deploy stage wrote.

    Attributes:
        kind: What it is: ``"fp32 state dict"``, ``"bf16 state dict"``, ``"sparse int8"``, ``"fp32 ONNX"``,
            ``"slim fp32 ONNX"``, ``"slim .pt2"``, ``"int8 ONNX"``, ``"int4 ONNX"`` (weight-only groups).
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


@dataclass
class _Request:
    """Everything the contributions ask for, merged: what each artifact builder reads."""

    contributions: Sequence[Contribution]
    deployment: Deployment
    builder: _Builder
    float_model: nn.Module
    example: Any
    report: Contribution | None
    report_dir: Path | None
    groups: ChannelGroups | None
    have_ort: bool

    def owners(self, requesting: Sequence[Contribution], for_report: bool = True) -> list[str]:
        """The callbacks an artifact is for: those that asked by path, and the report when it wants it too."""
        return [c.owner for c in requesting] + ([self.report.owner] if for_report and self.report else [])


def _build_half(request: _Request) -> None:
    """Half precision: where MixedPrecision asked for it, else in the report's folder."""
    dtype = half_dtype(request.deployment.precision)
    half = [c for c in request.contributions if c.half_path is not None]
    if not half and request.report_dir is None:
        return
    short = "fp16" if dtype is torch.float16 else "bf16"
    path = Path(half[0].half_path) if half else request.report_dir / f"model.{short}.pt"
    path = save_half(request.float_model, path, dtype)
    kind = f"{_dtype_name(dtype)} state dict"
    request.builder.record(kind, path, "model.load_state_dict(torch.load(path))", request.owners(half))
    if half:
        rank_zero_info(f"{half[0].owner}: wrote the {dtype} state dict to {path} ({path.stat().st_size:,} bytes)")


def _build_report_state_dicts(request: _Request) -> None:
    """The report's fp32 state dict and compressed sparse file (its baseline and its sparse artifact)."""
    if request.report_dir is None:
        return
    owners = request.owners([])
    path = atomic_write_bytes(request.report_dir / "model.fp32.pt", state_dict_bytes(request.float_model))
    request.builder.record("fp32 state dict", path, "model.load_state_dict(torch.load(path))", owners)
    path = save_sparse(request.float_model, request.report_dir / "model.sparse.npz.xz")
    request.builder.record("sparse int8", path, "lightning_accel.load_sparse_(model, path)", owners)


def _build_float_onnx(request: _Request) -> None:
    """The report's fp32 ONNX file (its latency baseline)."""
    if request.report_dir is None or request.example is None or not request.have_ort:
        return
    path = export_onnx(request.float_model, request.report_dir / "model.fp32.onnx", request.example, on_mismatch="warn")
    request.builder.record(
        "fp32 ONNX", path, "onnxruntime.InferenceSession(path)", request.owners([]), "the float model"
    )


def _build_slim(request: _Request) -> None:
    """Channel pruning removes the zeroed channels for real; the slim model must compute the masked one."""
    wanted = [c for c in request.contributions if c.slim_path is not None]
    report_dir = request.report_dir if request.have_ort else None
    if request.groups is None or request.example is None or not (wanted or report_dir is not None):
        return
    small = slim_checked(request.float_model, request.example, request.groups)
    request.deployment.slim_model = small
    paths = [Path(c.slim_path) for c in wanted]
    if report_dir is not None and not any(p.suffix == ".onnx" for p in paths):
        paths.append(report_dir / "model.slim.onnx")
    owners = request.owners(wanted)
    for path in paths:
        write_slim(small, path, request.example)
        if path.suffix == ".pt2":
            request.builder.record("slim .pt2", path, "torch.export.load(path).module()", owners, "the slim model")
        else:
            runs_with = "onnxruntime.InferenceSession(path)"
            request.builder.record("slim fp32 ONNX", path, runs_with, owners, "the slim model")
    before = sum(p.numel() for p in request.float_model.parameters())
    after = sum(p.numel() for p in small.parameters())
    rank_zero_info(f"Deploy: the slim model has {after:,} parameters, {after / before:.1%} of {before:,}")


def _build_int8(request: _Request) -> None:
    """The model QAT trained or PTQ calibrated, slimmed like the float exports, checked against itself evaluated."""
    if request.example is None:
        return
    report_dir = request.report_dir if request.have_ort else None
    quantizers = [c for c in request.contributions if c.int8_model is not None]
    for index, source in enumerate(quantizers):
        for_report = index == 0 and report_dir is not None  # the report measures the first int8 model
        if source.int8_path is None and not for_report:
            continue
        model = source.int8_model()
        if request.groups is not None:
            model = slim_evaluated(model, request.example, request.groups)
        if index == 0:
            request.deployment.evaluated_int8 = as_evaluated(model)
        written, check, name = _export_quantized(model, source, request, report_dir)
        kind = f"{name} ONNX" if index == 0 else f"{name} ONNX ({source.owner})"
        runs_with = "onnxruntime.InferenceSession(path)"
        request.builder.record(kind, written, runs_with, request.owners([source], for_report), check)
        slimmed = ", slimmed" if request.groups is not None else ""
        rank_zero_info(
            f"{source.owner}: wrote the {name} ONNX model{slimmed} to {written} ({written.stat().st_size:,} bytes)"
        )


def _export_quantized(
    model: nn.Module, source: Contribution, request: _Request, report_dir: Path | None
) -> tuple[Path, Any, str]:
    """Write one quantized model: ``MatMulNBits`` for weight-only groups, QDQ int8 otherwise; its kind's name."""
    arguments = dict(check_inputs=source.check_inputs, on_mismatch=source.on_mismatch)
    layers = group_quantized_layers(model)
    if layers:
        name = f"int{max(layer.bits for layer in layers.values())}"
        path = Path(source.int8_path) if source.int8_path else report_dir / f"model.{name}.onnx"
        classification = source.classification is not False  # int4 is for language models: token agreement
        return (
            *export_weight_only_onnx(model, path, request.example, classification=classification, **arguments),
            name,
        )
    path = Path(source.int8_path) if source.int8_path else report_dir / "model.int8.onnx"
    written, check = export_onnx_checked(
        model, path, request.example, classification=source.classification, **arguments
    )
    return written, check, "int8"


#: One builder per artifact kind, in the order the files are written (and listed).
BUILDERS = (_build_half, _build_report_state_dicts, _build_float_onnx, _build_slim, _build_int8)


def _report_notes(request: _Request) -> list[str]:
    """What the report cannot show, and why."""
    if request.report is None:
        return []
    if request.example is None:
        return [
            "No example input (set `example_input_array` on the module, or give validation data): no ONNX export "
            "and no latency."
        ]
    notes = []
    if not request.have_ort:
        notes.append("onnxruntime is not installed (extra `onnx`): no ONNX files, ONNX Runtime latency or quality.")
    if not any(c.int8_model is not None for c in request.contributions):
        notes.append("The model is not quantized (no QAT/PTQ state): no int8 rows.")
    return notes


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
    Each kind of artifact has its builder (:data:`BUILDERS`); this only merges the requests and runs them.

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
    report = next((c for c in contributions if c.report_directory is not None), None)
    # Every artifact starts from fp32 (bf16-true too).
    deployment.float_model = float_copy(pl_module).eval().cpu().float()
    request = _Request(
        contributions=contributions,
        deployment=deployment,
        builder=_Builder(deployment),
        float_model=deployment.float_model,
        example=example,
        report=report,
        report_dir=Path(report.report_directory) if report is not None else None,
        groups=_merged_groups(contributions),
        have_ort=_have_onnxruntime(),
    )
    for build in BUILDERS:
        build(request)
    # After the builds: a contribution may note what building its model decided (PTQ's quality budget).
    deployment.notes.extend(note for c in contributions for note in c.notes)
    deployment.notes.extend(_report_notes(request))
    return deployment


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# --- once per fit, for the callbacks in a Trainer ----------------------------------------------------------------


def contributions_of(callbacks: Sequence[Any], trainer: Any, pl_module: nn.Module) -> list[Contribution]:
    """Ask every deploying callback what it contributes."""
    contributions = []
    for callback in callbacks:
        if isinstance(callback, DeployingCallback):
            contribution = callback.deploy_contribution(trainer, pl_module)
            if contribution is not None:
                contributions.append(contribution)
    return contributions


def deploy_for_trainer(trainer: Any, pl_module: nn.Module) -> Deployment | None:
    """Build the artifacts of this fit (rank 0), from every callback's contribution; other ranks get ``None``.

    Called once per fit by :func:`~lightning_accel._core.stage.deploy_once` (the deploying callbacks' fit end),
    after every callback's ``before_deploy``, so no contribution depends on which callback got there first.
    """
    if not trainer.is_global_zero:
        return None
    contributions = contributions_of(trainer.callbacks, trainer, pl_module)  # each warns of what it skips
    if trainer.fast_dev_run:
        return Deployment(notes=["fast_dev_run: no artifact was built"])
    example = example_input(pl_module)
    return build_artifacts(pl_module, contributions, example, precision=str(trainer.precision))


def install() -> None:
    """Make the deploying callbacks' fit hooks run this stage (done when ``lightning_accel.deploy`` is imported)."""
    register_stage(deploy_for_trainer, dry_run_combined_exports)

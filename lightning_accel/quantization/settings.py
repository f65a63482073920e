"""The settings QAT and PTQ share: validation in the constructors, and the export dry run at setup."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_accel._core.inputs import batch_labels, batch_picker, example_input, run_model
from lightning_accel._core.modules import module_copy
from lightning_accel._core.stage import Contribution
from lightning_accel._core.validation import ON_MISMATCH_CHOICES, validate_bool, validate_patterns
from lightning_accel.quantization.calibration import calibrate_, first_batch
from lightning_accel.quantization.dynamic import DEFAULT_ACTIVATIONS, validate_activations
from lightning_accel.quantization.embeddings import DEFAULT_EMBEDDINGS, validate_embeddings
from lightning_accel.quantization.export import export_onnx
from lightning_accel.quantization.fake_quant import DEFAULT_WEIGHT_BITS
from lightning_accel.quantization.prepare import DEFAULT_OUTPUTS, validate_outputs, validate_weight_bits

#: The format of ``QuantizationAwareTraining``'s state; 3: the preparation settings saved whole. Older
#: pre-release states are refused in one line rather than guessed.
QAT_STATE_VERSION = 3

FULL_RANGE_NOTE = (
    "weight_bits=8 uses the full int8 range. ONNX Runtime computes it exactly only where int8 dot products "
    "accumulate in int32 (x86 with VNNI or AMX, ARM, TensorRT). On x86 without VNNI (AVX2, AVX-512F) its U8S8 "
    "kernels saturate pairs of products to int16 unless the session sets `session.x64quantprecision=1` "
    "(measured about 30% slower at batch 32). weight_bits=7, the default, is exact on every CPU."
)


def check_export_path(export_path: Any) -> str | None:
    """Validate an export path given to a constructor; return it as a string."""
    if export_path is None:
        return None
    if not isinstance(export_path, str | os.PathLike) or not os.fspath(export_path).endswith(".onnx"):
        raise ValueError(f"`export_path` must be a path ending in '.onnx', or None, got {export_path!r}")
    path = os.fspath(export_path)
    if "://" in path:
        raise ValueError(
            f"`export_path` must be a local file path (the file is written under a temporary name and renamed), "
            f"got the URL {path!r}; export locally and upload the file afterwards"
        )
    return path


def _check_on_mismatch(on_mismatch: Any) -> None:
    if on_mismatch not in ON_MISMATCH_CHOICES:
        raise ValueError(f"`on_mismatch` must be one of {list(ON_MISMATCH_CHOICES)}, got {on_mismatch!r}")


def check_model_input(model_input: Any) -> None:
    """Raise ``TypeError`` unless ``model_input`` is None, a key, a list of keys or an index."""
    keys = isinstance(model_input, list) and model_input and all(isinstance(k, str) for k in model_input)
    if (
        model_input is not None
        and not keys
        and (isinstance(model_input, bool) or not isinstance(model_input, str | int))
    ):
        raise TypeError(
            "`model_input` must be None (the first element of a tuple/list batch; for a dict batch, the keys the "
            "model's forward takes), a dict key (str), a list of dict keys or a tuple index (int), got "
            f"{model_input!r}"
        )


@dataclass(frozen=True)
class Int8Settings:
    """How a model is prepared for int8, validated once: what ``prepare_qat_``/``calibrate_`` and the dry runs take.

    QAT and PTQ build one from their flat (YAML-friendly) constructor arguments; QAT saves it whole in its state, so
    a checkpoint says how its quantizers were prepared (``load_quantized`` reads it back).

    Attributes:
        include: Module patterns to quantize (``None``: every Linear/Conv).
        exclude: Module patterns to keep in float.
        fold_bn: Fold a BatchNorm that follows a conv into the conv's quantized weight.
        weight_bits: 7 (exact on every CPU) or 8.
        outputs: Where layer outputs are quantized: ``"graph"``, ``"auto"`` or ``"all"``.
        activations: ``"static"`` or ``"dynamic"``.
        embeddings: ``"float"`` or ``"int8"``.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    fold_bn: bool = True
    weight_bits: int = DEFAULT_WEIGHT_BITS
    outputs: str = DEFAULT_OUTPUTS
    activations: str = DEFAULT_ACTIVATIONS
    embeddings: str = DEFAULT_EMBEDDINGS

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            patterns = validate_patterns(name, getattr(self, name))
            object.__setattr__(self, name, tuple(patterns) if patterns is not None else None)
        object.__setattr__(self, "fold_bn", validate_bool("fold_bn", self.fold_bn))
        validate_weight_bits(self.weight_bits)
        validate_outputs(self.outputs)
        validate_activations(self.activations)
        validate_embeddings(self.embeddings)

    def prepare_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``prepare_qat_``/``calibrate_``."""
        return self.as_state()

    def as_state(self) -> dict[str, Any]:
        """Plain values (lists for the patterns), for a checkpoint that loads with ``weights_only=True``."""
        state = dataclasses.asdict(self)
        for name in ("include", "exclude"):
            state[name] = list(state[name]) if state[name] is not None else None
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Int8Settings:
        """The settings :meth:`as_state` saved."""
        return cls(**{field.name: state[field.name] for field in dataclasses.fields(cls) if field.name in state})

    def check_same_as(self, saved: Int8Settings) -> None:
        """Raise unless ``saved`` (a checkpoint's) equals these settings, naming what to set to continue from it."""
        differences = self.differences(saved)
        if differences:
            raise ValueError(
                f"The checkpoint's quantizers were prepared with {', '.join(differences)}, which this callback sets "
                f"otherwise: set {', '.join(differences)} to continue from it"
            )

    def differences(self, other: Int8Settings) -> list[str]:
        """``name=value`` of every setting ``other`` has differently (for "set X to continue" errors)."""
        mine, theirs = self.as_state(), other.as_state()
        return [f"{name}={theirs[name]!r}" for name in mine if mine[name] != theirs[name]]


def check_on_mismatch(on_mismatch: Any) -> str:
    """Return ``on_mismatch`` if it is one of the allowed values; else raise ``ValueError`` naming it."""
    _check_on_mismatch(on_mismatch)
    return on_mismatch


def require_example_input(pl_module: LightningModule, owner: str) -> None:
    """Raise ``ValueError`` naming the module when an export is asked for without ``example_input_array``."""
    if pl_module.example_input_array is None:
        raise ValueError(
            f"{owner}(export_path=...) needs an example input to trace the model: set "
            f"`self.example_input_array` in {type(pl_module).__name__}.__init__ (e.g. torch.zeros(1, 1, 8, 8))"
        )


def calibrated_probe(pl_module: LightningModule, **prepare: Any) -> Any:
    """A throwaway copy of ``pl_module``, prepared and calibrated on its example input: what a dry run exports."""
    probe = module_copy(pl_module)
    calibrate_(
        probe,
        [example_input(pl_module)],
        num_batches=1,
        model_input=lambda batch: batch,
        modules_not_run="placeholder",  # trained in training_step (a GAN's discriminator), not in the export
        **prepare,
    )
    return probe


def dry_run_export(pl_module: LightningModule, owner: str, **prepare: Any) -> None:
    """Export a throwaway copy, calibrated on the example input, so that the end of fit cannot fail on it."""
    try:
        probe = calibrated_probe(pl_module, **prepare)
        with tempfile.TemporaryDirectory() as directory:
            export_onnx(probe, Path(directory) / "dry_run.onnx", example_input(pl_module), on_mismatch="ignore")
    except Exception as error:
        raise RuntimeError(
            f"{owner}: the int8 export of {type(pl_module).__name__} fails on its example_input_array, so it would "
            f"fail at the end of fit. Checked at setup, before training: {type(error).__name__}: {error}"
        ) from error


def warn_when_starting_from_chance(trainer: Trainer, pl_module: LightningModule, model_input: Any) -> None:
    """Warn when fake quantization starts on a model whose validation accuracy is near chance (random weights).

    QAT fine-tunes: from random weights its clipped ranges slow learning (measured: ResNet-50 0.40 against 0.72,
    ResNet-18 0.81 against 0.95 in float). Judged on one validation batch of (input, class) pairs; silent otherwise.
    """
    batch = first_batch(trainer)
    labels = batch_labels(batch) if batch is not None else None
    if labels is None:
        return
    try:
        inputs = batch_picker(model_input, pl_module)(batch)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = run_model(pl_module, inputs)
        pl_module.train(was_training)
    except Exception:
        return
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(labels):
        return
    accuracy = (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()
    chance = 1.0 / logits.shape[1]
    if accuracy <= 1.5 * chance:
        rank_zero_warn(
            f"QuantizationAwareTraining: fake quantization starts now, on a model whose validation accuracy is "
            f"{accuracy:.2%} (chance is {chance:.2%}): it looks untrained. QAT fine-tunes a trained model; from random "
            "weights it learns far worse (measured: ResNet-18 0.81 against 0.95). Train in float first "
            "(start_step=0.667), or start from a checkpoint."
        )


def int8_probe(trainer: Trainer, pl_module: LightningModule, callback: Any) -> Contribution | None:
    """A throwaway int8 contribution calibrated on the example input, for the deploy stage's dry run at fit start.

    Only at fit start (every setup has run) is it known whether another technique changes the int8 export
    (channel pruning slims it); the stage builds that combination from this probe before training.
    """
    if callback.export_path is None or trainer.fast_dev_run:
        return None
    return Contribution(
        owner=type(callback).__name__,
        int8_model=lambda: calibrated_probe(pl_module, **callback.settings.prepare_arguments()),
    )


def int8_model_exists(
    quantizers: Mapping[str, Any], steps: tuple[int, int] | None, restored: bool, path: str | None, skipped: int
) -> bool:
    """Whether QAT produced an int8 model; warned when an export was asked for and there is none.

    Args:
        quantizers: The static activation quantizers by name (empty with dynamic activations only).
        steps: ``(start_step, current step)`` during fit; ``None`` outside fit, where the restored state tells.
        restored: Whether a restored state said the model was quantized (a dynamic-only model has no range).
        path: The export path asked for, if any.
        skipped: Batches whose non-finite ranges were skipped (for the error).

    Raises:
        RuntimeError: when some quantizer never saw a finite range, so there is no int8 model to export.
    """
    uncalibrated = [name for name, q in quantizers.items() if not q.calibrated]
    if steps is None:
        start, current, never_started = 0, 0, not (quantizers or restored) or bool(uncalibrated)
    else:
        start, current = steps
        # With dynamic activations only there is no range to tell; the step count does.
        never_started = current <= start and (bool(uncalibrated) or not quantizers)
    if never_started or (uncalibrated and path is None):
        if never_started and path is not None:
            rank_zero_warn(
                f"QuantizationAwareTraining: training ended at step {current}, before QAT's start_step {start}, so "
                f"there is no int8 model: nothing was written to {path}"
            )
        return False
    if uncalibrated:
        raise RuntimeError(
            f"QuantizationAwareTraining: every batch observed by {uncalibrated[:5]} had NaN/inf activations "
            f"({skipped} skipped), so they have no range and the int8 model cannot be exported"
        )
    return True

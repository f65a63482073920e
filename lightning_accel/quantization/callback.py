"""The QAT and PTQ callbacks: they decide *when*; prepare.py and export.py do the work."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from lightning_accel._files import resolve_artifact_path
from lightning_accel._lightning import TrainingSteps, configure_model_early, refuse_weight_averaging
from lightning_accel._logging import add_hyperparameters, log_text
from lightning_accel._modules import summarize_selection
from lightning_accel._validation import resolve_step, validate_bool, validate_int, validate_patterns, validate_step
from lightning_accel.pruning.groups import slim, trainer_channel_groups
from lightning_accel.quantization.export import ON_MISMATCH_CHOICES, as_evaluated, check_rewrite, export_onnx
from lightning_accel.quantization.fake_quant import DEFAULT_WEIGHT_BITS, ActivationFakeQuant
from lightning_accel.quantization.prepare import (
    LEGACY_OUTPUTS,
    LEGACY_WEIGHT_BITS,
    activation_quantizers,
    attention_kernel_children,
    flag_nonfinite,
    iter_batch_norms,
    left_in_float,
    load_quantizer_state_,
    observed_ranges,
    prepare_qat_,
    quantizable_base,
    quantizer_state,
    set_qat_phase,
    update_ranges,
    validate_outputs,
    validate_weight_bits,
)

_STATE_VERSION = 2
#: Phases logged as ``qat/phase``.
PHASE_FLOAT, PHASE_OBSERVING, PHASE_FROZEN = 0, 1, 2
FULL_RANGE_NOTE = (
    "weight_bits=8 uses the full int8 range. ONNX Runtime computes it exactly only where int8 dot products "
    "accumulate in int32 (x86 with VNNI or AMX, ARM, TensorRT). On x86 without VNNI (AVX2, AVX-512F) its U8S8 "
    "kernels saturate pairs of products to int16 unless the session sets `session.x64quantprecision=1` "
    "(measured about 30% slower at batch 32). weight_bits=7, the default, is exact on every CPU."
)


def _check_export_path(export_path: Any) -> str | None:
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


def _check_writable(export_path: str) -> None:
    """Fail at setup, not after training, when the export path cannot be written."""
    directory = Path(export_path).resolve().parent
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"`export_path` {export_path!r} cannot be written: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"`export_path` {export_path!r} cannot be written: no write permission in {existing}")


def _check_on_mismatch(on_mismatch: Any) -> None:
    if on_mismatch not in ON_MISMATCH_CHOICES:
        raise ValueError(f"`on_mismatch` must be one of {list(ON_MISMATCH_CHOICES)}, got {on_mismatch!r}")


def _check_model_input(model_input: Any) -> None:
    if model_input is not None and (isinstance(model_input, bool) or not isinstance(model_input, str | int)):
        raise TypeError(
            "`model_input` must be None (the first element of a tuple/list batch, or the whole batch), a dict key "
            f"(str) or a tuple index (int), got {model_input!r}"
        )


def _set_preparation_settings(
    callback: Any,
    include: list[str] | None,
    exclude: list[str] | None,
    fold_bn: bool,
    weight_bits: int,
    outputs: str,
    model_input: str | int | None,
    on_mismatch: str,
) -> None:
    """Validate and store the settings QAT and PTQ share (those :func:`_prepare_arguments` passes on, and the check)."""
    callback.include = validate_patterns("include", include)
    callback.exclude = validate_patterns("exclude", exclude)
    callback.fold_bn = validate_bool("fold_bn", fold_bn)
    validate_weight_bits(weight_bits)
    callback.weight_bits = weight_bits
    validate_outputs(outputs)
    callback.outputs = outputs
    _check_model_input(model_input)
    callback.model_input = model_input
    _check_on_mismatch(on_mismatch)
    callback.on_mismatch = on_mismatch


def _prepare_arguments(callback: Any) -> dict[str, Any]:
    """The preparation settings a QAT or PTQ callback passes to ``prepare_qat_``/``calibrate_``."""
    return {
        "include": callback.include,
        "exclude": callback.exclude,
        "fold_bn": callback.fold_bn,
        "weight_bits": callback.weight_bits,
        "outputs": callback.outputs,
    }


def _require_example_input(pl_module: LightningModule, owner: str) -> None:
    if pl_module.example_input_array is None:
        raise ValueError(
            f"{owner}(export_path=...) needs an example input to trace the model: set "
            f"`self.example_input_array` in {type(pl_module).__name__}.__init__ (e.g. torch.zeros(1, 1, 8, 8))"
        )


def _example_input(pl_module: LightningModule) -> Any:
    example = pl_module.example_input_array
    return tuple(example) if isinstance(example, list) else example


def default_model_input(batch: Any) -> Any:
    """The model input of a batch: its first element if it is a tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def batch_picker(model_input: str | int | Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """A function that picks the model input out of a batch.

    Args:
        model_input: ``None`` (the first element of a tuple/list batch, or the batch itself), a key of dict
            batches, an index into tuple/list batches, or such a function itself.
    """
    if model_input is None:
        return default_model_input
    if callable(model_input):
        return model_input

    def pick(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            if model_input not in batch:
                raise ValueError(
                    f"`model_input`={model_input!r} is not a key of the batch; its keys are {sorted(map(str, batch))}"
                )
            return batch[model_input]
        if isinstance(batch, tuple | list) and isinstance(model_input, int) and -len(batch) <= model_input < len(batch):
            return batch[model_input]
        raise ValueError(
            f"`model_input`={model_input!r} cannot pick from a batch of type {type(batch).__name__}"
            + (f" with {len(batch)} elements" if isinstance(batch, tuple | list) else "")
        )

    return pick


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a picked model input: a dict as keywords, a tuple as positional inputs, else one input."""
    device = next(model.parameters()).device
    if isinstance(inputs, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    if isinstance(inputs, tuple):
        return model(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs])
    if isinstance(inputs, torch.Tensor):
        return model(inputs.to(device))
    raise TypeError(
        f"The model input picked from the batch is a {type(inputs).__name__}; it must be a tensor, a tuple of "
        "tensors or a dict of tensors. Set `model_input` to the batch key or index of the model's input."
    )


def _dry_run_export(pl_module: LightningModule, owner: str, groups: Any = None, **prepare: Any) -> None:
    """Export a throwaway copy, calibrated on the example input, so that the end of fit cannot fail on it.

    With channel ``groups`` (a channel-pruning callback in the Trainer), the copy is slimmed first, as the real
    export will be.
    """
    probe = copy.deepcopy(pl_module)
    example = _example_input(pl_module)
    try:
        calibrate_(probe, [example], num_batches=1, model_input=lambda batch: batch, **prepare)
        if groups is not None:
            probe = slim(probe, example, groups)
        with tempfile.TemporaryDirectory() as directory:
            export_onnx(probe, Path(directory) / "dry_run.onnx", example, on_mismatch="ignore")
    except Exception as error:
        raise RuntimeError(
            f"{owner}: the int8 export of {type(pl_module).__name__} fails on its example_input_array, so it would "
            f"fail at the end of fit. Checked at setup, before training: {type(error).__name__}: {error}"
        ) from error


def _dry_run_slimmed_export(trainer: Trainer, pl_module: LightningModule, callback: Any) -> None:
    """The int8 export of a channel-pruned run is slimmed: try that too, before training (rank 0)."""
    groups = trainer_channel_groups(trainer.callbacks)
    if callback.export_path is None or groups is None or not trainer.is_global_zero or trainer.fast_dev_run:
        return
    _dry_run_export(pl_module, type(callback).__name__, groups=groups, **_prepare_arguments(callback))


def _same_structure(candidate: Any, example: Any) -> bool:
    """Whether a picked batch input can be fed to the ONNX inputs that ``example`` named."""
    if isinstance(example, Mapping):
        return isinstance(candidate, Mapping) and set(candidate) == set(example)
    if isinstance(example, tuple | list):
        return isinstance(candidate, tuple | list) and len(candidate) == len(example)
    return isinstance(candidate, torch.Tensor) and candidate.dim() == example.dim()


#: The export check runs on at least this many validation samples where the data has them: a few dozen samples
#: hid a 1.2-point agreement loss that 1,797 showed.
CHECK_SAMPLES = 1000


def _batch_size(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    first = first[0] if isinstance(first, tuple | list) else first
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _check_batches(
    trainer: Trainer, pl_module: LightningModule, picker: Callable[[Any], Any], samples: int = CHECK_SAMPLES
) -> list[Any]:
    """Validation (else training) batches' model inputs, at least ``samples`` rows where the data has them.

    ``[]`` when no batch gives a model input shaped like ``example_input_array``.
    """
    example = _example_input(pl_module)
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        if loader is None or not isinstance(loader, Iterable):
            continue
        picked, count = [], 0
        try:
            for batch in loader:
                inputs = picker(batch)
                inputs = tuple(inputs) if isinstance(inputs, list) else inputs
                if not _same_structure(inputs, example):
                    break
                picked.append(inputs)
                count += _batch_size(inputs)
                if count >= samples:
                    break
        except (ValueError, TypeError, KeyError, IndexError):
            picked = []
        if picked:
            return picked
    rank_zero_info(
        "The export is checked on example_input_array only: no batch gave a model input shaped like it (set "
        "`model_input` to pick it)"
    )
    return []


class QuantizationAwareTraining(Callback):
    """Train with int8 fake quantization, so that the deployed int8 model keeps the float model's accuracy.

    Static int8: weights symmetric per output channel (7-bit by default, exact in ONNX Runtime on every CPU),
    activations per-tensor affine uint8, observed at the input and output of every selected ``nn.Conv1d/2d/3d`` and
    ``nn.Linear``; biases are rounded to the runtime's int32 grid. Modules are prepared in ``setup`` (before
    checkpoint restore, DDP and optimizers); parameters keep their names and identity and the model's ``forward``
    is untouched. Activation ranges are reduced over DDP ranks every step, so all ranks quantize alike, and
    batches with NaN/inf activations never enter them. Fit never converts the model: with ``export_path`` a
    converted copy is exported at the end of fit and checked in ONNX Runtime.

    ``validate``/``test``/``predict`` score the model as it will be deployed: during fit by the current step's
    phase, otherwise by the restored quantizer state (``ckpt_path=...``), in any process.

    QAT fine-tunes: start it from a trained float model (a checkpoint, or a ``start_step`` after float training).
    From random weights the clipped ranges slow learning down.

    Args:
        include: Glob patterns over module names to quantize; ``None`` selects every ``nn.Linear`` and
            ``nn.Conv1d/2d/3d`` (exact types; subclasses keep their own forward and are skipped).
        exclude: Glob patterns over module names to keep in float.
        start_step: Where fake quantization starts; before it the model trains in float. An optimizer step (int) or
            a fraction of the fit's training steps (float in (0, 1], e.g. 0.6), as Lightning's
            ``val_check_interval``.
        freeze_observers_step: Step or fraction from which activation ranges and weight scales stay fixed.
            ``None``: never.
        freeze_bn_step: Step or fraction from which every BatchNorm keeps its running statistics (eval mode).
            ``None``: never.
        fold_bn: Train and export a conv that is directly followed by a BatchNorm with the BatchNorm folded into its
            weight, so that the int8 weights the runtime sees are the ones that were trained.
        export_path: Where rank 0 writes the int8 ONNX model at the end of fit (needs the module's
            ``example_input_array``). ``None``: no export.
        log_ranges: Log each activation quantizer's scale as ``qat/scale/<name>``.
        weight_bits: 7 (default): weights in [-63, 63], computed exactly by ONNX Runtime on every CPU. 8: the full
            range, for targets whose int8 dot products accumulate in int32 (VNNI/AMX, ARM, TensorRT).
        model_input: Which part of a batch is the model's input, for checking the export on a validation batch:
            ``None`` (the first element of a tuple/list batch, or the whole batch), a dict key or a tuple index.
        on_mismatch: What to do when the exported file does not reproduce the PyTorch model (agreement < 99% or
            SNR < 30 dB): ``"warn"``, ``"raise"`` or ``"ignore"``.
        outputs: Where layer outputs are quantized: ``"auto"`` (every Conv/Linear output, except the Linear layers
            inside transformer blocks, whose outputs stay float while ONNX Runtime still runs their int8 kernels)
            or ``"all"``. See :func:`~lightning_accel.quantization.prepare.prepare_qat_`.

    Example:
        >>> trainer = Trainer(callbacks=[QuantizationAwareTraining(export_path="model.int8.onnx")])  # doctest: +SKIP
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        start_step: int | float = 0,
        freeze_observers_step: int | float | None = None,
        freeze_bn_step: int | float | None = None,
        fold_bn: bool = True,
        export_path: str | os.PathLike | None = None,
        log_ranges: bool = True,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        model_input: str | int | None = None,
        on_mismatch: str = "warn",
        outputs: Literal["auto", "all"] = "auto",
    ) -> None:
        start_step = validate_step("start_step", start_step)
        freeze_observers_step = validate_step("freeze_observers_step", freeze_observers_step, allow_none=True)
        freeze_bn_step = validate_step("freeze_bn_step", freeze_bn_step, allow_none=True)
        comparable = type(freeze_observers_step) is type(start_step)
        if freeze_observers_step is not None and comparable and freeze_observers_step <= start_step:
            raise ValueError(
                f"`freeze_observers_step` must be > `start_step` ({start_step}) so that ranges are observed before "
                f"they are frozen, or None; got {freeze_observers_step!r}"
            )
        log_ranges = validate_bool("log_ranges", log_ranges)
        _set_preparation_settings(self, include, exclude, fold_bn, weight_bits, outputs, model_input, on_mismatch)
        self.export_path = _check_export_path(export_path)
        self.start_step = start_step
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step
        self.log_ranges = log_ranges
        self.skipped_ranges = 0
        #: Where the export goes: ``export_path``, under the run's log directory when relative (set at setup).
        self.resolved_export_path: str | None = None
        self._log_selection = True  # once per callback: setup runs again for test after fit
        self._selection_summary = ""
        self._model: nn.Module | None = None
        self._quantizers: dict[str, ActivationFakeQuant] = {}
        self._pending_state: dict[str, Any] | None = None
        self._batch_norms: list[nn.Module] = []
        self._phase = PHASE_FLOAT
        self._training_steps = TrainingSteps()
        self._applied: tuple[bool, bool] | None = None  # (fake_quant, observe) last set on the model
        # (start, freeze observers, freeze BatchNorm) as optimizer steps, once fractions are resolved at fit start.
        steps = (start_step, freeze_observers_step, freeze_bn_step)
        self._steps: tuple[int, int | None, int | None] | None = (
            steps if not any(isinstance(v, float) for v in steps) else None
        )

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def phase_at(self, step: int) -> int:
        """The phase at optimizer step ``step``: float, observing (fake-quant on) or frozen.

        Fractional steps are resolved at fit start; before that this raises ``RuntimeError``.
        """
        if self._steps is None:
            raise RuntimeError("QuantizationAwareTraining: fractional steps are resolved when fit starts")
        start, freeze_observers, _ = self._steps
        if step < start:
            return PHASE_FLOAT
        if freeze_observers is not None and step >= freeze_observers:
            return PHASE_FROZEN
        return PHASE_OBSERVING

    def _resolve_steps(self, trainer: Trainer) -> None:
        """Turn fractional steps into optimizer steps of this fit, and check their order."""
        total = trainer.estimated_stepping_batches
        start = resolve_step("start_step", self.start_step, total)
        freeze_observers = resolve_step("freeze_observers_step", self.freeze_observers_step, total)
        freeze_bn = resolve_step("freeze_bn_step", self.freeze_bn_step, total)
        if freeze_observers is not None and freeze_observers <= start:
            raise ValueError(
                f"`freeze_observers_step` ({self.freeze_observers_step!r} = step {freeze_observers}) must come after "
                f"`start_step` ({self.start_step!r} = step {start}) in this fit of {total} steps"
            )
        self._steps = (start, freeze_observers, freeze_bn)

    # --- hooks --------------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Prepare the fake-quant modules (once), and before fitting dry-run everything the export will need."""
        fitting = stage == "fit"
        if self.export_path is not None and fitting:
            _require_example_input(pl_module, type(self).__name__)
            self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
            _check_writable(self.resolved_export_path)
        if self.weight_bits == 8:
            rank_zero_warn(f"QuantizationAwareTraining: {FULL_RANGE_NOTE}")
        refuse_weight_averaging(trainer, "QuantizationAwareTraining", "the quantizer ranges and BatchNorm freeze")
        configure_model_early(trainer, pl_module)  # layers built in configure_model are quantized too
        prepare_qat_(pl_module, self.include, self.exclude, self.fold_bn, self.weight_bits, self.outputs)
        self._model = pl_module
        self._batch_norms = list(iter_batch_norms(pl_module))
        self._applied = None
        self._quantizers = activation_quantizers(pl_module)
        if self._pending_state is not None:
            self._load_into_model(self._pending_state)
        if self.export_path is not None and fitting:
            _dry_run_export(pl_module, type(self).__name__, **_prepare_arguments(self))
        step = self._training_steps.current(trainer, pl_module)
        self._set_phase(self.phase_at(step) if self._steps else PHASE_FLOAT, training=False)
        if self._log_selection:
            quantized = [name for name, m in pl_module.named_modules() if hasattr(m, "weight_quant")]
            skipped = attention_kernel_children(pl_module)
            candidates = [
                name
                for name, m in pl_module.named_modules()
                if name and quantizable_base(m) is not None and name not in skipped
            ]
            summary = summarize_selection(quantized, candidates) + left_in_float(pl_module)
            self._selection_summary = summary
            rank_zero_info(f"QuantizationAwareTraining ({getattr(stage, 'value', stage)}): {summary}")
            self._log_selection = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve fractional steps against this fit's length (before the sanity check validates)."""
        self._resolve_steps(trainer)
        _dry_run_slimmed_export(trainer, pl_module, self)
        if self._selection_summary:
            log_text(trainer, f"lightning_accel/selection/{self.state_key}", self._selection_summary)
        self._set_phase(self.phase_at(self._training_steps.current(trainer, pl_module)), training=False)
        add_hyperparameters(trainer, pl_module, {"qat/start_step": self._steps[0], "qat/weight_bits": self.weight_bits})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Switch the phase for this step, and keep BatchNorms frozen once their step has come."""
        step = self._training_steps.current(trainer, pl_module)
        self._set_phase(self.phase_at(step), training=True)
        freeze_bn_step = self._steps[2]
        if freeze_bn_step is not None and step >= freeze_bn_step:
            for bn in self._batch_norms:  # again every step: Lightning's model.train() after validation undoes it
                bn.eval()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Reduce this batch's activation ranges over ranks, update the running ranges, and log."""
        self._training_steps.batch_done(pl_module)
        if self._phase == PHASE_OBSERVING:
            ranges = flag_nonfinite(observed_ranges(self._quantizers))
            if trainer.world_size > 1:
                ranges = trainer.strategy.reduce(ranges, reduce_op="max")
            if ranges[-1] > 0:  # a NaN/inf activation on some rank: this batch must not poison the ranges
                self.skipped_ranges += 1
                rank_zero_warn(
                    f"QuantizationAwareTraining: step {trainer.global_step} produced non-finite activations; its "
                    f"ranges were skipped ({self.skipped_ranges} batch(es) so far, logged as qat/skipped_ranges)"
                )
            else:
                update_ranges(list(self._quantizers.values()), ranges[:-1], averaging_constant=0.01)
        if trainer.global_step % trainer.log_every_n_steps:
            return
        for name, phase in (("float", PHASE_FLOAT), ("observing", PHASE_OBSERVING), ("frozen", PHASE_FROZEN)):
            pl_module.log(f"qat/phase_{name}", float(self._phase == phase), on_step=True, on_epoch=False)
        pl_module.log("qat/phase", float(self._phase), on_step=True, on_epoch=False)
        pl_module.log("qat/skipped_ranges", float(self.skipped_ranges), on_step=True, on_epoch=False)
        if self.log_ranges and self._phase != PHASE_FLOAT:
            for name, quantizer in self._quantizers.items():
                pl_module.log(f"qat/scale/{name}", quantizer.scale, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate as deployed, without observing: see :meth:`evaluation_phase`."""
        self._set_phase(self.evaluation_phase(trainer), training=False)

    on_test_start = on_validation_start
    on_predict_start = on_validation_start

    def evaluation_phase(self, trainer: Trainer) -> int:
        """The phase that ``validate``/``test``/``predict`` evaluate in.

        During fit, the current step's phase. Outside fit (``trainer.test(ckpt_path=...)`` in any process) the
        restored quantizer state decides, not ``trainer.global_step``, which Lightning does not restore there:
        quantized if the quantizers hold observed ranges, float (with a warning) if they hold none.
        """
        if trainer.state.fn == "fit":
            return self.phase_at(self._training_steps.current(trainer, trainer.lightning_module))
        calibrated = [name for name, q in self._quantizers.items() if q.calibrated]
        if len(calibrated) == len(self._quantizers):
            return PHASE_FROZEN
        if calibrated:
            missing = [name for name in self._quantizers if name not in calibrated]
            raise RuntimeError(
                f"QuantizationAwareTraining: the restored quantizer state has ranges for {len(calibrated)} of "
                f"{len(self._quantizers)} quantizers (missing: {missing[:5]}); the checkpoint does not match "
                "this model's selection"
            )
        rank_zero_warn(
            f"QuantizationAwareTraining: no quantizer state was restored, so `{trainer.state.fn}` scores the float "
            "model, not the int8 one. Pass `ckpt_path=` a checkpoint written after QAT's start_step."
        )
        return PHASE_FLOAT

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export the int8 ONNX model, if asked (rank 0); the trained model stays as it is."""
        if self.export_path is None:
            return
        if trainer.fast_dev_run:
            rank_zero_warn(
                f"QuantizationAwareTraining: fast_dev_run, so the int8 export to {self.resolved_export_path} is skipped"
            )
            return
        uncalibrated = [name for name, q in self._quantizers.items() if not q.calibrated]
        start, steps = self._steps[0], self._training_steps.current(trainer, pl_module)
        if uncalibrated and steps <= start:
            rank_zero_warn(
                f"QuantizationAwareTraining: training ended at step {steps}, before QAT's start_step "
                f"{start}, so there is no int8 model: nothing was written to {self.resolved_export_path}"
            )
            return
        if uncalibrated:
            raise RuntimeError(
                f"QuantizationAwareTraining: every batch observed by {uncalibrated[:5]} had NaN/inf activations "
                f"({self.skipped_ranges} skipped), so they have no range and the int8 model cannot be exported"
            )
        checks = _check_batches(trainer, pl_module, batch_picker(self.model_input)) if trainer.is_global_zero else []
        _export_on_rank_zero(trainer, pl_module, self.resolved_export_path, checks, self.on_mismatch)

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every quantizer's buffers (tensors on CPU), the weight width and the count of skipped batches."""
        quantizers = quantizer_state(self._model) if self._model is not None else {}
        return {
            "version": _STATE_VERSION,
            "quantizers": quantizers,
            "weight_bits": self.weight_bits,
            "outputs": self.outputs,
            "skipped_ranges": self.skipped_ranges,
            "training_batches": self._training_steps.batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the quantizers (now if the model is prepared, else at ``setup``)."""
        saved_bits = state_dict.get("weight_bits", LEGACY_WEIGHT_BITS)
        state = state_dict.get("quantizers") or None
        if state is not None and saved_bits != self.weight_bits:
            raise ValueError(
                f"The checkpoint's quantizers were trained with weight_bits={saved_bits}, this callback has "
                f"`weight_bits`={self.weight_bits}: set weight_bits={saved_bits} to continue from it"
            )
        saved_outputs = state_dict.get("outputs", LEGACY_OUTPUTS)
        if state is not None and saved_outputs != self.outputs:
            raise ValueError(
                f"The checkpoint's quantizers were trained with outputs={saved_outputs!r}, this callback has "
                f"`outputs`={self.outputs!r}: set outputs={saved_outputs!r} to continue from it"
            )
        self.skipped_ranges = int(state_dict.get("skipped_ranges", 0))
        self._training_steps.batches = int(state_dict.get("training_batches", 0))
        if state is None:
            return
        if self._model is not None:
            self._load_into_model(state)
        else:
            self._pending_state = state

    # --- helpers ------------------------------------------------------------------------------------------------

    def _load_into_model(self, state: dict[str, Any]) -> None:
        load_quantizer_state_(self._model, state)
        self._pending_state = None

    def _set_phase(self, phase: int, training: bool) -> None:
        self._phase = phase
        wanted = (phase != PHASE_FLOAT, training and phase == PHASE_OBSERVING)
        if wanted != self._applied:  # walking every module each step would cost large models real time
            set_qat_phase(self._model, fake_quant=wanted[0], observe=wanted[1])
            self._applied = wanted


@rank_zero_only
def _export_on_rank_zero(
    trainer: Trainer, model: nn.Module, path: str, check_inputs: list[Any], on_mismatch: str
) -> None:
    example = _example_input(model)
    model, slimmed = slim_for_trainer(trainer, model, example)
    written = export_onnx(model, path, example, check_inputs=check_inputs, on_mismatch=on_mismatch)
    rank_zero_info(f"Wrote the int8 ONNX model{slimmed} to {written} ({written.stat().st_size:,} bytes)")


def slim_for_trainer(trainer: Trainer, model: nn.Module, example: Any) -> tuple[nn.Module, str]:
    """Slim ``model`` when the Trainer prunes channel groups (``MagnitudePruning(pattern="channels")``).

    Slimming removes only channels whose every tensor slice is zero, so the int8 export computes what the masked
    model computes, with less work. Returns the model to export and a note for the log.
    """
    groups = trainer_channel_groups(trainer.callbacks)
    if groups is None:
        return model, ""
    before = sum(p.numel() for p in model.parameters())
    small = slim(model, example, groups)
    # Slimming must never change what the masked model computes; the int8 file is then checked against the slim
    # model, so a wrong slim would pass its own check.
    check_rewrite(as_evaluated(model), as_evaluated(small), [example], "The slim model")
    after = sum(p.numel() for p in small.parameters())
    return small, f", slimmed to {after:,} of {before:,} parameters,"


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 32,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    fold_bn: bool = True,
    model_input: str | int | Callable[[Any], Any] | None = None,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    outputs: str = "auto",
) -> nn.Module:
    """Post-training quantization: prepare ``model`` in place and calibrate its activation ranges on data.

    The model runs in eval mode on up to ``num_batches`` batches; each quantizer keeps the overall min and max it
    sees, over every call of its module. Batches with NaN/inf activations are skipped (with a warning).
    Afterwards fake quantization is on, and ``export_onnx(model, ...)`` writes the int8 model.

    Args:
        model: The trained float model.
        batches: An iterable of batches, e.g. a DataLoader.
        num_batches: How many batches to calibrate on.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
        model_input: Picks the model input out of a batch: ``None`` (the first element of a tuple/list, else the
            batch), a dict key, a tuple index, or a function of the batch. A dict input is passed as keywords and a
            tuple as positional inputs.
        weight_bits: 7 (default, exact in ONNX Runtime on every CPU) or 8 (VNNI/AMX, ARM, TensorRT targets).
        outputs: ``"auto"`` (float outputs for the Linear layers of transformer blocks) or ``"all"``.

    Returns:
        The same ``model``, prepared and calibrated.

    Raises:
        ValueError: when no batch came, or every batch gave a quantizer NaN/inf activations (named).
    """
    num_batches = validate_int("num_batches", num_batches, 1)
    if not isinstance(batches, Iterable) or isinstance(batches, torch.Tensor):
        raise TypeError(f"`batches` must be an iterable of batches such as a DataLoader, got {type(batches).__name__}")
    picker = batch_picker(model_input)
    prepare_qat_(model, include, exclude, fold_bn, weight_bits, outputs)
    quantizers = activation_quantizers(model)
    was_training = model.training
    model.eval()
    set_qat_phase(model, fake_quant=False, observe=True)
    seen = skipped = 0
    for seen, batch in enumerate(batches, start=1):
        run_model(model, picker(batch))
        ranges = flag_nonfinite(observed_ranges(quantizers))
        if ranges[-1] > 0:
            skipped += 1
        else:
            update_ranges(list(quantizers.values()), ranges[:-1], averaging_constant=None)
        if seen >= num_batches:
            break
    if seen == 0:
        raise ValueError("`batches` yielded no batch to calibrate on")
    if skipped:
        rank_zero_warn(f"calibrate_: {skipped} of {seen} batch(es) gave NaN/inf activations and were skipped")
    uncalibrated = [name for name, q in quantizers.items() if not q.calibrated]
    if uncalibrated:
        raise ValueError(
            f"calibrate_: every calibration batch gave NaN/inf activations at {uncalibrated[:5]}, so they have no "
            "range; check the data and the model for non-finite values"
        )
    set_qat_phase(model, fake_quant=True, observe=False)
    model.train(was_training)
    return model


class PostTrainingQuantization(Callback):
    """At the end of fit, calibrate an int8 copy of the trained model on training batches and export it to ONNX.

    The trained model is not changed. Use it without ``QuantizationAwareTraining`` when quantizing after the fact
    is accurate enough; it gives the same kind of int8 ONNX model. Everything the export needs is tried at setup and
    on the first training batch, so a problem shows before training, not after it.

    Args:
        export_path: Where rank 0 writes the int8 ONNX model (needs the module's ``example_input_array``).
        calibration_batches: How many training batches calibrate the activation ranges.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
        model_input: Which part of a batch is the model's input: ``None`` (the first element of a tuple/list
            batch, or the whole batch), a dict key (for dict batches) or a tuple index.
        weight_bits: 7 (default, exact in ONNX Runtime on every CPU) or 8 (VNNI/AMX, ARM, TensorRT targets).
        on_mismatch: What to do when the exported file does not reproduce the PyTorch model: ``"warn"``,
            ``"raise"`` or ``"ignore"``.
        outputs: Where layer outputs are quantized: ``"auto"`` (float outputs for the Linear layers of transformer
            blocks) or ``"all"``.
    """

    def __init__(
        self,
        export_path: str | os.PathLike,
        calibration_batches: int = 32,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fold_bn: bool = True,
        model_input: str | int | None = None,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        on_mismatch: str = "warn",
        outputs: Literal["auto", "all"] = "auto",
    ) -> None:
        if export_path is None:
            raise ValueError("`export_path` must be a path ending in '.onnx', got None")
        self.export_path = _check_export_path(export_path)
        calibration_batches = validate_int("calibration_batches", calibration_batches, 1)
        _set_preparation_settings(self, include, exclude, fold_bn, weight_bits, outputs, model_input, on_mismatch)
        self.calibration_batches = calibration_batches
        #: Where the export goes: ``export_path``, under the run's log directory when relative (set at setup).
        self.resolved_export_path: str | None = None
        self._input_checked = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail early: the example input, the export path and a dry-run export of a calibrated copy."""
        _require_example_input(pl_module, type(self).__name__)
        if stage != "fit":
            return
        configure_model_early(trainer, pl_module)  # the dry run copies the model: build lazy layers first
        if self.weight_bits == 8:
            rank_zero_warn(f"PostTrainingQuantization: {FULL_RANGE_NOTE}")
        self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
        _check_writable(self.resolved_export_path)
        _dry_run_export(pl_module, type(self).__name__, **_prepare_arguments(self))
        self._input_checked = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With channel pruning in the Trainer, dry-run the slimmed int8 export too (every setup has run by now)."""
        _dry_run_slimmed_export(trainer, pl_module, self)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """On the first batch, check that ``model_input`` picks an input the model runs on, as calibration will."""
        if self._input_checked:
            return
        try:
            inputs = batch_picker(self.model_input)(batch)
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                run_model(pl_module, inputs)
            pl_module.train(was_training)
        except Exception as error:
            raise RuntimeError(
                f"PostTrainingQuantization: calibration at the end of fit would fail on this data: the model "
                f"cannot run on the input that `model_input`={self.model_input!r} picks from a "
                f"{type(batch).__name__} batch ({type(error).__name__}: {error}). Set `model_input` to the batch key "
                "or index of the model's input."
            ) from error
        self._input_checked = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate a copy on training batches and export it (rank 0)."""
        if not trainer.is_global_zero:
            return
        if trainer.fast_dev_run:
            rank_zero_warn(
                f"PostTrainingQuantization: fast_dev_run, so the int8 export to {self.resolved_export_path} is skipped"
            )
            return
        copy_of_model = copy.deepcopy(pl_module)
        calibrate_(
            copy_of_model,
            trainer.train_dataloader,
            self.calibration_batches,
            model_input=self.model_input,
            **_prepare_arguments(self),
        )
        checks = _check_batches(trainer, pl_module, batch_picker(self.model_input))
        _export_on_rank_zero(trainer, copy_of_model, self.resolved_export_path, checks, self.on_mismatch)

"""The QAT and PTQ callbacks: they decide *when*; prepare.py and export.py do the work."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from lightning_accel._validation import validate_bool, validate_int, validate_patterns
from lightning_accel.quantization.export import export_onnx
from lightning_accel.quantization.fake_quant import ActivationFakeQuant
from lightning_accel.quantization.prepare import (
    activation_quantizers,
    iter_batch_norms,
    load_quantizer_state_,
    observed_ranges,
    prepare_qat_,
    quantizer_state,
    set_qat_phase,
    update_ranges,
)

_STATE_VERSION = 1
#: Phases logged as ``qat/phase``.
PHASE_FLOAT, PHASE_OBSERVING, PHASE_FROZEN = 0, 1, 2


def _check_export_path(export_path: str | None) -> None:
    if export_path is not None and (not isinstance(export_path, str) or not export_path.endswith(".onnx")):
        raise ValueError(f"`export_path` must be a path ending in '.onnx', or None, got {export_path!r}")


def _require_example_input(pl_module: LightningModule, owner: str) -> None:
    if pl_module.example_input_array is None:
        raise ValueError(
            f"{owner}(export_path=...) needs an example input to trace the model: set "
            f"`self.example_input_array` in {type(pl_module).__name__}.__init__ (e.g. torch.zeros(1, 1, 8, 8))"
        )


def _example_input(pl_module: LightningModule) -> Any:
    example = pl_module.example_input_array
    return tuple(example) if isinstance(example, list) else example


class QuantizationAwareTraining(Callback):
    """Train with int8 fake quantization, so that the deployed int8 model keeps the float model's accuracy.

    Static W8A8: weights symmetric int8 per output channel, activations per-tensor affine uint8, observed at the
    input and output of every selected ``nn.Conv1d/2d/3d`` and ``nn.Linear``. Modules are prepared in ``setup``
    (before checkpoint restore, DDP and optimizers); parameters keep their names and identity and the model's
    ``forward`` is untouched. Activation ranges are reduced over DDP ranks every step, so all ranks quantize alike.
    Fit never converts the model: with ``export_path`` a converted copy is exported at the end of fit.

    QAT fine-tunes: start it from a trained float model (a checkpoint, or a ``start_step`` after float training).
    From random weights the clipped ranges slow learning down.

    Args:
        include: Glob patterns over module names to quantize; ``None`` selects every ``nn.Linear`` and
            ``nn.Conv1d/2d/3d`` (exact types; subclasses keep their own forward and are skipped).
        exclude: Glob patterns over module names to keep in float.
        start_step: Optimizer step from which fake quantization is on; before it the model trains in float.
        freeze_observers_step: Step from which activation ranges and weight scales stay fixed. ``None``: never.
        freeze_bn_step: Step from which every BatchNorm keeps its running statistics (eval mode). ``None``: never.
        fold_bn: Train and export a conv that is directly followed by a BatchNorm with the BatchNorm folded into its
            weight, so that the int8 weights the runtime sees are the ones that were trained.
        export_path: Where rank 0 writes the int8 ONNX model at the end of fit (needs the module's
            ``example_input_array``). ``None``: no export.
        log_ranges: Log each activation quantizer's scale as ``qat/scale/<name>``.

    Example:
        >>> trainer = Trainer(callbacks=[QuantizationAwareTraining(export_path="model.int8.onnx")])  # doctest: +SKIP
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        start_step: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        fold_bn: bool = True,
        export_path: str | None = None,
        log_ranges: bool = True,
    ) -> None:
        validate_int("start_step", start_step, 0)
        validate_int("freeze_observers_step", freeze_observers_step, 0, allow_none=True)
        validate_int("freeze_bn_step", freeze_bn_step, 0, allow_none=True)
        if freeze_observers_step is not None and freeze_observers_step <= start_step:
            raise ValueError(
                f"`freeze_observers_step` must be > `start_step` ({start_step}) so that ranges are observed before "
                f"they are frozen, or None; got {freeze_observers_step!r}"
            )
        validate_bool("fold_bn", fold_bn)
        validate_bool("log_ranges", log_ranges)
        _check_export_path(export_path)
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.start_step = start_step
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step
        self.fold_bn = fold_bn
        self.export_path = export_path
        self.log_ranges = log_ranges
        self._model: nn.Module | None = None
        self._quantizers: list[ActivationFakeQuant] = []
        self._quantizer_names: list[str] = []
        self._pending_state: dict[str, Any] | None = None
        self._batch_norms: list[nn.Module] = []
        self._phase = PHASE_FLOAT
        self._applied: tuple[bool, bool] | None = None  # (fake_quant, observe) last set on the model

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def phase_at(self, step: int) -> int:
        """The phase at optimizer step ``step``: float, observing (fake-quant on) or frozen."""
        if step < self.start_step:
            return PHASE_FLOAT
        if self.freeze_observers_step is not None and step >= self.freeze_observers_step:
            return PHASE_FROZEN
        return PHASE_OBSERVING

    # --- hooks --------------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Prepare the fake-quant modules (once; fit twice or test after fit reuses them)."""
        if self.export_path is not None:
            _require_example_input(pl_module, type(self).__name__)
        prepare_qat_(pl_module, self.include, self.exclude, self.fold_bn)
        self._model = pl_module
        self._batch_norms = list(iter_batch_norms(pl_module))
        self._applied = None
        quantizers = activation_quantizers(pl_module)
        self._quantizer_names, self._quantizers = list(quantizers), list(quantizers.values())
        if self._pending_state is not None:
            self._load_into_model(self._pending_state)
        self._set_phase(trainer.global_step, training=False)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Switch the phase for this step, and keep BatchNorms frozen once their step has come."""
        self._set_phase(trainer.global_step, training=True)
        if self.freeze_bn_step is not None and trainer.global_step >= self.freeze_bn_step:
            for bn in self._batch_norms:  # again every step: Lightning's model.train() after validation undoes it
                bn.eval()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Reduce this batch's activation ranges over ranks, update the running ranges, and log."""
        if self._phase == PHASE_OBSERVING:
            ranges = observed_ranges(self._quantizers)
            if trainer.world_size > 1:
                ranges = trainer.strategy.reduce(ranges, reduce_op="max")
            update_ranges(self._quantizers, ranges, averaging_constant=0.01)
        if trainer.global_step % trainer.log_every_n_steps:
            return
        pl_module.log("qat/phase", float(self._phase), on_step=True, on_epoch=False)
        if self.log_ranges and self._phase != PHASE_FLOAT:
            for name, quantizer in zip(self._quantizer_names, self._quantizers, strict=True):
                pl_module.log(f"qat/scale/{name}", quantizer.scale, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate as deployed: fake quantization per the current step, without observing."""
        self._set_phase(trainer.global_step, training=False)

    on_test_start = on_validation_start
    on_predict_start = on_validation_start

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export the int8 ONNX model, if asked (rank 0); the trained model stays as it is."""
        if self.export_path is not None:
            _export_on_rank_zero(pl_module, self.export_path)

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every quantizer's buffers (tensors on CPU): ranges, scales, zero points."""
        quantizers = quantizer_state(self._model) if self._model is not None else {}
        return {"version": _STATE_VERSION, "quantizers": quantizers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the quantizers (now if the model is prepared, else at ``setup``)."""
        state = state_dict.get("quantizers") or None
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

    def _set_phase(self, step: int, training: bool) -> None:
        self._phase = self.phase_at(step)
        wanted = (self._phase != PHASE_FLOAT, training and self._phase == PHASE_OBSERVING)
        if wanted != self._applied:  # walking every module each step would cost large models real time
            set_qat_phase(self._model, fake_quant=wanted[0], observe=wanted[1])
            self._applied = wanted


@rank_zero_only
def _export_on_rank_zero(pl_module: LightningModule, path: str) -> None:
    written = export_onnx(pl_module, path, _example_input(pl_module))
    rank_zero_info(f"Wrote the int8 ONNX model to {written} ({written.stat().st_size:,} bytes)")


def default_model_input(batch: Any) -> Any:
    """The model input of a batch: its first element if it is a tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, tuple | list) else batch


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 32,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    fold_bn: bool = True,
    model_input: Callable[[Any], Any] = default_model_input,
) -> nn.Module:
    """Post-training quantization: prepare ``model`` in place and calibrate its activation ranges on data.

    The model runs in eval mode on up to ``num_batches`` batches; each quantizer keeps the overall min and max it
    sees. Afterwards fake quantization is on, and ``export_onnx(model, ...)`` writes the int8 model.

    Args:
        model: The trained float model.
        batches: An iterable of batches, e.g. a DataLoader.
        num_batches: How many batches to calibrate on.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
        model_input: Picks the model input out of a batch (default: the first element of a tuple/list).

    Returns:
        The same ``model``, prepared and calibrated.
    """
    validate_int("num_batches", num_batches, 1)
    if not isinstance(batches, Iterable) or isinstance(batches, torch.Tensor):
        raise TypeError(f"`batches` must be an iterable of batches such as a DataLoader, got {type(batches).__name__}")
    prepare_qat_(model, include, exclude, fold_bn)
    quantizers = list(activation_quantizers(model).values())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    set_qat_phase(model, fake_quant=False, observe=True)
    seen = 0
    for seen, batch in enumerate(batches, start=1):
        inputs = model_input(batch)
        if isinstance(inputs, dict):
            model(**{k: v.to(device) for k, v in inputs.items()})
        elif isinstance(inputs, tuple):
            model(*[t.to(device) for t in inputs])
        else:
            model(inputs.to(device))
        update_ranges(quantizers, observed_ranges(quantizers), averaging_constant=None)
        if seen >= num_batches:
            break
    if seen == 0:
        raise ValueError("`batches` yielded no batch to calibrate on")
    set_qat_phase(model, fake_quant=True, observe=False)
    model.train(was_training)
    return model


class PostTrainingQuantization(Callback):
    """At the end of fit, calibrate an int8 copy of the trained model on training batches and export it to ONNX.

    The trained model is not changed. Use it without ``QuantizationAwareTraining`` when quantizing after the fact
    is accurate enough; it gives the same kind of int8 ONNX model.

    Args:
        export_path: Where rank 0 writes the int8 ONNX model (needs the module's ``example_input_array``).
        calibration_batches: How many training batches calibrate the activation ranges.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
    """

    def __init__(
        self,
        export_path: str,
        calibration_batches: int = 32,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fold_bn: bool = True,
    ) -> None:
        if export_path is None:
            raise ValueError("`export_path` must be a path ending in '.onnx', got None")
        _check_export_path(export_path)
        validate_int("calibration_batches", calibration_batches, 1)
        validate_bool("fold_bn", fold_bn)
        self.export_path = export_path
        self.calibration_batches = calibration_batches
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.fold_bn = fold_bn

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail early when the model cannot be traced."""
        _require_example_input(pl_module, type(self).__name__)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate a copy on training batches and export it (rank 0)."""
        if not trainer.is_global_zero:
            return
        copy_of_model = copy.deepcopy(pl_module)
        calibrate_(
            copy_of_model,
            trainer.train_dataloader,
            self.calibration_batches,
            self.include,
            self.exclude,
            self.fold_bn,
        )
        _export_on_rank_zero(copy_of_model, self.export_path)

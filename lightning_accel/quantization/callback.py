"""Deprecated: the callbacks moved to ``quantization.qat``/``quantization.ptq``, calibration to ``calibration``."""

from lightning_accel._deprecated import forward_module

_QAT = {"QuantizationAwareTraining", "PHASE_FLOAT", "PHASE_OBSERVING", "PHASE_FROZEN"}
_PTQ = {"PostTrainingQuantization"}
_CALIBRATION = {"calibrate_", "batch_picker", "default_model_input", "run_model", "check_batches", "CHECK_SAMPLES"}
_hooks = {
    **dict.fromkeys(_QAT, forward_module(__name__, "lightning_accel.quantization.qat", _QAT)),
    **dict.fromkeys(_PTQ, forward_module(__name__, "lightning_accel.quantization.ptq", _PTQ)),
    **dict.fromkeys(_CALIBRATION, forward_module(__name__, "lightning_accel.quantization.calibration", _CALIBRATION)),
}


def __getattr__(name: str):
    if name not in _hooks:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _hooks[name](name)

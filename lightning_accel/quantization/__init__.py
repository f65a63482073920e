"""Int8 quantization: fake-quant preparation, calibration and the QAT/PTQ callbacks.

The int8 ONNX export and its check are built by the deploy stage (:mod:`lightning_accel.deploy`).
"""

from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_accel.quantization.prepare import (
    activation_quantizers,
    is_prepared,
    prepare_qat_,
    quantized_modules,
    set_qat_phase,
)
from lightning_accel.quantization.ptq import PostTrainingQuantization
from lightning_accel.quantization.qat import QuantizationAwareTraining
from lightning_accel.quantization.restore import load_quantized

__all__ = [
    "ActivationFakeQuant",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "WeightFakeQuant",
    "activation_quantizers",
    "calibrate_",
    "is_prepared",
    "load_quantized",
    "prepare_qat_",
    "quantized_modules",
    "set_qat_phase",
]

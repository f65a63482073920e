"""Int8 quantization: prepare (fake quantization), calibrate, convert (the deployable copy), export, callbacks."""

from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.convert import as_evaluated, to_deployable
from lightning_accel.quantization.export import export_onnx, export_onnx_checked
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
    "as_evaluated",
    "calibrate_",
    "export_onnx",
    "export_onnx_checked",
    "is_prepared",
    "load_quantized",
    "prepare_qat_",
    "quantized_modules",
    "set_qat_phase",
    "to_deployable",
]

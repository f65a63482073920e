"""Int8 quantization: fake-quant preparation, calibration, the QAT/PTQ callbacks and ONNX export."""

from lightning_accel.quantization.callback import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    calibrate_,
)
from lightning_accel.quantization.check import ExportCheck, check_onnx
from lightning_accel.quantization.export import as_evaluated, export_onnx, store_int8_weights, to_deployable
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_accel.quantization.prepare import (
    activation_quantizers,
    is_prepared,
    prepare_qat_,
    quantized_modules,
    set_qat_phase,
)
from lightning_accel.quantization.restore import load_quantized

__all__ = [
    "ActivationFakeQuant",
    "ExportCheck",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "WeightFakeQuant",
    "activation_quantizers",
    "as_evaluated",
    "calibrate_",
    "check_onnx",
    "export_onnx",
    "is_prepared",
    "load_quantized",
    "prepare_qat_",
    "quantized_modules",
    "set_qat_phase",
    "store_int8_weights",
    "to_deployable",
]

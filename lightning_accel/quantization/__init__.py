"""Int8 and group-wise int4 quantization: prepare (fake quantization), calibrate, convert, export, callbacks."""

from lightning_accel.quantization.budget import BudgetResult, quantize_within_budget
from lightning_accel.quantization.budget_int4 import BudgetData, weight_only_within_budget
from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.convert import as_evaluated, to_deployable
from lightning_accel.quantization.export import export_onnx, export_onnx_checked
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_accel.quantization.groupwise_qat import group_qat_to_deployable, prepare_group_qat_
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
from lightning_accel.quantization.sensitivity import Sensitivity, int8_sensitivity
from lightning_accel.quantization.weight_only import (
    GroupQuantizedLinear,
    WeightOnlySettings,
    export_weight_only_onnx,
    quantize_weights,
)

__all__ = [
    "ActivationFakeQuant",
    "BudgetData",
    "BudgetResult",
    "GroupQuantizedLinear",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "Sensitivity",
    "WeightFakeQuant",
    "WeightOnlySettings",
    "activation_quantizers",
    "as_evaluated",
    "calibrate_",
    "export_onnx",
    "export_onnx_checked",
    "export_weight_only_onnx",
    "group_qat_to_deployable",
    "int8_sensitivity",
    "is_prepared",
    "load_quantized",
    "prepare_group_qat_",
    "prepare_qat_",
    "quantize_weights",
    "quantize_within_budget",
    "quantized_modules",
    "set_qat_phase",
    "to_deployable",
    "weight_only_within_budget",
]

"""lightning_accel: Lightning callbacks that make training faster and models smaller and faster."""

from lightning_accel.cli import AccelCLI, build_cli
from lightning_accel.deploy import Artifact, Contribution, Deployment, build_artifacts
from lightning_accel.distillation import Distillation
from lightning_accel.export.check import ExportCheck, check_onnx
from lightning_accel.export.decoder import export_decoder_onnx
from lightning_accel.export.half import save_half
from lightning_accel.export.program import export_program
from lightning_accel.export.sparse import load_sparse, load_sparse_, save_sparse
from lightning_accel.precision import MixedPrecision, NonFiniteLossError, choose_precision
from lightning_accel.pruning import (
    ChannelGroups,
    HeadPrunedMultiheadAttention,
    MagnitudePruning,
    apply_masks_,
    compute_masks,
    export_slim,
    find_channel_groups,
    mask_sparsity,
    slim,
    sparsity_at,
    tensor_sparsity,
    wanda_masks,
)
from lightning_accel.quantization import (
    BudgetData,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    as_evaluated,
    calibrate_,
    export_onnx,
    export_weight_only_onnx,
    group_qat_to_deployable,
    int8_sensitivity,
    load_quantized,
    prepare_group_qat_,
    quantize_weights,
    quantize_within_budget,
    weight_only_within_budget,
)
from lightning_accel.report import AccelerationReport, build_report, count_macs

__version__ = "0.1.0.dev0"

__all__ = [
    "AccelCLI",
    "AccelerationReport",
    "Artifact",
    "BudgetData",
    "ChannelGroups",
    "Contribution",
    "Deployment",
    "Distillation",
    "ExportCheck",
    "HeadPrunedMultiheadAttention",
    "MagnitudePruning",
    "MixedPrecision",
    "NonFiniteLossError",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "__version__",
    "apply_masks_",
    "as_evaluated",
    "build_artifacts",
    "build_cli",
    "build_report",
    "calibrate_",
    "check_onnx",
    "choose_precision",
    "compute_masks",
    "count_macs",
    "export_decoder_onnx",
    "export_onnx",
    "export_program",
    "export_slim",
    "export_weight_only_onnx",
    "find_channel_groups",
    "group_qat_to_deployable",
    "int8_sensitivity",
    "load_quantized",
    "load_sparse",
    "load_sparse_",
    "mask_sparsity",
    "prepare_group_qat_",
    "quantize_weights",
    "quantize_within_budget",
    "save_half",
    "save_sparse",
    "slim",
    "sparsity_at",
    "tensor_sparsity",
    "wanda_masks",
    "weight_only_within_budget",
]

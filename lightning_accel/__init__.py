"""lightning_accel: Lightning callbacks that make training faster and models smaller and faster."""

from lightning_accel.cli import AccelCLI, build_cli
from lightning_accel.precision import MixedPrecision, NonFiniteLossError, choose_precision
from lightning_accel.pruning import (
    MagnitudePruning,
    apply_masks_,
    compute_masks,
    mask_sparsity,
    sparsity_at,
    tensor_sparsity,
)
from lightning_accel.quantization import (
    ExportCheck,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    calibrate_,
    check_onnx,
    export_onnx,
    load_quantized,
)
from lightning_accel.report_callback import AccelerationReport, build_report
from lightning_accel.sparse import load_sparse, load_sparse_, save_sparse

__version__ = "0.1.0.dev0"

__all__ = [
    "AccelCLI",
    "AccelerationReport",
    "ExportCheck",
    "MagnitudePruning",
    "MixedPrecision",
    "NonFiniteLossError",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "__version__",
    "apply_masks_",
    "build_cli",
    "build_report",
    "calibrate_",
    "check_onnx",
    "choose_precision",
    "compute_masks",
    "export_onnx",
    "load_quantized",
    "load_sparse",
    "load_sparse_",
    "mask_sparsity",
    "save_sparse",
    "sparsity_at",
    "tensor_sparsity",
]

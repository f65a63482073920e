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
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AccelCLI",
    "ExportCheck",
    "MagnitudePruning",
    "MixedPrecision",
    "NonFiniteLossError",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "__version__",
    "apply_masks_",
    "build_cli",
    "calibrate_",
    "check_onnx",
    "choose_precision",
    "compute_masks",
    "export_onnx",
    "mask_sparsity",
    "sparsity_at",
    "tensor_sparsity",
]

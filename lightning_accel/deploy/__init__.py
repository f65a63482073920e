"""Deploy: every artifact of a trained model, built once and checked once.

The techniques (``precision``, ``pruning``, ``quantization``) declare what they contribute; this package turns the
trained model into files: fp32 and int8 ONNX, the slim model (ONNX or ``.pt2``), the half-precision state dict and
the compressed sparse file, each checked against the model that was evaluated.
"""

from lightning_accel.deploy.attention import HeadPrunedMultiheadAttention
from lightning_accel.deploy.check import ExportCheck, check_onnx
from lightning_accel.deploy.half import save_half, state_dict_bytes
from lightning_accel.deploy.int8 import as_evaluated, check_rewrite, to_deployable
from lightning_accel.deploy.onnx import export_onnx, export_onnx_checked, store_int8_weights
from lightning_accel.deploy.program import export_program
from lightning_accel.deploy.slim import export_slim, slim
from lightning_accel.deploy.sparse import load_sparse, load_sparse_, save_sparse
from lightning_accel.deploy.stage import (
    Artifact,
    Contribution,
    Deployment,
    build_artifacts,
    deploy_for_trainer,
    forget_deployment,
)

__all__ = [
    "Artifact",
    "Contribution",
    "Deployment",
    "ExportCheck",
    "HeadPrunedMultiheadAttention",
    "as_evaluated",
    "build_artifacts",
    "check_onnx",
    "check_rewrite",
    "deploy_for_trainer",
    "export_onnx",
    "export_onnx_checked",
    "export_program",
    "export_slim",
    "forget_deployment",
    "load_sparse",
    "load_sparse_",
    "save_half",
    "save_sparse",
    "slim",
    "state_dict_bytes",
    "store_int8_weights",
    "to_deployable",
]

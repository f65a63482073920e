"""Deploy: every artifact of a trained model, built once and checked once.

The techniques (``precision``, ``pruning``, ``quantization``) declare what they contribute; this package turns the
trained model into files: fp32 and int8 ONNX, the slim model (ONNX or ``.pt2``), the half-precision state dict and
the compressed sparse file, each checked against the model that was evaluated. Importing it installs the stage
that the deploying callbacks' fit hooks run.
"""

from lightning_accel._core.stage import Contribution
from lightning_accel.deploy.compose import slim_evaluated
from lightning_accel.deploy.stage import Artifact, Deployment, build_artifacts, deploy_for_trainer, install

install()

__all__ = ["Artifact", "Contribution", "Deployment", "build_artifacts", "deploy_for_trainer", "slim_evaluated"]

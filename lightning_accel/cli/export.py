"""``lightning-accel export``: every artifact and the report from a finished run's checkpoint, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_accel._core.files import resolve_artifact_path
from lightning_accel._core.stage import Contribution
from lightning_accel.deploy.stage import contributions_of
from lightning_accel.quantization import QuantizationAwareTraining
from lightning_accel.quantization.prepare import is_prepared
from lightning_accel.quantization.restore import load_quantized, quantization_state
from lightning_accel.report.build import build_report, print_table
from lightning_accel.report.callback import AccelerationReport
from lightning_accel.report.markdown import write_report


class ArtifactTrainer(Trainer):
    """Lightning's Trainer plus ``export``, which the ``lightning-accel export`` subcommand runs."""

    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Write every artifact of a trained model, and its acceleration report, from a checkpoint.

        The run's callbacks (from its config) are restored from the checkpoint by Lightning itself, in a
        validation run: weights and every callback's state, and each callback's setup (QAT prepares the model and
        loads its quantizers, channel pruning traces its groups). Each callback then contributes what it would have
        at the end of fit (pruning's channel groups: the slim model; QAT's int8 model; the precision trained in),
        and the deploy stage builds every artifact. A checkpoint with QAT state whose config has no QAT section is
        quantized from that state (:func:`~lightning_accel.load_quantized`). Artifacts and ``report.md``/
        ``report.json`` go to the ``AccelerationReport`` section's directory, or ``export/`` under the log
        directory.

        Args:
            model: The model (from the run's config).
            datamodule: The data (from the run's config), for validation batches.
            ckpt_path: The checkpoint of the finished run.

        Returns:
            The report.
        """
        if ckpt_path is None:
            raise ValueError("`ckpt_path` must name the checkpoint to export, e.g. --ckpt_path path/to/last.ckpt")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        has_qat = any(isinstance(c, QuantizationAwareTraining) for c in self.callbacks)
        if quantization_state(checkpoint) is not None and not has_qat:
            load_quantized(model, ckpt_path)
        self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        contributions = [
            *_trained_precision(checkpoint),  # first: what the run trained in, whatever this config says
            *(c for c in contributions_of(self.callbacks, self, model) if c.report_directory is None),
        ]
        if not has_qat and is_prepared(model):
            contributions.append(Contribution(owner="QuantizationAwareTraining", int8_model=lambda: model))
        report_callback = next((c for c in self.callbacks if isinstance(c, AccelerationReport)), None)
        directory = resolve_artifact_path(self, report_callback.directory if report_callback else "export")
        loader = None
        if datamodule is not None:
            datamodule.setup("validate")
            loader = datamodule.val_dataloader()
        max_batches = report_callback.max_batches if report_callback else 20
        latency = report_callback.latency if report_callback else True
        generation = report_callback.generation if report_callback else latency
        report = build_report(
            self,
            model,
            directory,
            latency=latency,
            max_batches=max_batches,
            loader=loader,
            contributions=contributions,
            generation=generation,
        )
        markdown_path = write_report(report, directory)[1]
        print_table(report)
        rank_zero_info(f"lightning-accel export: wrote the artifacts and {markdown_path} from {Path(ckpt_path).name}")
        return report


def _trained_precision(checkpoint: dict[str, Any]) -> list[Contribution]:
    """The precision the run trained in, from ``MixedPrecision``'s saved state (it records the one it used)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("MixedPrecision") and isinstance(state, dict) and state.get("precision"):
            return [Contribution(owner="MixedPrecision", precision=str(state["precision"]))]
    return []

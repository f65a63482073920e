"""Logging the callbacks' settings and summaries: hyperparameters merged with the model's, and text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import LightningModule, Trainer


def add_hyperparameters(
    trainer: Trainer,
    pl_module: LightningModule,
    settings: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Log ``settings`` merged with the model's hyperparameters and everything logged before.

    TensorBoard's HParams tab keeps only the last hyperparameter summary of a run, so logging our two settings
    alone would hide the model's. Merging keeps them all; ``metrics`` become the HParams metrics.
    """
    for logger in trainer.loggers:
        merged = {**dict(pl_module.hparams), **dict(getattr(logger, "hparams", None) or {}), **settings}
        if metrics:
            logger.log_hyperparams(merged, metrics=dict(metrics))
        else:
            logger.log_hyperparams(merged)


def log_text(trainer: Trainer, tag: str, text: str) -> None:
    """Write ``text`` under ``tag`` to every logger that takes text (TensorBoard's Text tab); others skip it."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, trainer.global_step)

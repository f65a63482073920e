"""Adding the callbacks' settings to the logged hyperparameters without replacing the model's."""

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

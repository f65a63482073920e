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

    Merging keeps the model's hyperparameters beside ours; ``metrics`` become the HParams metrics. TensorBoard's
    HParams plugin reads the metric *names* of a run from its first hyperparameter summary only, and their values
    from the scalars: so every call also names the metrics that callbacks in the Trainer declare
    (``declared_metrics``, e.g. the report's), with NaN until their real values are logged.
    """
    declared = {
        name: float("nan") for callback in trainer.callbacks for name in getattr(callback, "declared_metrics", ())
    }
    metrics = {**declared, **dict(metrics or {})}
    for logger in trainer.loggers:
        merged = {**dict(pl_module.hparams), **dict(getattr(logger, "hparams", None) or {}), **settings}
        if metrics:
            logger.log_hyperparams(merged, metrics=metrics)
        else:
            logger.log_hyperparams(merged)


def log_text(trainer: Trainer, tag: str, text: str) -> None:
    """Write ``text`` under ``tag`` to every logger that takes text (TensorBoard's Text tab); others skip it."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, trainer.global_step)


def selection_tag(owner: str, include: Any = None, exclude: Any = None) -> str:
    """A readable logger tag for a callback's selection summary: ``lightning_accel/selection/MagnitudePruning``.

    Two instances in one Trainer differ by their patterns, which the tag then names
    (``.../MagnitudePruning/include=net.fc1``), instead of a dict repr.
    """
    parts = [f"lightning_accel/selection/{owner}"]
    for name, patterns in (("include", include), ("exclude", exclude)):
        if patterns:
            parts.append(f"{name}=" + ",".join(str(p) for p in patterns))
    return "/".join(parts)

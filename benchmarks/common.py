"""Shared pieces of the benchmarks: timing fits side by side on the digits example."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from lightning import Callback, Trainer, seed_everything

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel.report.measure import cpu_description as cpu_info
from lightning_accel.report.measure import describe_cpu


class TrainTimer(Callback):
    """Wall time from the first to the last training batch (setup and validation excluded)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self._start


def quiet_trainer(**kwargs) -> Trainer:
    """A Trainer without logger, checkpoints, progress bar or validation, for timing."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return Trainer(**(defaults | kwargs))


def digits_task():
    """The digits CNN and its data module: the default workload."""
    return DigitsClassifier(), DigitsDataModule()


def seconds_per_step(make_callbacks, steps: int, make_task=digits_task, **trainer_kwargs) -> float:
    """Train ``make_task()``'s model for ``steps`` optimizer steps and return the seconds per step."""
    seed_everything(0, verbose=False)
    timer = TrainTimer()
    trainer = quiet_trainer(max_steps=steps, callbacks=[*make_callbacks(), timer], **trainer_kwargs)
    model, data = make_task()
    trainer.fit(model, datamodule=data)
    return timer.seconds / steps


def interleaved_ratio(
    make_candidate, make_reference, steps: int, repeats: int, make_task=digits_task, **trainer_kwargs
) -> tuple[float, float, float]:
    """Time candidate and reference alternately ``repeats`` times; return (candidate s/step, reference s/step, ratio).

    Alternating the two keeps drift in machine load from favouring either side. The ratio is the median of the
    ratios of adjacent pairs (each candidate run against the reference run just before it), which cancels slow
    drift better than the ratio of the two medians; the times are the medians.
    """

    def time_one(make_callbacks, n):
        return seconds_per_step(make_callbacks, n, make_task, **trainer_kwargs)

    time_one(make_reference, max(1, steps // 4))  # warm-up: first-call allocations, thread pools, kernels
    candidate, reference = [], []
    for _ in range(repeats):
        reference.append(time_one(make_reference, steps))
        candidate.append(time_one(make_candidate, steps))
    c, r = statistics.median(candidate), statistics.median(reference)
    return c, r, statistics.median(a / b for a, b in zip(candidate, reference, strict=True))


def cpu_description() -> str:
    """The CPU model, its int8 instruction sets and the threads used (the same line the report prints)."""
    return describe_cpu(cpu_info())


#: Threads every benchmark uses (the machines this project runs on have 2 cores).
THREADS = 2


@dataclass
class Section:
    """One benchmark's result: a title, its Markdown table(s) and the same figures as plain data."""

    title: str
    markdown: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The section for RESULTS.json."""
        return {"title": self.title, "data": self.data}


def goal(value: float, target: float, better: str = "lower") -> str:
    """Mark a figure against its goal: 'met' or 'MISSED', never tuned away."""
    met = value <= target if better == "lower" else value >= target
    return "met" if met else "**MISSED**"

"""The QAT training step under torch.compile, against compiled fp32 (and the same pair in eager mode).

Lightning users compile (``trainer.fit(torch.compile(model))``). The digits CNN trains through a Lightning Trainer
with and without ``QuantizationAwareTraining`` (observing from the first step), compiled and eager; the step time
is measured after a warm-up that covers compilation, with the two contenders of a pair alternating.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from lightning import Callback, seed_everything

from benchmarks.common import Section, goal, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import QuantizationAwareTraining


class _Quiet(DigitsClassifier):
    """The digits model without ``self.log`` in its training step (Lightning's logging does not trace)."""

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)


class StepTimer(Callback):
    """Seconds per training step after ``warmup`` steps (compilation and first-call costs excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def step_seconds(compiled: bool, qat: bool, steps: int, warmup: int) -> float:
    seed_everything(0, verbose=False)
    model = _Quiet()
    timer = StepTimer(warmup)
    callbacks = [timer] + ([QuantizationAwareTraining(log_ranges=False)] if qat else [])
    trainer = quiet_trainer(max_steps=steps + warmup, callbacks=callbacks)
    trainer.fit(torch.compile(model) if compiled else model, datamodule=DigitsDataModule())
    return statistics.median(timer.times)


def run(quick: bool) -> list[Section]:
    if quick:  # compiling four Trainer runs takes longer than the rest of the smoke run
        return [
            Section("QAT step under torch.compile", "Skipped in --quick: run `python -m benchmarks compile`.\n", {})
        ]
    steps, warmup, repeats = 60, 15, 3
    ratios, seconds = {}, {}
    for compiled in (False, True):
        pairs = []
        for _ in range(repeats):  # alternate the two, so that drift in machine load favours neither
            reference = step_seconds(compiled, qat=False, steps=steps, warmup=warmup)
            candidate = step_seconds(compiled, qat=True, steps=steps, warmup=warmup)
            pairs.append((candidate, reference))
        label = "compiled" if compiled else "eager"
        seconds[label] = {
            "qat_ms": statistics.median(c for c, _ in pairs) * 1e3,
            "fp32_ms": statistics.median(r for _, r in pairs) * 1e3,
        }
        ratios[label] = statistics.median(c / r for c, r in pairs)
    lines = [
        f"Digits CNN, batch 64, Lightning Trainer, median step after {warmup} warm-up steps, {repeats} alternating "
        "pair(s).",
        "",
        "| mode | fp32 step ms | QAT step ms | QAT / fp32 |",
        "| --- | --- | --- | --- |",
    ]
    for label in ("eager", "compiled"):
        row = seconds[label]
        lines.append(f"| {label} | {row['fp32_ms']:.2f} | {row['qat_ms']:.2f} | {ratios[label]:.2f}x |")
    lines += [
        "",
        f"- QAT step under compile <= 1.2x compiled fp32: {ratios['compiled']:.2f}x, {goal(ratios['compiled'], 1.2)}",
    ]
    return [Section("QAT step under torch.compile", "\n".join(lines) + "\n", {"seconds": seconds, "ratios": ratios})]

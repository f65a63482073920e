"""All together on digits: AMP + pruning + QAT (the demo's recipe) against the dense fp32 baseline."""

from __future__ import annotations

import tempfile

from lightning import seed_everything

from benchmarks.common import Section, TrainTimer, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import MagnitudePruning, MixedPrecision, QuantizationAwareTraining, build_report


def fit_and_report(callbacks, epochs: int, directory: str) -> dict:
    """Train, test, and measure the artifacts with the same code as AccelerationReport."""
    seed_everything(0, verbose=False)
    timer = TrainTimer()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, timer], deterministic=True)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    report = build_report(trainer, model, directory, latency=True, max_batches=5, loader=data.val_dataloader())
    return {"train_seconds": timer.seconds, "test_accuracy": accuracy, "report": report}


def run(quick: bool) -> list[Section]:
    """Training time, artifact sizes, int8 latency and accuracy of the combined recipe and of the baseline."""
    epochs = 3 if quick else 12
    with tempfile.TemporaryDirectory() as directory:
        baseline = fit_and_report([], epochs, f"{directory}/baseline")
        combined = fit_and_report(
            [
                MixedPrecision("auto"),
                MagnitudePruning(0.9),
                QuantizationAwareTraining(start_step=0.667, freeze_bn_step=0.834, freeze_observers_step=0.917),
            ],
            epochs,
            f"{directory}/combined",
        )
    sizes = combined["report"]["sizes"]
    latency = combined["report"]["latency_ms"]
    base_latency = baseline["report"]["latency_ms"]
    lines = [
        f"Digits CNN, {epochs} epochs each, run one after the other. Precision chosen by `auto`: "
        f"{combined['report']['precision']}.",
        "",
        "| | dense fp32 baseline | AMP + 90% pruning + QAT |",
        "| --- | --- | --- |",
        f"| training time | {baseline['train_seconds']:.1f} s | {combined['train_seconds']:.1f} s "
        f"({combined['train_seconds'] / baseline['train_seconds']:.2f}x) |",
        f"| test accuracy | {baseline['test_accuracy']:.4f} | {combined['test_accuracy']:.4f} |",
        f"| fp32 state dict | {baseline['report']['sizes']['fp32 state dict']['bytes']:,} B | "
        f"{sizes['fp32 state dict']['bytes']:,} B |",
        f"| int8 ONNX | | {sizes['int8 ONNX']['bytes']:,} B |",
        f"| sparse int8 artifact | {baseline['report']['sizes']['sparse int8']['bytes']:,} B | "
        f"{sizes['sparse int8']['bytes']:,} B |",
    ]
    for batch in latency:
        lines.append(
            f"| {batch}: ORT fp32 / ORT int8 | {base_latency[batch]['ORT fp32']:.3f} ms / n/a | "
            f"{latency[batch]['ORT fp32']:.3f} ms / {latency[batch]['ORT int8']:.3f} ms |"
        )
    data = {
        name: {
            "train_seconds": r["train_seconds"],
            "test_accuracy": r["test_accuracy"],
            "sizes": r["report"]["sizes"],
            "latency_ms": r["report"]["latency_ms"],
        }
        for name, r in (("baseline", baseline), ("combined", combined))
    }
    return [Section("All together on digits", "\n".join(lines) + "\n", data)]

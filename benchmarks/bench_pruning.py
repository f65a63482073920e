"""MagnitudePruning: per-step overhead with the defaults, and final sparsity against Lightning's ModelPruning.

Both figures come from one run on the digits example (``python -m benchmarks pruning``).
"""

from __future__ import annotations

import logging
import platform
import warnings

import torch
from lightning import seed_everything
from lightning.pytorch.callbacks import ModelPruning

from benchmarks.common import interleaved_ratio, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import MagnitudePruning, tensor_sparsity

EPOCHS = 12


def prunable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Linear and Conv weights: what both callbacks prune."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def train_and_test(callbacks) -> tuple[float, float]:
    """Train the digits CNN for EPOCHS epochs with ``callbacks``; return (sparsity, test accuracy)."""
    seed_everything(0, verbose=False)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=callbacks, deterministic=True)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return tensor_sparsity(prunable_weights(model)), accuracy


def main() -> None:
    """Print both tables."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")

    pruned_s, dense_s, ratio = interleaved_ratio(
        lambda: [MagnitudePruning(0.9, end_step=150)], lambda: [], steps=200, repeats=5
    )
    print("\n| training step (digits CNN, batch 64) | ms/step |")
    print("| --- | --- |")
    print(f"| dense, no callback | {dense_s * 1e3:.2f} |")
    print(f"| MagnitudePruning(0.9), defaults | {pruned_s * 1e3:.2f} |")
    print(f"| overhead | {(ratio - 1) * 100:+.1f}% |")

    rows = [
        ("dense baseline", []),
        ("MagnitudePruning(target_sparsity=0.9)", [MagnitudePruning(0.9)]),
        (
            "ModelPruning('l1_unstructured', amount=0.9, global)",
            [
                ModelPruning(
                    "l1_unstructured", amount=0.9, parameter_names=["weight"], use_global_unstructured=True, verbose=0
                )
            ],
        ),
    ]
    print(f"\n| {EPOCHS} epochs on digits, asked for 90% | final sparsity | test accuracy |")
    print("| --- | --- | --- |")
    for name, callbacks in rows:
        sparsity, accuracy = train_and_test(callbacks)
        print(f"| {name} | {sparsity:.2%} | {accuracy:.4f} |", flush=True)


if __name__ == "__main__":
    main()

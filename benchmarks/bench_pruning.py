"""MagnitudePruning against Lightning's ModelPruning on digits: sparsity reached, accuracy, overhead, resume."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from lightning import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning

from benchmarks.common import Section, goal, interleaved_ratio, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import MagnitudePruning, tensor_sparsity

LEVELS = (0.5, 0.75, 0.9, 0.95)


def prunable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Linear and Conv weights: what both callbacks prune (ModelPruning's reparametrised weight included)."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def ours(level: float) -> list[Callback]:
    return [MagnitudePruning(level)]


def lightnings(level: float) -> list[Callback]:
    return [ModelPruning("l1_unstructured", amount=level, use_global_unstructured=True, verbose=0)]


def train_and_test(callbacks: list[Callback], epochs: int) -> tuple[float, float]:
    """Train the digits CNN with ``callbacks``; return (sparsity, test accuracy)."""
    seed_everything(0, verbose=False)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, deterministic=True)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    return tensor_sparsity(prunable_weights(model)), accuracy


class SparsityAfterFirstStep(Callback):
    """The sparsity after the first optimizer step of a (resumed) fit."""

    def __init__(self) -> None:
        self.value: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.value is None:
            self.value = tensor_sparsity(prunable_weights(pl_module))


def resume_survival(make_callbacks, epochs: int, resume_epoch: int) -> dict[str, float]:
    """Sparsity at the checkpoint, right after resuming from it, and at the end against an uninterrupted run."""
    with tempfile.TemporaryDirectory() as directory:
        seed_everything(0, verbose=False)
        checkpoints = ModelCheckpoint(dirpath=directory, save_top_k=-1, filename="{epoch}")
        trainer = quiet_trainer(
            max_epochs=epochs, callbacks=[*make_callbacks(), checkpoints], enable_checkpointing=True
        )
        model = DigitsClassifier()
        trainer.fit(model, datamodule=DigitsDataModule())
        uninterrupted = tensor_sparsity(prunable_weights(model))
        path = Path(directory) / f"epoch={resume_epoch - 1}.ckpt"
        saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        at_checkpoint = sum(int((v == 0).sum()) for k, v in saved.items() if k.endswith("weight") and v.dim() > 1)
        at_checkpoint /= sum(v.numel() for k, v in saved.items() if k.endswith("weight") and v.dim() > 1)
        seed_everything(0, verbose=False)
        probe = SparsityAfterFirstStep()
        resumed_trainer = quiet_trainer(max_epochs=epochs, callbacks=[*make_callbacks(), probe])
        resumed = DigitsClassifier()
        resumed_trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=path)
        return {
            "at_checkpoint": at_checkpoint,
            "after_first_resumed_step": probe.value,
            "final_resumed": tensor_sparsity(prunable_weights(resumed)),
            "final_uninterrupted": uninterrupted,
        }


def run(quick: bool) -> list[Section]:
    """Overhead, the sparsity/accuracy table at four targets, and resume survival."""
    steps, repeats = (60, 3) if quick else (150, 11)
    pruned_s, dense_s, ratio = interleaved_ratio(
        lambda: [MagnitudePruning(0.9, end_step=steps * 3 // 4)], lambda: [], steps=steps, repeats=repeats
    )
    overhead = Section(
        "Pruning: per-step overhead",
        "| training step (digits CNN, batch 64) | ms/step |\n| --- | --- |\n"
        f"| dense, no callback | {dense_s * 1e3:.2f} |\n"
        f"| MagnitudePruning(0.9), defaults | {pruned_s * 1e3:.2f} |\n"
        f"| ratio (goal <= 1.03x) | {ratio:.3f}x, {goal(ratio, 1.03)} |\n",
        {"dense_ms": dense_s * 1e3, "pruned_ms": pruned_s * 1e3, "ratio": ratio},
    )

    epochs = 3 if quick else 12
    levels = (0.9,) if quick else LEVELS
    _, dense_accuracy = train_and_test([], epochs)
    lines = [
        f"Digits CNN, {epochs} epochs, asked for each target. Dense baseline: test accuracy {dense_accuracy:.4f}.",
        "",
        "| target | MagnitudePruning sparsity | its test accuracy | ModelPruning sparsity | its test accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    data = {"epochs": epochs, "dense_accuracy": dense_accuracy, "levels": {}}
    for level in levels:
        our_sparsity, our_accuracy = train_and_test(ours(level), epochs)
        their_sparsity, their_accuracy = train_and_test(lightnings(level), epochs)
        lines.append(
            f"| {level:.0%} | {our_sparsity:.2%} | {our_accuracy:.4f} | {their_sparsity:.2%} | {their_accuracy:.4f} |"
        )
        data["levels"][str(level)] = {
            "ours": {"sparsity": our_sparsity, "accuracy": our_accuracy},
            "model_pruning": {"sparsity": their_sparsity, "accuracy": their_accuracy},
        }
    lines += [
        "",
        "`ModelPruning(amount=s)` prunes `s` of the *remaining* weights every epoch, so its sparsity compounds past "
        "the target; `MagnitudePruning` reaches the target exactly.",
    ]
    table = Section("Pruning: sparsity and accuracy against ModelPruning", "\n".join(lines) + "\n", data)

    resume_epochs, resume_at = (2, 1) if quick else (6, 3)
    survival = {
        "MagnitudePruning(0.9)": resume_survival(lambda: ours(0.9), resume_epochs, resume_at),
        "ModelPruning(0.9)": resume_survival(lambda: lightnings(0.9), resume_epochs, resume_at),
    }
    lines = [
        f"Train {resume_epochs} epochs, checkpointing each; resume a fresh Trainer from the epoch-{resume_at} "
        "checkpoint.",
        "",
        "| callback | sparsity in the checkpoint | after the first resumed step | final (resumed) "
        "| final (uninterrupted) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in survival.items():
        lines.append(
            f"| {name} | {row['at_checkpoint']:.2%} | {row['after_first_resumed_step']:.2%} | "
            f"{row['final_resumed']:.2%} | {row['final_uninterrupted']:.2%} |"
        )
    resume = Section("Pruning: does sparsity survive a resume?", "\n".join(lines) + "\n", survival)
    return [overhead, table, resume]

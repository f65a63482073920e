"""Which layers a global threshold empties: global magnitude, LAMP and per-layer pruning, and Lightning's ModelPruning.

A single magnitude threshold over every layer removes the layers whose weights are small by initialisation or scale
first: a ResNet-50's wide 1x1 convs, a MobileNetV3's squeeze-excite layers, T5's unscaled attention. The models
here are small versions of those shapes, trained dense on digits (or, for T5, on a token-reversal task), then
fine-tuned while pruning to the target from the same dense weights with each ranking. Figures: test accuracy (T5:
validation loss), and the emptiest layer's sparsity.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from benchmarks.common import Section, quiet_trainer
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_accel import MagnitudePruning


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (the wide, small-weight layers), residual."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class BottleneckNet(nn.Module):
    """A ResNet-50-shaped CNN for 8x8 digits: stem, three bottleneck blocks, global pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
        self.blocks = nn.Sequential(*[Bottleneck(128, 32) for _ in range(3)])
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, hardswish."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(
            nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            nn.Hardswish(),
        )
        self.squeeze = nn.Conv2d(expanded, expanded // 4, 1)
        self.excite = nn.Conv2d(expanded // 4, expanded, 1)
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        scale = F.hardsigmoid(self.excite(F.relu(self.squeeze(h.mean(dim=(2, 3), keepdim=True)))))
        return x + self.project(h * scale)


class MobileNetV3Net(nn.Module):
    """A MobileNetV3-shaped CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(24, 96), InvertedResidual(24, 96), InvertedResidual(24, 96))
        self.head = nn.Sequential(nn.Conv2d(24, 192, 1), nn.Hardswish())
        self.fc = nn.Linear(192, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


class Digits(DigitsClassifier):
    """The digits task with another network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and not (isinstance(m, nn.Conv2d) and m.groups > 1)
    }


def _worst_layer(model: nn.Module) -> tuple[str, float]:
    weights = {name: (w.detach() == 0).float().mean().item() for name, w in _prunable(model).items()}
    name = max(weights, key=weights.get)
    return name, weights[name]


def _pruners(target: float, steps: int) -> dict[str, list[Callback]]:
    end = int(steps * 0.75)
    every = max(1, steps // 20)
    return {
        "global magnitude (ours, default)": [MagnitudePruning(target, end_step=end, every_n_steps=every)],
        "LAMP (ours, scope='lamp')": [MagnitudePruning(target, end_step=end, every_n_steps=every, scope="lamp")],
        "per layer (ours, scope='layer')": [MagnitudePruning(target, end_step=end, every_n_steps=every, scope="layer")],
        "Lightning ModelPruning (global L1)": [
            ModelPruning("l1_unstructured", amount=target, use_global_unstructured=True, verbose=0)
        ],
    }


def _digits_rows(make_net: Any, target: float, dense_epochs: int, prune_epochs: int) -> dict[str, Any]:
    seed_everything(0, verbose=False)
    data = DigitsDataModule()
    dense = Digits(make_net())
    trainer = quiet_trainer(max_epochs=dense_epochs, deterministic=True)
    trainer.fit(dense, datamodule=data)
    rows = {"dense": {"accuracy": trainer.test(dense, datamodule=data, verbose=False)[0]["test/acc"]}}
    steps = prune_epochs * len(data.train_dataloader())

    def score(trainer: Any, model: nn.Module) -> dict[str, float]:
        return {"accuracy": trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]}

    return rows | _pruned_rows(dense, target, steps, score, max_epochs=prune_epochs, deterministic=True, data=data)


def _pruned_rows(dense: nn.Module, target: float, steps: int, score: Any, data: Any = None, **trainer: Any) -> dict:
    """Fine-tune a copy of ``dense`` while pruning with each ranking; its score and its emptiest layer."""
    rows = {}
    for label, callbacks in _pruners(target, steps).items():
        seed_everything(0, verbose=False)
        model = copy.deepcopy(dense)
        fitting = quiet_trainer(callbacks=callbacks, **trainer)
        fitting.fit(model, datamodule=data)
        figures = score(fitting, model)
        if isinstance(callbacks[0], ModelPruning):
            callbacks[0].make_pruning_permanent(model)
        worst, sparsity = _worst_layer(model)
        rows[label] = {**figures, "emptiest_layer": worst, "emptiest_sparsity": sparsity}
    return rows


class ReverseT5(LightningModule):
    """A tiny T5 that learns to reverse token sequences: validation loss is the figure."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        config = T5Config(
            vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
        self.t5 = T5ForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 32, (1200, 10), generator=generator)
        self.rows = [{"input_ids": x, "labels": torch.flip(x, [0])} for x in ids]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.t5(**batch).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.t5(**batch).loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.rows[:1000], batch_size=32, shuffle=False)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.rows[1000:], batch_size=100)


def _t5_rows(target: float, dense_epochs: int, prune_epochs: int) -> dict[str, Any]:
    seed_everything(0, verbose=False)
    dense = ReverseT5()
    trainer = quiet_trainer(max_epochs=dense_epochs, limit_val_batches=None)
    trainer.fit(dense)
    rows = {"dense": {"val_loss": trainer.validate(dense, verbose=False)[0]["val_loss"]}}
    steps = prune_epochs * len(dense.train_dataloader())

    def score(trainer: Any, model: nn.Module) -> dict[str, float]:
        return {"val_loss": trainer.validate(model, verbose=False)[0]["val_loss"]}

    return rows | _pruned_rows(dense, target, steps, score, max_epochs=prune_epochs, limit_val_batches=None)


def run(quick: bool) -> list[Section]:
    dense_epochs, prune_epochs = (1, 1) if quick else (12, 8)
    results = {
        "ResNet-50-shaped (bottleneck) at 90%": _digits_rows(BottleneckNet, 0.9, dense_epochs, prune_epochs),
        "MobileNetV3-shaped (depthwise, squeeze-excite) at 90%": _digits_rows(
            MobileNetV3Net, 0.9, dense_epochs, prune_epochs
        ),
        "T5 (token reversal) at 50%": _t5_rows(0.5, dense_epochs, prune_epochs),
    }
    lines = [
        f"Dense training {dense_epochs} epochs, then {prune_epochs} epochs of fine-tuning while pruning (cubic "
        "schedule to 75% of the steps) from the same dense weights. Depthwise convs stay dense under unstructured "
        "pruning in ours (ModelPruning prunes them). Emptiest layer: the largest zero fraction of any pruned weight.",
        "",
        "| model | ranking | test accuracy (T5: validation loss) | emptiest layer |",
        "| --- | --- | --- | --- |",
    ]
    for model, rows in results.items():
        for label, row in rows.items():
            figure = f"{row['accuracy']:.4f}" if "accuracy" in row else f"{row['val_loss']:.3f}"
            worst = f"{row['emptiest_layer']} {row['emptiest_sparsity']:.1%}" if "emptiest_layer" in row else ""
            lines.append(f"| {model} | {label} | {figure} | {worst} |")
    return [
        Section(
            "Pruning: global, LAMP and per-layer ranking on the shapes that empty layers",
            "\n".join(lines) + "\n",
            results,
        )
    ]

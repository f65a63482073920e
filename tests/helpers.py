"""Tiny models, data and callbacks shared by the tests (importable, so that ddp_spawn workers can unpickle them)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """A conv, a batch norm and two linear layers: every module kind the callbacks select, in a few KB."""

    def __init__(self, channels: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc1 = nn.Linear(channels * 4 * 4, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TinyModule(LightningModule):
    """TinyNet trained with SGD (momentum) or Adam on random 8x8 images."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


#: The example input of TinyNet: one 1x8x8 image.
EXAMPLE = torch.zeros(1, 1, 8, 8)


def module_with_example(**kwargs) -> TinyModule:
    """A TinyModule with ``example_input_array`` set, as the exports need."""
    module = TinyModule(**kwargs)
    module.example_input_array = EXAMPLE
    return module


class RandomImages(LightningDataModule):
    """Seeded random 1x8x8 images with 4 classes, in a fixed order (no shuffling) for reproducible runs."""

    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=generator)
        self.y = torch.randint(0, 4, (n,), generator=generator)
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class SaveRankState(Callback):
    """Writes each rank's parameters, buffers and callback states to ``<directory>/rank<N>.pt`` at train end.

    Keys are ``model/<name>`` for the model's state dict and ``callback/<state_key>/...`` for every other
    callback's (flattened) state, so that a test can compare ranks tensor by tensor.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {f"model/{name}": t.detach().cpu().clone() for name, t in pl_module.state_dict().items()}
        for callback in trainer.callbacks:
            if callback is not self:
                state.update(flatten(callback.state_dict(), f"callback/{callback.state_key}"))
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def flatten(state, prefix: str) -> dict:
    """Flatten nested dicts and lists into ``prefix/key/...`` entries (tensors and plain values)."""
    if isinstance(state, dict | list | tuple):
        flat = {}
        for key, value in state.items() if isinstance(state, dict) else enumerate(state):
            flat.update(flatten(value, f"{prefix}/{key}"))
        return flat
    return {prefix: state}


def assert_states_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    """Assert two flattened states have the same keys and equal values (exactly, or within ``atol``)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            if atol and a[key].is_floating_point():
                torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
            else:
                assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


class CheckZerosAfterEveryStep(Callback):
    """After each batch (after the optimizer step), counts pruned weights that are not exactly zero."""

    def __init__(self, pruning) -> None:
        self.pruning = pruning
        self.violations = 0
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            self.violations += int((params[name][~mask] != 0).sum())
        self.checked += 1


def fit_tiny(callbacks, module=None, epochs=1, ckpt_path=None, **trainer_kwargs):
    """Fit ``module`` (default: a new TinyModule) on RandomImages with fast flags; return (trainer, module)."""
    module = module or TinyModule()
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=epochs, **trainer_kwargs), callbacks=callbacks)
    trainer.fit(module, datamodule=RandomImages(), ckpt_path=ckpt_path)
    return trainer, module


def fast_trainer_kwargs(**overrides) -> dict:
    """Trainer flags that keep a test quick and quiet."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def hide_module(monkeypatch, module: str) -> None:
    """Make ``import module`` (and its submodules) fail as if the package were not installed."""
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(f"{module}."):
            raise ImportError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)


class TokenClassifier(TinyModule):
    """A tiny Hugging Face BERT classifier on dict batches that carry `labels` (as HF data collators make them)."""

    def __init__(self, with_example: bool = True, heads: int = 2, hidden: int = 16) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            num_labels=3,
        )
        del self.net
        self.bert = BertForSequenceClassification(config)
        if with_example:
            self.example_input_array = {
                "input_ids": torch.zeros(1, 12, dtype=torch.long),
                "attention_mask": torch.ones(1, 12, dtype=torch.long),
            }

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        return self.bert(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.bert(**batch).loss)

    def _loader(self):
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50, (32, 12), generator=generator)
        rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i[0] % 3} for i in ids]
        return DataLoader(rows, batch_size=8)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


class IdImages(RandomImages):
    """RandomImages whose batches also carry each sample's index, loaded by worker processes that persist.

    ``persistent_workers=True`` is what Lightning recommends for worker loaders; iterating such a loader a second
    time resets the one iterator it keeps, so a callback that reads the training loader mid-epoch changes the
    batches the fit loop trains on.
    """

    def __init__(self, n: int = 64, batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__(n=n, batch_size=batch_size)
        self.num_workers = num_workers

    def _loader(self, num_workers: int = 0) -> DataLoader:
        ids = torch.arange(len(self.x))
        return DataLoader(
            TensorDataset(self.x, self.y, ids),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.num_workers)  # only the training loader needs workers to show the reset


class IdRecordingModule(TinyModule):
    """TinyModule on (image, class, id) batches; writes the ids every training step saw to ``<directory>/ids<rank>``."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.example_input_array = EXAMPLE
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        self.seen.extend(ids.tolist())
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_end(self) -> None:
        Path(self.directory, f"ids{self.global_rank}.txt").write_text(" ".join(map(str, self.seen)))

"""Real text offline: this Python's standard-library sources as bytes (vocabulary 256), split by file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

#: Every HELD_OUT_EVERY-th source file (sorted by name) is held-out text; the others train.
HELD_OUT_EVERY = 20


def stdlib_text() -> tuple[bytes, bytes, int]:
    """(training bytes, held-out bytes, number of files) from the standard library's top-level modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held_out = [], []
    for index, path in enumerate(files):
        (held_out if index % HELD_OUT_EVERY == 0 else train).append(path.read_bytes())
    return b"\n".join(train), b"\n".join(held_out), len(files)


def token_windows(data: bytes, length: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes as token ids (deterministic for ``seed``)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length - 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


class StdlibText(LightningDataModule):
    """Byte windows of the standard library's sources: training files and held-out files never mix.

    Args:
        length: Bytes per window.
        train_windows: Training windows (drawn once, at random positions).
        val_windows: Held-out windows.
        batch_size: Windows per batch.
    """

    def __init__(
        self, length: int = 256, train_windows: int = 4096, val_windows: int = 64, batch_size: int = 8
    ) -> None:
        super().__init__()
        self.length, self.train_windows, self.val_windows = length, train_windows, val_windows
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        """Cut the windows (deterministic)."""
        train, held_out, _ = stdlib_text()
        self.train = token_windows(train, self.length, self.train_windows, seed=0)
        self.val = token_windows(held_out, self.length, self.val_windows, seed=1)

    def train_dataloader(self) -> DataLoader:
        """Dict batches ``{"input_ids": ...}``, shuffled."""
        return DataLoader([{"input_ids": t} for t in self.train], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out dict batches, in order."""
        return DataLoader([{"input_ids": t} for t in self.val], batch_size=self.batch_size)

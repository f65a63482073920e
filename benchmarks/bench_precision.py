"""MixedPrecision: training throughput of a transformer block, fp32 against bf16-mixed and 16-mixed.

Runs on CUDA when there is a GPU, else on the CPU (where ``precision="auto"`` keeps fp32 unless the CPU has
native bf16: this benchmark shows why). ``python -m benchmarks precision``.
"""

from __future__ import annotations

import logging
import platform
import warnings

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import interleaved_ratio
from lightning_accel import MixedPrecision
from lightning_accel.precision import choose_precision, cpu_has_native_bf16

D_MODEL, HEADS, FF, SEQ, BATCH = 256, 4, 1024, 64, 32


class TransformerBlock(LightningModule):
    """One pre-norm transformer encoder layer with a regression head, trained with AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, batch_first=True, norm_first=True)
        self.head = nn.Linear(D_MODEL, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.block(x)).squeeze(-1).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class RandomSequences(LightningDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH * 8, SEQ, D_MODEL, generator=generator)
        return DataLoader(TensorDataset(x, torch.randn(BATCH * 8, SEQ, generator=generator)), batch_size=BATCH)


def main() -> None:
    """Print the throughput table."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}"
    steps = 50 if cuda else 10
    accelerator = "gpu" if cuda else "cpu"
    auto, reason = choose_precision(
        "cuda" if cuda else "cpu", torch.cuda.get_device_capability() if cuda else None, cpu_has_native_bf16()
    )
    print(f"device: {device}; torch {torch.__version__}; auto would pick {auto} ({reason})")
    print(f"\n| transformer block (d={D_MODEL}, seq {SEQ}, batch {BATCH}) | ms/step | throughput vs fp32 |")
    print("| --- | --- | --- |")
    task = lambda: (TransformerBlock(), RandomSequences())  # noqa: E731
    for precision in ("bf16-mixed", "16-mixed"):
        mixed, fp32, ratio = interleaved_ratio(
            lambda p=precision: [MixedPrecision(p)],
            lambda: [],
            steps=steps,
            repeats=3,
            make_task=task,
            accelerator=accelerator,
            devices=1,
        )
        print(f"| fp32 (reference for the next row) | {fp32 * 1e3:.1f} | 1.00x |")
        print(f"| {precision} | {mixed * 1e3:.1f} | {1 / ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

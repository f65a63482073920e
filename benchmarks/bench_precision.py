"""MixedPrecision: training throughput of a transformer block, fp32 against bf16-mixed and 16-mixed.

Runs on CUDA when there is a GPU, else on the CPU (where ``precision="auto"`` keeps fp32 unless the CPU has
native bf16: this benchmark shows why). ``python -m benchmarks precision``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import Section, interleaved_ratio
from lightning_accel import MixedPrecision
from lightning_accel.precision.callback import choose_precision, cpu_has_native_bf16

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


def run(quick: bool) -> list[Section]:
    """Throughput of the transformer block in fp32, bf16-mixed and 16-mixed, on the GPU if there is one."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    steps = (10 if quick else 50) if cuda else (3 if quick else 10)
    accelerator = "gpu" if cuda else "cpu"
    auto, reason = choose_precision(
        "cuda" if cuda else "cpu", torch.cuda.get_device_capability() if cuda else None, cpu_has_native_bf16()
    )
    lines = [
        f"One pre-norm transformer encoder layer (d={D_MODEL}, {HEADS} heads, FF {FF}, seq {SEQ}, batch {BATCH}), "
        f"AdamW, through a Lightning Trainer; each mixed run alternated with an fp32 run. Device: {device}; "
        f'`precision="auto"` would pick {auto} ({reason}).',
        "",
        "| device | precision | ms/step | fp32 ms/step beside it | throughput vs fp32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    data = {"device": device, "rows": {}}
    task = lambda: (TransformerBlock(), RandomSequences())  # noqa: E731
    # fp16 autocast on a CPU runs at a few percent of fp32 speed: in the quick run it would take minutes.
    precisions = ("bf16-mixed",) if quick and not cuda else ("bf16-mixed", "16-mixed")
    for precision in precisions:
        mixed, fp32, ratio = interleaved_ratio(
            lambda p=precision: [MixedPrecision(p)],
            lambda: [],
            steps=steps,
            repeats=1 if quick else 3,
            make_task=task,
            accelerator=accelerator,
            devices=1,
        )
        lines.append(f"| {device} | {precision} | {mixed * 1e3:.1f} | {fp32 * 1e3:.1f} | {1 / ratio:.2f}x |")
        data["rows"][precision] = {"ms": mixed * 1e3, "fp32_ms": fp32 * 1e3, "speedup": 1 / ratio}
    if not cuda:
        lines.append(
            "| GPU (goal: bf16-mixed and 16-mixed >= 2x fp32, transformer block and CNN) | not measured | "
            "not measured | not measured | not measured: no GPU in this run |"
        )
    return [Section("Mixed precision: throughput against fp32", "\n".join(lines) + "\n", data)]

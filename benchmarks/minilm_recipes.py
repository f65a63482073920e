"""MiniLM recipes that train: QAT with distillation, and FFN slimming with distillation then int8.

There is no task: the pretrained fp32 MiniLM is the teacher (``Distillation``'s default, the model at setup) and the
objective is the cosine of the student's sentence embeddings to the teacher's, on paragraphs of Python standard
library docstrings that are neither calibration nor scored texts. Everything runs through a Lightning Trainer with
the callbacks as a user would add them; the files are the ones the callbacks export.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer, seed_everything

from lightning_accel import Distillation, MagnitudePruning, QuantizationAwareTraining

#: Modules whose import prints, opens windows or is not meant for import.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "xxlimited", "xxsubtype"}
BATCH = 8
EPOCHS = 2


def training_texts(exclude_modules: list[str], exclude_texts: list[str]) -> list[str]:
    """First paragraphs of the docstrings of other standard-library modules and their public names (~470)."""
    found: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name in _SKIP or name in exclude_modules or name.startswith("_"):
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    module = importlib.import_module(name)
            except Exception:  # platform-specific modules
                continue
            objects = [module, *[getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")][:40]]
            for obj in objects:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                paragraph = " ".join(doc.strip().split("\n\n")[0].split())
                if len(paragraph) > 60 and paragraph not in found and paragraph not in exclude_texts:
                    found.append(paragraph)
    return found


class DistilledEncoder(LightningModule):
    """The sentence encoder, trained by distillation alone: ``training_step`` has no task loss of its own."""

    def __init__(self, encoder: torch.nn.Module, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor]):
        super().__init__()
        self.encoder = encoder
        self.train_rows = [{k: v[i] for k, v in train.items()} for i in range(len(train["input_ids"]))]
        self.val_rows = [{k: v[i] for k, v in val.items()} for i in range(len(val["input_ids"]))]
        self.example_input_array = {k: v[:1] for k, v in val.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # No labels: the Distillation callback's cosine to the pretrained model is the whole objective.
        return self(**batch).sum() * 0.0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self(**batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-5, weight_decay=0.0)

    def train_dataloader(self) -> Any:
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(self.train_rows, batch_size=BATCH, shuffle=True, generator=generator)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.val_rows, batch_size=len(self.val_rows))


def train_recipe(
    name: str, encoder: torch.nn.Module, train: dict, val: dict, directory: Path
) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    """Fit one recipe; return the trained module, the int8 file its callbacks exported, and QAT's figures."""
    seed_everything(0, workers=True)
    module = DistilledEncoder(encoder, train, val)
    steps = EPOCHS * -(-len(module.train_rows) // BATCH)
    path = directory / f"{name}.int8.onnx"
    qat_start = 0 if name == "qat" else int(steps * 0.6)  # slimming: prune first, then quantize the slim model
    qat = QuantizationAwareTraining(
        start_step=qat_start, activations="dynamic", embeddings="int8", export_path=path, model_input=None
    )
    callbacks: list[Any] = [Distillation(loss="cosine", weight=1.0), qat]
    if name == "slim":
        callbacks.insert(0, MagnitudePruning(0.5, pattern="channels", end_step=int(steps * 0.5), every_n_steps=8))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module)
    figures = {"steps": steps, "int8_at_start": qat.int8_at_start, "int8_at_end": qat.int8_at_end}
    return module, path, figures

"""MiniLM recipes that train: QAT with distillation, and FFN slimming with distillation then int8.

They are ``examples/minilm``'s ``qat.yaml`` and ``slim.yaml`` in Python: the pretrained fp32 MiniLM is the teacher
(``Distillation``'s default, the model at setup) and the objective is the cosine of the student's sentence embeddings
to the teacher's, on docstring paragraphs that are neither calibration nor scored texts. Everything runs through a
Lightning Trainer with the callbacks as a user adds them; the files are the ones the callbacks export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import seed_everything

from benchmarks.common import quiet_trainer
from examples.minilm import DocstringTexts, SentenceEncoder
from lightning_accel import Distillation, MagnitudePruning, QuantizationAwareTraining

BATCH = 8
EPOCHS = 2
LR = 3e-5
#: The fraction of every FFN's hidden units and of every attention's heads that slimming removes: about the least
#: that reaches 2.5x fp32 ORT with int8 (measured 2.70x at 0.3, 2.40x at 0.25).
SLIM_SPARSITY = 0.3
#: Slimming trains at a higher rate, distilling every encoder layer's output too: at 25% with Taylor importance,
#: cosine 0.919 against 0.905 at 3e-5 with the output alone.
SLIM_SETTINGS = {"sparsity": SLIM_SPARSITY, "lr": 1e-4, "distill_layers": True}


def train_recipe(
    name: str,
    directory: Path,
    sparsity: float = SLIM_SPARSITY,
    importance: str = "taylor",
    epochs: int = EPOCHS,
    lr: float = LR,
    distill_layers: bool = False,
) -> tuple[SentenceEncoder, Path, dict[str, Any]]:
    """Fit one recipe (``"qat"`` or ``"slim"``); return the trained module, its int8 file and QAT's figures.

    ``sparsity`` and ``importance`` set the slimming (the fraction of every FFN's hidden units and of every
    attention's heads, and how they are ranked); ``distill_layers`` also matches every encoder layer's output.
    """
    seed_everything(0, workers=True)
    module, data = SentenceEncoder(lr=lr), DocstringTexts(batch_size=BATCH)
    data.setup("fit")
    steps = epochs * len(data.train_dataloader())
    path = directory / f"{name}_{importance}_{sparsity}_{epochs}_{lr}_{distill_layers}.int8.onnx"
    qat_start = 0 if name == "qat" else int(steps * 0.6)  # slimming: prune first, then quantize the slim model
    qat = QuantizationAwareTraining(start_step=qat_start, activations="dynamic", embeddings="int8", export_path=path)
    layers = [f"model.encoder.layer.{i}" for i in range(6)] if distill_layers else None
    callbacks: list[Any] = [Distillation(loss="cosine", modules=layers), qat]
    if name == "slim":
        pruning = MagnitudePruning(
            sparsity, pattern="channels", end_step=int(steps * 0.5), every_n_steps=8, importance=importance
        )
        callbacks.insert(0, pruning)
    # Validation stays on: QAT scores its int8 model on the validation texts.
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=1.0)
    trainer.fit(module, datamodule=data)
    figures = {
        "steps": steps,
        "train_texts": len(data.train_dataloader().dataset),
        "int8_at_start": qat.int8_at_start,
        "int8_at_end": qat.int8_at_end,
    }
    return module, path, figures

"""The pretrained all-MiniLM-L6-v2 sentence encoder (offline weights), trained by distillation alone."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule

from examples.minilm.data import minilm_path


class SentenceEncoder(LightningModule):
    """MiniLM with mean pooling: ``(input_ids, attention_mask)`` to normalised sentence embeddings.

    ``training_step`` has no task loss (there are no labels): the ``Distillation`` callback's cosine to the
    pretrained model, which it adds to the returned loss, is the whole objective.

    Args:
        max_length: The example input's length (the export takes any length).
        lr: AdamW learning rate.
    """

    def __init__(self, max_length: int = 128, lr: float = 3e-5) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters()
        self.model = AutoModel.from_pretrained(minilm_path())
        self.example_input_array = {
            "input_ids": torch.ones(1, max_length, dtype=torch.long),
            "attention_mask": torch.ones(1, max_length, dtype=torch.long),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, normalised embeddings of the tokens the mask keeps."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Run the student on the batch; the returned loss is zero until Distillation adds its own."""
        return self(**batch).sum() * 0.0  # no task loss: Distillation adds the objective

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Nothing to score without labels: the callbacks score the int8 model against the float one."""
        self(**batch)

    def configure_optimizers(self) -> Any:
        """AdamW at ``lr``, no weight decay (fine-tuning a pretrained model)."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)

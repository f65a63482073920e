"""A small Llama-style decoder (grouped-query attention, RMSNorm, rotary, SiLU-gated MLP) over bytes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer


class Logits(torch.nn.Module):
    """``input_ids -> logits`` of a Hugging Face causal LM, with an explicit all-ones attention mask.

    The mask keeps batch and length dynamic when traced for ONNX (without it, transformers' packed-sequence check
    runs ``torch.diff`` on the positions, which the exporter cannot take).

    Args:
        model: The causal LM.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, length, vocabulary]``."""
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


class CausalLM(LightningModule):
    """Next-byte prediction with a Llama-style decoder built from its config (no download).

    Args:
        hidden: Hidden width.
        layers: Decoder layers.
        heads: Query heads.
        kv_heads: Key/value heads (grouped-query attention: ``heads / kv_heads`` query heads share one).
        ffn: Width of the SiLU-gated MLP.
        length: The example input's length (the exports take any length).
        weights: A state dict (``torch.save(model.state_dict())``) to start from, e.g. float training's result:
            QAT and distillation fine-tune a trained model.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        hidden: int = 384,
        layers: int = 8,
        heads: int = 8,
        kv_heads: int = 2,
        ffn: int = 1024,
        length: int = 256,
        weights: str | None = None,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max(1024, length),
            tie_word_embeddings=False,
            use_cache=False,
        )
        self.model = LlamaForCausalLM(config)
        if weights is not None:
            state = torch.load(os.fspath(weights), map_location="cpu", weights_only=True)
            self.load_state_dict(state.get("state_dict", state))
        self.example_input_array = {"input_ids": torch.zeros(1, length, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, length, 256]``; an explicit all-ones mask keeps batch and length dynamic in exports."""
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["input_ids"]
        logits = self(tokens)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256).float(), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-byte cross-entropy (``Distillation`` adds its term to it)."""
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out loss and perplexity (exp of the mean next-byte cross-entropy)."""
        loss = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_perplexity", math.exp(min(loss.item(), 50.0)))

    def configure_optimizers(self) -> Any:
        """AdamW."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class SaveWeights(Callback):
    """Write the trained model's state dict at the end of fit (rank 0; a temporary name, then a rename).

    Args:
        path: Where the ``.pt`` goes (``CausalLM(weights=path)`` starts from it).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save ``pl_module.state_dict()``."""
        if not trainer.is_global_zero:
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        torch.save(pl_module.state_dict(), temporary)
        temporary.replace(target)

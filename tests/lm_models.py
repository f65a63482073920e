"""Tiny decoder language models from configs with random weights, as a LightningModule (importable by workers)."""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch.utils.data import DataLoader

from examples.llm.model import Logits

__all__ = ["TINY_LLM_EXAMPLE", "Logits", "TinyCausalLM", "lm_trainer", "tiny_gpt2", "tiny_llama", "token_batches"]

VOCAB, LENGTH = 96, 16

#: `examples/llm/int4.yaml` reduced for the test suite: a 1-layer decoder of 32 units, 4 steps, no plots or timing.
TINY_LLM_EXAMPLE = [
    "--config",
    "examples/llm/int4.yaml",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--trainer.limit_val_batches=2",
    "--model.hidden=32",
    "--model.layers=1",
    "--model.heads=4",
    "--model.kv_heads=2",
    "--model.ffn=64",
    "--model.length=32",
    "--data.length=32",
    "--data.train_windows=16",
    "--data.val_windows=8",
    "--data.batch_size=4",
    "--report.plots=false",
    "--report.latency=false",
    "--trainer.enable_progress_bar=false",
]


def tiny_llama():
    """Llama-style: RMSNorm, rotary, SiLU-gated MLP, grouped-query attention (4 query heads share 2 key/value)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    """GPT-2-style: ``Conv1D`` (transposed Linear) layers, fused QKV, LM head tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        use_cache=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def lm_trainer(tmp_path, callbacks, steps: int, **kwargs):
    """A quiet CPU Trainer for the tiny language models (no logger, checkpoints or progress bar)."""
    from lightning import Trainer

    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(max_steps=steps, default_root_dir=tmp_path, callbacks=callbacks, **(defaults | kwargs))


def token_batches(count: int = 4, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Random token windows with a repeating structure a model can learn a little of."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, LENGTH), generator=generator) for _ in range(count)]


class TinyCausalLM(LightningModule):
    """A tiny decoder trained on next-token prediction over random windows; dict batches ``{"input_ids": ...}``."""

    def __init__(self, kind: str = "llama") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Logits(tiny_llama() if kind == "llama" else tiny_gpt2())
        self.example_input_array = {"input_ids": torch.zeros(1, LENGTH, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)

    def _loss(self, batch):
        logits = self(batch["input_ids"])
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
        )

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader([{"input_ids": t} for t in torch.cat(token_batches(4, 4, seed=1))], batch_size=4)

    def val_dataloader(self):
        return DataLoader([{"input_ids": t} for t in torch.cat(token_batches(2, 4, seed=2))], batch_size=4)

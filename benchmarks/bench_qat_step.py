"""The QAT training step on transformer shapes, eager, against the fp32 step, in a Lightning Trainer.

A Llama-shaped causal LM (RMSNorm, rotary, SiLU-gated MLP, grouped-query attention) and a BERT-base-shaped masked
LM (hidden 768, 12 heads, FFN 3072; two layers, since the ratio is per layer) train with and without
``QuantizationAwareTraining`` in the configuration a language model uses: 7-bit weights observed every step,
dynamic int8 activations and int8 embeddings, fake quantization from the first step. Static activations are
measured beside them. The two runs of a pair alternate, so drift in the machine's load favours neither.
"""

from __future__ import annotations

import statistics

import torch
from lightning import LightningModule, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_compile import StepTimer
from benchmarks.common import Section, goal, quiet_trainer
from lightning_accel import QuantizationAwareTraining

#: The issue's goal: a QAT step at most this many fp32 steps, eager, on the transformer shapes.
GOAL = 1.3


class TokenModel(LightningModule):
    """A Hugging Face model built from a config (random weights) trained on its own inputs as labels."""

    def __init__(self, kind: str, quick: bool) -> None:
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        if kind == "llama":
            hidden, layers = (64, 1) if quick else (512, 4)
            config = LlamaConfig(
                vocab_size=8000,
                hidden_size=hidden,
                intermediate_size=hidden * 8 // 3 + 11,
                num_hidden_layers=layers,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=256,
                use_cache=False,
            )
            self.model = LlamaForCausalLM(config)
        else:
            hidden, layers = (96, 1) if quick else (768, 2)
            config = BertConfig(
                vocab_size=8000,
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=12,
            )
            self.model = BertForMaskedLM(config)
        self.example_input_array = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def step_seconds(kind: str, activations: str | None, steps: int, warmup: int, quick: bool) -> float:
    """Median seconds per training step after ``warmup`` steps; ``activations=None`` is the fp32 run."""
    seed_everything(0, verbose=False)
    batch, length = (8, 128) if kind == "bert" else (4, 128)
    tokens = torch.randint(0, 8000, ((steps + warmup) * batch, 32 if quick else length))
    loader = DataLoader(TensorDataset(tokens), batch_size=batch)
    timer = StepTimer(warmup)
    callbacks = [timer]
    if activations is not None:
        callbacks.append(
            QuantizationAwareTraining(
                start_step=0,
                activations=activations,
                embeddings="int8",
                log_ranges=False,
                freeze_observers_step=None,
                freeze_bn_step=None,
            )
        )
    trainer = quiet_trainer(max_steps=steps + warmup, callbacks=callbacks)
    trainer.fit(TokenModel(kind, quick), train_dataloaders=loader)
    return statistics.median(timer.times)


def run(quick: bool) -> list[Section]:
    steps, warmup, pairs = (2, 1, 1) if quick else (8, 3, 2)
    rows, data = [], {}
    for kind, label in (("llama", "Llama-shaped causal LM"), ("bert", "BERT-base-shaped masked LM")):
        for activations in ("dynamic", "static"):
            measured = []
            for _ in range(pairs):
                reference = step_seconds(kind, None, steps, warmup, quick)
                candidate = step_seconds(kind, activations, steps, warmup, quick)
                measured.append((candidate, reference))
            ratio = statistics.median(c / r for c, r in measured)
            fp32_ms = statistics.median(r for _, r in measured) * 1e3
            qat_ms = statistics.median(c for c, _ in measured) * 1e3
            data[f"{kind}/{activations}"] = {"fp32_ms": fp32_ms, "qat_ms": qat_ms, "ratio": ratio}
            rows.append(f"| {label} | {activations} | {fp32_ms:.1f} | {qat_ms:.1f} | {ratio:.2f}x |")
    llama_params = sum(p.numel() for p in TokenModel("llama", quick).parameters()) / 1e6
    bert_params = sum(p.numel() for p in TokenModel("bert", quick).parameters()) / 1e6
    lines = [
        f"Eager, Lightning Trainer, AdamW, median step after {warmup} warm-up steps, {pairs} alternating pair(s). "
        f"Llama-shaped: {llama_params:.1f}M parameters, batch 4 x 128 tokens; BERT-base-shaped: {bert_params:.1f}M "
        "parameters, batch 8 x 128 tokens"
        + (" (--quick: tiny widths, 32 tokens)" if quick else "")
        + ". QAT: 7-bit weights observed every step, int8 embeddings, activations as named.",
        "",
        "| model | activations | fp32 step ms | QAT step ms | QAT / fp32 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    for kind in ("llama", "bert"):
        ratio = data[f"{kind}/dynamic"]["ratio"]
        lines.append(f"- {kind}, dynamic activations: QAT step <= {GOAL}x fp32: {ratio:.2f}x, {goal(ratio, GOAL)}")
    return [Section("QAT step on transformer shapes", "\n".join(lines) + "\n", data)]

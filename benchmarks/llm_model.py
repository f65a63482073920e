"""The language model the LLM benchmark compresses: a small Llama-style decoder trained here on real text.

Text: this Python's standard-library sources (``sysconfig``'s ``stdlib`` folder, top level ``*.py`` only, sorted by
name; every 20th file is held out for evaluation, the rest trains: ``examples/llm/data.py``). Tokens are bytes
(vocabulary 256), so the model needs no tokenizer download and its weights sit in the layers that quantization
compresses, not in a large embedding table. The trained weights are cached under ``benchmarks/llm/.cache``
(ignored by git), keyed by the configuration, so a second run of the benchmark reuses them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from examples.llm.data import stdlib_text, token_windows

CACHE = Path(__file__).parent / "llm" / ".cache"


def llama_config(quick: bool):
    """Llama-style: RMSNorm, rotary, SiLU-gated MLP, grouped-query attention (8 query heads share 2 key/value)."""
    from transformers import LlamaConfig

    hidden, layers, ffn = (64, 2, 192) if quick else (384, 8, 1024)
    return LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8 if not quick else 4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        use_cache=False,
    )


def held_out_batches(quick: bool, batch_size: int = 8) -> list[torch.Tensor]:
    """Fixed held-out windows for perplexity and calibration-free evaluation."""
    _, held_out, _ = stdlib_text()
    windows = token_windows(held_out, 128 if quick else 256, 16 if quick else 64, seed=1)
    return list(windows.split(batch_size))


def calibration_batches(quick: bool, batch_size: int = 8) -> list[torch.Tensor]:
    """Training-text windows for data-aware calibration (never held-out text)."""
    train, _, _ = stdlib_text()
    windows = token_windows(train, 128 if quick else 256, 16 if quick else 128, seed=2)
    return list(windows.split(batch_size))


def perplexity_of(logits_of, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over ``batches``, ``logits_of(batch)`` giving ``[batch, tokens, vocab]``."""
    total, count = 0.0, 0
    for batch in batches:
        logits = logits_of(batch)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def perplexity(model, batches: list[torch.Tensor]) -> float:
    """:func:`perplexity_of` a PyTorch causal LM returning ``.logits``."""
    model.eval()
    return perplexity_of(lambda batch: model(input_ids=batch).logits, batches)


def trained_llama(quick: bool, minutes: float | None = None, log=print):
    """The benchmark's model: trained on the standard library for ``minutes`` (cached), in eval mode."""
    from transformers import LlamaForCausalLM

    minutes = minutes if minutes is not None else (0.2 if quick else 20.0)
    config = llama_config(quick)
    key = f"llama-h{config.hidden_size}-l{config.num_hidden_layers}-f{config.intermediate_size}-{minutes:g}min"
    path = CACHE / f"{key}.pt"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train, _, files = stdlib_text()
    log(f"training {key} on {len(train) / 1e6:.1f} MB of standard-library source ({files} files)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3 if quick else 1e-3, weight_decay=0.1)
    length, batch_size = (128, 8) if quick else (256, 16)
    budget = minutes * 60
    start, step = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < budget:
        batch = token_windows(train, length, batch_size, seed=1000 + step)
        # Cosine schedule over the time budget, with a short warm-up.
        progress = min((time.perf_counter() - start) / budget, 1.0)
        scale = min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = (2e-3 if quick else 1e-3) * max(scale, 0.02)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
        step += 1
    log(f"trained {step} steps in {time.perf_counter() - start:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)
    return model.eval()


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    trained = trained_llama(quick="--quick" in sys.argv)
    print("params", sum(p.numel() for p in trained.parameters()))
    print("held-out perplexity", perplexity(trained, held_out_batches("--quick" in sys.argv)))

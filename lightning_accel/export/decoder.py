"""A decoder language model to ONNX with its KV cache, greedy generation in ONNX Runtime, and its speed.

The exported graph takes ``input_ids`` ``[batch, new]``, ``attention_mask`` ``[batch, past + new]`` and, per layer,
``past.<i>.key`` / ``past.<i>.value`` ``[batch, kv_heads, past, head_dim]``; it returns ``logits`` and
``present.<i>.key`` / ``present.<i>.value`` (the cache with the new tokens appended). One graph serves both phases:
prefill is a call with an empty past (``past = 0``), each decode step a call with one new token. Batch, new tokens
and past length are dynamic axes. Any Hugging Face causal LM that takes a ``Cache`` (Llama-, Qwen-, GPT-2-style)
works; weight-only int4 layers inside it export as ``MatMulNBits``.

The export checks itself: ORT and PyTorch must produce the same greedy tokens from the same prompt, and logits
within a tight SNR, in the prefill and in the decode steps.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_accel._core.files import atomic_target
from lightning_accel.export.check import ort_session, snr_db

#: Below this SNR of logits (PyTorch against ORT) a decoder export is reported as not reproducing its model.
MIN_DECODER_SNR_DB = 60.0


def _cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a Hugging Face decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class DecoderWithCache(nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` around a Hugging Face causal LM.

    Args:
        model: A causal LM whose forward takes ``cache=`` (transformers 5) and returns ``.logits``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = _cache_shape(model.config)[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """Logits for the new tokens, and each layer's cache with them appended (keys and values alternating)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        present = []
        for layer in output.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (output.logits, *present)


def _names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def empty_cache(config: Any, batch: int) -> list[Tensor]:
    """The past of a prefill: every layer's keys and values with length 0."""
    layers, kv_heads, head_dim = _cache_shape(config)
    return [torch.zeros(batch, kv_heads, 0, head_dim) for _ in range(2 * layers)]


@dataclass
class DecoderCheck:
    """How the exported decoder compared with PyTorch on a greedy generation.

    Attributes:
        tokens_equal: Whether ORT generated exactly PyTorch's greedy tokens.
        min_snr_db: The lowest logits SNR over the prefill and every decode step.
        steps: Decode steps compared.
    """

    tokens_equal: bool
    min_snr_db: float
    steps: int

    def __str__(self) -> str:
        same = "the same greedy tokens" if self.tokens_equal else "DIFFERENT greedy tokens"
        return f"{same} over {self.steps} decode steps, logits SNR >= {self.min_snr_db:.1f} dB"


def export_decoder_onnx(
    model: nn.Module, path: str | os.PathLike, prompt: Tensor | None = None, steps: int = 8, on_mismatch: str = "warn"
) -> tuple[Path, DecoderCheck | None]:
    """Export a causal LM with its KV cache (see the module docstring) and check greedy generation in ORT.

    Args:
        model: A Hugging Face causal LM (float, or with weight-only int4/int8 layers from ``quantize_weights``).
        path: Where the ``.onnx`` goes (written under a temporary name, then renamed).
        prompt: Token ids ``[batch, length]`` for the check (default: 8 tokens of id 1, batch 2).
        steps: Decode steps the check compares.
        on_mismatch: ``"warn"``, ``"raise"`` (``path`` is left as it was) or ``"ignore"`` (no check).

    Returns:
        The path written and the check (``None`` with ``on_mismatch="ignore"``).
    """
    if on_mismatch not in ("warn", "raise", "ignore"):
        raise ValueError(f"`on_mismatch` must be one of ['warn', 'raise', 'ignore'], got {on_mismatch!r}")
    wrapper = DecoderWithCache(model).eval()
    layers, kv_heads, head_dim = _cache_shape(model.config)
    inputs, outputs = _names(layers)
    # Traced with a past of 2 and 3 new tokens, so that neither length is 0 or 1 (the tracer would fold them).
    ids = torch.ones(2, 3, dtype=torch.long)
    past = [torch.randn(2, kv_heads, 2, head_dim) for _ in range(2 * layers)]
    mask = torch.ones(2, 5, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {"logits": {0: "batch", 1: "new"}}
    axes |= {name: {0: "batch", 2: "past"} for name in inputs[2:]}
    axes |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    target = Path(path)
    with atomic_target(target) as temporary:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                wrapper,
                (ids, mask, *past),
                str(temporary),
                dynamo=False,
                opset_version=17,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
            )
        check = None
        if on_mismatch != "ignore":
            prompt = prompt if prompt is not None else torch.ones(2, 8, dtype=torch.long)
            check = check_decoder(model, temporary, prompt, steps)
            passed = check.tokens_equal and check.min_snr_db >= MIN_DECODER_SNR_DB
            message = f"Checked the decoder {target.name} in ONNX Runtime against PyTorch: {check}"
            if not passed and on_mismatch == "raise":
                raise RuntimeError(f"{message}; {target} was not written")
            if not passed:
                warnings.warn(message, stacklevel=2)
            else:
                rank_zero_info(message)
    return target, check


@torch.no_grad()
def torch_greedy(model: nn.Module, prompt: Tensor, steps: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy tokens and each step's last logits from PyTorch, through the same cache wrapper."""
    wrapper = DecoderWithCache(model).eval()
    past, ids, tokens, logits = empty_cache(model.config, prompt.shape[0]), prompt, [], []
    mask = torch.ones_like(prompt)
    for _ in range(steps + 1):
        logit, *past = wrapper(ids, mask, *past)
        logits.append(logit[:, -1])
        ids = logit[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return torch.cat(tokens, dim=1), logits


def ort_greedy(session: Any, config: Any, prompt: Tensor, steps: int) -> tuple[Tensor, list[Tensor], list[float]]:
    """Greedy tokens, each step's last logits and each call's seconds (prefill first) from an ORT session."""
    inputs, _ = _names(_cache_shape(config)[0])
    past = [t.numpy() for t in empty_cache(config, prompt.shape[0])]
    ids, mask = prompt.numpy(), np.ones(prompt.shape, dtype=np.int64)
    tokens, logits, seconds = [], [], []
    for _ in range(steps + 1):
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(inputs[2:], past, strict=True))}
        start = time.perf_counter()
        logit, *past = session.run(None, feed)
        seconds.append(time.perf_counter() - start)
        logits.append(torch.from_numpy(logit[:, -1]))
        ids = logit[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(torch.from_numpy(ids))
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return torch.cat(tokens, dim=1), logits, seconds


def check_decoder(model: nn.Module, path: str | os.PathLike, prompt: Tensor, steps: int = 8) -> DecoderCheck:
    """Greedy generation from ``prompt`` in PyTorch and in the ORT file: the same tokens, and the logits' SNR."""
    session = ort_session(path)
    expected, expected_logits = torch_greedy(model, prompt, steps)
    got, got_logits, _ = ort_greedy(session, model.config, prompt, steps)
    snr = min(snr_db(a.float(), b.float()) for a, b in zip(expected_logits, got_logits, strict=True))
    return DecoderCheck(tokens_equal=torch.equal(expected, got), min_snr_db=snr, steps=steps)


@dataclass
class GenerationSpeed:
    """Greedy generation in ONNX Runtime: prefill latency and decode throughput (medians over repeats)."""

    prefill_ms: float
    decode_tokens_per_s: float


def generation_speed(session: Any, config: Any, prompt: Tensor, steps: int = 32, repeats: int = 3) -> GenerationSpeed:
    """Time greedy generation: the prefill call, and ``steps`` decode calls (tokens/s counts every sequence)."""
    prefill, decode = [], []
    ort_greedy(session, config, prompt, 2)  # warm-up
    for _ in range(repeats):
        _, _, seconds = ort_greedy(session, config, prompt, steps)
        prefill.append(seconds[0])
        decode.append(prompt.shape[0] * steps / sum(seconds[1:]))
    return GenerationSpeed(statistics.median(prefill) * 1e3, statistics.median(decode))

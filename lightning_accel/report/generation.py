"""Generation speed of a causal language model: prefill latency and decode tokens/s, in ONNX Runtime.

A decoder's value is how fast it generates, which a single forward's latency does not show: decoding runs one token
at a time against the KV cache. When the trained model holds a Hugging Face causal LM, the report exports it with
its cache (:func:`~lightning_accel.export.decoder.export_decoder_onnx`) as fp32 and, where the deploy stage built
one, as the int4/int8 weight-only model that was evaluated, then generates greedily from prompts cut from a
validation batch, at batch 1 and batch 8, the files alternating so that a change in the machine's load favours
none. The decoder files are written to a temporary folder and measured, not kept (``export_decoder_onnx`` writes
them for deployment).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel.export.check import ort_session
from lightning_accel.export.decoder import export_decoder_onnx, generation_speed
from lightning_accel.quantization.weight_only import group_quantized_layers

#: Longest prompt (tokens) cut from a validation batch, decode steps per generation, alternating rounds.
PROMPT_TOKENS, DECODE_STEPS, ROUNDS = 64, 32, 3
#: The batch sizes generation is timed at (the issue's and the common serving cases).
GENERATION_BATCHES = (1, 8)


def causal_lm_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost Hugging Face causal LM inside ``model`` (name and module), or ``None``.

    Recognised by what it offers, not by class: a ``config`` with ``num_hidden_layers`` and ``can_generate()``.
    """
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        can_generate = getattr(module, "can_generate", None)
        if config is not None and hasattr(config, "num_hidden_layers") and callable(can_generate):
            try:
                if can_generate():
                    return name, module
            except Exception:  # a model that cannot answer is not one we can generate with
                continue
    return None


def prompt_ids(batch_input: Any) -> torch.Tensor | None:
    """Token ids ``[batch, tokens]`` from a validation batch input (a tensor, or a dict with ``input_ids``)."""
    ids = batch_input.get("input_ids") if isinstance(batch_input, Mapping) else batch_input
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        return None
    return ids.long()


def measure_generation(deployment: Any, batch_input: Any) -> dict[str, Any] | None:
    """Prefill ms and decode tokens/s of the fp32 and the weight-only decoders; ``None`` for other models."""
    found = causal_lm_of(deployment.float_model)
    ids = prompt_ids(batch_input)
    if found is None or ids is None:
        return None
    name, float_lm = found
    models = {"ORT fp32": float_lm}
    quantized = deployment.evaluated_int8
    if quantized is not None and group_quantized_layers(quantized):
        models["ORT int4"] = quantized.get_submodule(name) if name else quantized
    length = min(PROMPT_TOKENS, ids.shape[1])
    rows = ids[torch.arange(max(GENERATION_BATCHES)) % ids.shape[0], :length]  # repeated when the batch is smaller
    prompts = {f"batch {size}": rows[:size] for size in GENERATION_BATCHES}
    result: dict[str, Any] = {"prompt_tokens": length, "decode_steps": DECODE_STEPS, "checks": {}}
    with tempfile.TemporaryDirectory() as directory:
        sessions = {}
        for runtime, model in models.items():
            path = Path(directory) / f"{runtime.replace(' ', '_')}.onnx"
            path, check = export_decoder_onnx(model, path, prompts["batch 1"], on_mismatch="warn")
            result["checks"][runtime] = str(check)
            sessions[runtime] = ort_session(path)
        timed: dict[str, dict[str, list[Any]]] = {batch: {runtime: [] for runtime in sessions} for batch in prompts}
        for _ in range(ROUNDS):
            for batch, prompt in prompts.items():
                for runtime, session in sessions.items():
                    speed = generation_speed(session, float_lm.config, prompt, steps=DECODE_STEPS, repeats=1)
                    timed[batch][runtime].append(speed)
    for batch, by_runtime in timed.items():
        result[batch] = {
            runtime: {
                "prefill_ms": statistics.median(s.prefill_ms for s in speeds),
                "tokens_per_s": statistics.median(s.decode_tokens_per_s for s in speeds),
            }
            for runtime, speeds in by_runtime.items()
        }
    return result


def generation_table(report: Mapping[str, Any]) -> list[str]:
    """The generation section of the Markdown report (nothing for models that do not generate)."""
    generation = report.get("generation")
    if not generation:
        return []
    rows = [
        f"| greedy generation ({generation['prompt_tokens']}-token prompt, {generation['decode_steps']} new tokens) "
        "| prefill (ms) | decode tokens/s | vs ORT fp32 |",
        "| --- | --- | --- | --- |",
    ]
    for size in GENERATION_BATCHES:
        batch = f"batch {size}"
        base = generation[batch]["ORT fp32"]["tokens_per_s"]
        for runtime, entry in generation[batch].items():
            rows.append(
                f"| {runtime}, {batch} | {entry['prefill_ms']:.2f} | {entry['tokens_per_s']:.0f} | "
                f"{entry['tokens_per_s'] / base:.2f}x |"
            )
    checks = "; ".join(f"{runtime}: {check}" for runtime, check in generation["checks"].items())
    return [*rows, "", f"Decoders checked against PyTorch by greedy generation: {checks}.", ""]


def generation_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Prefill ms, decode tokens/s and the decode speed-up against fp32, per runtime and batch, as scalars."""
    generation = report.get("generation") or {}
    metrics: dict[str, float] = {}
    for size in GENERATION_BATCHES:
        batch = f"batch {size}"
        if batch not in generation:
            continue
        base = generation[batch]["ORT fp32"]["tokens_per_s"]
        for runtime, entry in generation[batch].items():
            tag = f"report/generation/{batch}/{runtime}"
            metrics[f"{tag}/prefill_ms"] = entry["prefill_ms"]
            metrics[f"{tag}/tokens_per_s"] = entry["tokens_per_s"]
            metrics[f"{tag}/decode_speedup"] = entry["tokens_per_s"] / base
    return metrics

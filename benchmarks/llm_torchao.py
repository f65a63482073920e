"""torchao's int4 configs on the benchmark's language model, where they run on this CPU (PyTorch eager).

torchao's models run in PyTorch, not ONNX Runtime, so only their perplexity is comparable with the ORT rows; their
prefill latency is given against the fp32 model in the same runtime (PyTorch eager, same threads), alternating,
medians. A config that does not run on this CPU is a row with its error, not left out.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from benchmarks.common import Section
from benchmarks.llm_model import perplexity
from lightning_accel._core.modules import module_copy


def _configs(group: int):
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig, PerGroup

    return {
        f"torchao Int8DynamicActivationIntxWeightConfig (8da4w), int4 groups of {group}": lambda: (
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group))
        ),
        f"torchao Int4WeightOnlyConfig, int4 groups of {group}": lambda: Int4WeightOnlyConfig(group_size=group),
    }


@torch.no_grad()
def _prefill_ratio(reference, candidate, batch: torch.Tensor, rounds: int) -> float:
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (reference, candidate):
        model(input_ids=batch)  # warm-up
    for _ in range(rounds):
        for index, model in enumerate((reference, candidate)):
            start = time.perf_counter()
            model(input_ids=batch)
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def torchao_section(model: torch.nn.Module, held_out, quick: bool) -> Section:
    """Perplexity and PyTorch-eager prefill of torchao's int4 configs, beside the fp32 model in PyTorch."""
    hf = model.model.eval()
    rows, data = [], {"fp32": perplexity(hf, held_out)}
    rows.append(f"| fp32 (PyTorch) | {data['fp32']:.3f} | 1.00x |")
    try:
        import torchao
        from torchao.quantization import quantize_
    except Exception as error:  # not installed (an optional dependency): every row says so
        return Section("Language model: torchao on this CPU", f"torchao not importable: {error}\n", data)
    for group in (32,) if quick else (32, 128):
        for label, config in _configs(group).items():
            try:
                quantized = module_copy(hf).eval()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_(quantized, config())
                ppl = perplexity(quantized, held_out)
                ratio = _prefill_ratio(hf, quantized, held_out[0][:1], 3 if quick else 10)
            except Exception as error:  # a config without a kernel on this CPU is a finding, reported as it is
                data[label] = {"error": f"{type(error).__name__}: {error}"}
                rows.append(f"| {label} | does not run here: {type(error).__name__}: {str(error)[:120]} | - |")
                continue
            data[label] = {"ppl_torch": ppl, "prefill_b1_speedup_torch": ratio}
            rows.append(f"| {label} | {ppl:.3f} | {ratio:.2f}x |")
    lines = [
        f"torchao {getattr(torchao, '__version__', '?')}, PyTorch eager, the held-out windows of the tables above. "
        "Prefill: one forward over the first window at batch 1, fp32 / this, medians of alternating runs.",
        "",
        "| model | held-out perplexity (PyTorch) | prefill batch 1 vs fp32 PyTorch |",
        "| --- | --- | --- |",
        *rows,
    ]
    return Section("Language model: torchao's int4 configs on this CPU", "\n".join(lines) + "\n", data)

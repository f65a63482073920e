"""Measuring what acceleration gained and what it cost: sizes, latency and quality side by side.

Plain functions (usable without Lightning) that the :class:`~lightning_accel.report.callback.AccelerationReport`
callback calls at the end of fit and ``lightning-accel export`` calls on a checkpoint. Every number is measured on
the spot: file sizes from the files, sparsity from the weights, latency as the median of interleaved timed runs
after warm-up on this machine (named with its int8 instruction sets), quality on the validation data.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_accel._core.inputs import batch_labels
from lightning_accel._core.modules import WEIGHT_MODULE_TYPES
from lightning_accel.export.check import compare_outputs, run_float32

#: CPU flags that decide int8 speed (and, without VNNI, int8 exactness of full-range weights in ONNX Runtime).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> dict[str, Any]:
    """The CPU model and which int8-relevant instruction sets it has (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model,
        "int8_instructions": [f for f in INT8_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
    }


def describe_cpu(cpu: Mapping[str, Any]) -> str:
    """One line: model, int8 instruction sets (or their absence) and threads."""
    present = ", ".join(cpu["int8_instructions"]) or "none of AVX2/AVX-512/VNNI/AMX"
    return f"{cpu['model']}; int8 instructions: {present}; {cpu['threads']} threads"


def weight_sparsity(model: nn.Module, pruned: Sequence[str] = ()) -> dict[str, Any]:
    """Parameter count, and the zero fraction of the weights, globally and per layer.

    Args:
        model: The model.
        pruned: The parameters the pruning callback selected. When given, ``sparsity`` is over exactly those, the
            figure the callback itself logs, and the other weight matrices are counted apart
            (``other_weights``, ``other_weights_sparsity``). Without it, over every Linear/Conv weight.
    """
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_MODULE_TYPES) and name:
            per_layer[name] = float((module.weight.detach() == 0).float().mean())
    parameters = dict(model.named_parameters())
    if pruned:
        chosen = [parameters[name] for name in pruned if name in parameters]
        pruned_names = set(pruned)
        others = [p for name, p in parameters.items() if p.dim() >= 2 and name not in pruned_names]
    else:
        chosen = [m.weight for name, m in model.named_modules() if isinstance(m, WEIGHT_MODULE_TYPES) and name]
        others = []

    def zeros(tensors: Sequence[Tensor]) -> tuple[int, int]:
        return sum(int((t.detach() == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)

    zero, total = zeros(chosen)
    summary: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "prunable_weights": total,
        "sparsity": zero / total if total else 0.0,
        "sparsity_of": "the pruned weights (MagnitudePruning's selection)" if pruned else "Linear/Conv weights",
        "per_layer_sparsity": per_layer,
    }
    if pruned:
        other_zero, other_total = zeros(others)
        summary["other_weights"] = other_total
        summary["other_weights_sparsity"] = other_zero / other_total if other_total else 0.0
    return summary


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward pass in its Linear, (transposed) Conv and LSTM/GRU/RNN layers.

    Counted from the shapes each layer really sees (forward hooks), so a slimmed model counts fewer; the batch
    size of ``example_input`` multiplies the count. Other layers (norms, activations, attention's matmuls) are not
    counted: in CNNs and MLPs they are a small share.
    """
    total = 0

    def count(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input element meets a kernel slice
            kernel = int(np.prod(module.kernel_size))
            total += args[0].numel() * (module.out_channels // module.groups) * kernel
        elif isinstance(module, nn.RNNBase):
            total += _recurrent_macs(module, args[0])
        else:
            kernel = int(np.prod(module.kernel_size))
            total += output.numel() * (module.in_channels // module.groups) * kernel

    counted = (*WEIGHT_MODULE_TYPES, nn.modules.conv._ConvTransposeNd, nn.RNNBase)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, counted)]
    training = model.training
    try:
        run_float32(model.eval(), example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return total


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _recurrent_macs(module: nn.RNNBase, inputs: Any) -> int:
    """Gate matrix products of an LSTM/GRU/RNN over every time step, layer and direction (packed input: 0)."""
    if not isinstance(inputs, Tensor):
        return 0
    steps = inputs.shape[0] if inputs.dim() == 2 else inputs.shape[0] * inputs.shape[1]
    directions = 2 if module.bidirectional else 1
    hidden, projected = module.hidden_size, module.proj_size or module.hidden_size
    total = 0
    for layer in range(module.num_layers):
        layer_input = module.input_size if layer == 0 else directions * projected
        per_step = _GATES[module.mode] * hidden * (layer_input + projected)
        if module.proj_size:
            per_step += hidden * module.proj_size
        total += steps * directions * per_step
    return total


def median_latencies(
    runners: Mapping[str, Callable[[], Any]], repeats: int = 20, rounds: int = 5, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each runner, measured in interleaved rounds after warm-up.

    Interleaving (A, B, C, A, B, C, ...) spreads the machine's load drift over every contender, so the ratios
    between them hold even on a noisy shared machine.
    """
    return {name: spread.median for name, spread in latency_spreads(runners, repeats, rounds, warmup).items()}


#: Latencies whose (max - min) / median over the rounds stays above this are reported as noisy.
NOISY_SPREAD = 0.25


@dataclass(frozen=True)
class LatencySpread:
    """Seconds per call over the timed rounds: the minimum, the median and the maximum."""

    minimum: float
    median: float
    maximum: float

    @property
    def spread(self) -> float:
        """``(max - min) / median``: 0 on a quiet machine."""
        return (self.maximum - self.minimum) / self.median if self.median else 0.0

    @property
    def noisy(self) -> bool:
        """Whether the rounds disagree by more than :data:`NOISY_SPREAD`."""
        return self.spread > NOISY_SPREAD


def latency_spreads(
    runners: Mapping[str, Callable[[], Any]],
    repeats: int = 20,
    rounds: int = 5,
    warmup: int = 3,
    max_rounds: int | None = None,
) -> dict[str, LatencySpread]:
    """Interleaved timed rounds after warm-up, repeated until the spread is small (up to ``max_rounds``).

    Each round times ``repeats`` calls of every runner in turn. After ``rounds`` rounds, more rounds run while any
    runner's spread over its rounds is above :data:`NOISY_SPREAD`, up to ``max_rounds`` (default ``3 * rounds``);
    a spread that stays large is then reported as :attr:`LatencySpread.noisy`, never hidden.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    limit = max_rounds if max_rounds is not None else 3 * rounds

    def spreads() -> dict[str, LatencySpread]:
        return {
            name: LatencySpread(min(values), statistics.median(values), max(values)) for name, values in samples.items()
        }

    for index in range(limit):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            samples[name].append((time.perf_counter() - start) / repeats)
        if index + 1 >= rounds and not any(s.noisy for s in spreads().values()):
            break
    return spreads()


def classification_pairs(batch: Any) -> tuple[Any, Tensor] | None:
    """``(input, labels)`` when a batch is an (input, integer class) pair or a dict with integer ``labels``."""
    labels = batch_labels(batch)
    if labels is None:
        return None
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, labels
    return batch[0], labels


def evaluate(
    predictors: Mapping[str, Callable[[Tensor], Tensor]],
    batches: Iterable[Any],
    max_batches: int,
    reference: str,
    pick_input: Callable[[Any], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Score every predictor on the same batches.

    With (input, class) batches (or dicts with integer ``labels``): accuracy and argmax agreement against the
    ``reference`` predictor; otherwise the cosine of each sample's output to the reference's (an embedding's
    argmax means nothing). Always: SNR. ``pick_input`` takes the model input out of a batch (the callbacks'
    ``model_input`` picker); by default the first element of a pair, else the batch.
    """
    outputs, labels = _run_predictors(predictors, batches, max_batches, pick_input)
    stacked = {name: torch.cat(values) for name, values in outputs.items() if values}
    return {name: _scores(name, output, stacked, labels, reference) for name, output in stacked.items()}


def _run_predictors(
    predictors: Mapping[str, Callable[[Tensor], Tensor]],
    batches: Iterable[Any],
    max_batches: int,
    pick_input: Callable[[Any], Any] | None,
) -> tuple[dict[str, list[Tensor]], list[Tensor]]:
    """Every predictor's outputs on the first ``max_batches`` batches, and the batches' class labels if any."""
    outputs: dict[str, list[Tensor]] = {name: [] for name in predictors}
    labels: list[Tensor] = []
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        pair = classification_pairs(batch)
        if pick_input is not None:
            inputs = pick_input(batch)
        else:
            inputs = pair[0] if pair else (batch[0] if isinstance(batch, tuple | list) else batch)
        if pair:
            labels.append(pair[1].cpu())
        for name, predict in predictors.items():
            outputs[name].append(predict(inputs).detach().float().cpu())
    return outputs, labels


def _scores(
    name: str, output: Tensor, stacked: Mapping[str, Tensor], labels: list[Tensor], reference: str
) -> dict[str, float]:
    """Accuracy against the labels, and agreement (or cosine) and SNR against the reference predictor."""
    entry: dict[str, float] = {}
    if labels and output.dim() == 2 and output.shape[0] == sum(len(t) for t in labels):
        entry["accuracy"] = (output.argmax(1) == torch.cat(labels)).float().mean().item()
    if name != reference and reference in stacked:
        # Argmax agreement only where the batches say the output is logits; an embedding gets its cosine.
        check = compare_outputs([stacked[reference]], [output], classification=bool(labels))
        if check.agreement is not None:
            entry["agreement"] = check.agreement
        elif check.cosine is not None:
            entry["cosine"] = check.cosine
        entry["snr_db"] = check.snr_db
    return entry

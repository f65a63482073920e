"""Per-layer sensitivity to int8 quantization, measured: what quantizing each layer alone costs on validation data.

One calibration serves every probe: the model is prepared and calibrated once (PTQ), then each quantized layer in
turn is the only one whose quantizers are on, and the model is scored on the same validation batches as the float
model. The score is the QAT probe's (:mod:`progress`): accuracy where the batches carry class labels, next-token
perplexity for a causal LM, otherwise the cosine of each sample's output to the float model's. A layer's cost is
how much worse the score gets (accuracy and cosine: the drop; perplexity: the rise). Quantizing layers one at a
time misses their interactions, so the sum of the costs only estimates the whole model's loss; the budget
(:mod:`budget`) measures the whole model again after every choice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_accel._core.inputs import batch_picker
from lightning_accel._core.scoring import cost_of, probe_on
from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.dynamic import DynamicActivationFakeQuant
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_accel.quantization.prepare import float_copy, quantized_modules
from lightning_accel.quantization.progress import QualityProbe

#: Validation batches each probe scores (the same batches for every layer and for the float model).
SENSITIVITY_BATCHES = 8


@dataclass(frozen=True)
class LayerCost:
    """What quantizing one layer alone costs.

    Attributes:
        name: The layer's module name.
        score: The model's score with only this layer quantized.
        cost: How much worse than the float model (positive: worse), in the score's unit.
    """

    name: str
    score: float
    cost: float


@dataclass
class Sensitivity:
    """Every layer's cost, most sensitive first, with the float model's score and how long the probes took."""

    metric: str
    float_score: float
    costs: list[LayerCost] = field(default_factory=list)
    seconds: float = 0.0

    def by_name(self) -> dict[str, LayerCost]:
        """The costs by layer name."""
        return {cost.name: cost for cost in self.costs}

    def describe(self, limit: int = 5) -> str:
        """One line: the metric, the float score, the most sensitive layers and the time it took."""
        top = ", ".join(f"{c.name} ({c.cost:+.4f})" for c in self.costs[:limit])
        return (
            f"int8 sensitivity ({self.metric}, float {self.float_score:.4f}) of {len(self.costs)} layers in "
            f"{self.seconds:.2f} s; most sensitive: {top}"
        )


def _quantizers_of(module: nn.Module) -> list[nn.Module]:
    kinds = ActivationFakeQuant | WeightFakeQuant | DynamicActivationFakeQuant
    return [m for m in module.modules() if isinstance(m, kinds)]


@contextmanager
def only_quantized(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, fake quantization is on for the named layers' quantizers only (restored after)."""
    everything = _quantizers_of(model)
    saved = [(q, q.fake_quant, q.observe) for q in everything]
    layers = quantized_modules(model)
    chosen = {id(q) for name in names for q in _quantizers_of(layers[name])}
    try:
        for quantizer in everything:
            quantizer.fake_quant, quantizer.observe = id(quantizer) in chosen, False
        yield
    finally:
        for quantizer, fake_quant, observe in saved:
            quantizer.fake_quant, quantizer.observe = fake_quant, observe


def scoring_probe(model: nn.Module, batches: Sequence[Any], model_input: Any = None) -> QualityProbe:
    """A probe scoring on ``batches`` against ``model``'s float outputs (accuracy, perplexity or cosine)."""
    return probe_on(float_copy(model).eval(), batches, batch_picker(model_input, model))


@torch.no_grad()
def int8_sensitivity(
    model: nn.Module,
    calibration: Iterable[Any],
    validation: Iterable[Any],
    model_input: Any = None,
    calibration_batches: int = 8,
    progress: bool = True,
    **prepare: Any,
) -> tuple[Sensitivity, nn.Module, QualityProbe]:
    """Score every layer's int8 quantization alone, on validation batches, from one calibration.

    Args:
        model: The trained float model (not changed).
        calibration: Batches to calibrate on (e.g. a training DataLoader).
        validation: Batches to score on (the first :data:`SENSITIVITY_BATCHES`).
        model_input: Which part of a batch is the model's input (see ``PostTrainingQuantization``).
        calibration_batches: How many calibration batches.
        progress: Show a progress bar over the layers.
        **prepare: ``calibrate_``'s preparation options (``include``, ``exclude``, ``weight_bits``, ...).

    Returns:
        The sensitivity, the calibrated copy (every layer quantized) it was measured on, and the probe that scored
        it (the same batches score any later choice).
    """
    started = time.perf_counter()
    batches = [batch for _, batch in zip(range(SENSITIVITY_BATCHES), validation, strict=False)]
    if not batches:
        raise ValueError("int8_sensitivity: `validation` gave no batch to score on")
    probe = scoring_probe(model, batches, model_input)
    plain = float_copy(model).eval()
    reference = probe.score(plain)
    picker = batch_picker(model_input, model)
    quantized = calibrate_(plain, calibration, calibration_batches, model_input=picker, **prepare).eval()
    costs = layer_costs(quantized, probe, reference, progress)
    return Sensitivity(probe.metric, reference, costs, time.perf_counter() - started), quantized, probe


def layer_costs(quantized: nn.Module, probe: QualityProbe, reference: float, progress: bool = True) -> list[LayerCost]:
    """Each quantized layer of ``quantized`` scored alone (the others float), most costly first."""
    costs = []
    for name in progress_bar(list(quantized_modules(quantized)), progress, "int8 sensitivity"):
        with only_quantized(quantized, [name]):
            score = probe.score(quantized)
        costs.append(LayerCost(name, score, cost_of(probe.metric, reference, score)))
    return sorted(costs, key=lambda c: c.cost, reverse=True)


def progress_bar(items: list[str], show: bool, description: str) -> Iterable[str]:
    """``items`` with a progress bar over them (tqdm, a Lightning dependency) when ``show``."""
    if not show:
        return items
    from tqdm.auto import tqdm  # a Lightning dependency

    return tqdm(items, desc=description, unit="layer", leave=False)

"""The quality budget for group-wise (int4) weights: the most sensitive layers step to 8 bits, then float.

:func:`weight_only_within_budget` measures each layer's int4 cost alone (swapped into a float copy), then holds
back the costliest layers of the whole int4 model until it scores within the budget (see :mod:`budget` for the
scoring rule and the unit of ``max_quality_loss``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.modules import module_copy
from lightning_accel._core.scoring import cost_of
from lightning_accel.quantization.budget import BudgetResult, keep_float_until_within
from lightning_accel.quantization.progress import QualityProbe
from lightning_accel.quantization.sensitivity import (
    SENSITIVITY_BATCHES,
    LayerCost,
    Sensitivity,
    progress_bar,
    scoring_probe,
)
from lightning_accel.quantization.weight_only import WeightOnlySettings, group_quantized_layers


@dataclass(frozen=True)
class BudgetData:
    """The batches a budget measures with.

    Attributes:
        calibration: Batches to calibrate on (``None``: a data-free method such as round to nearest).
        validation: Batches to score on (the first 8).
        model_input: Which part of a batch is the model's input.
        calibration_batches: How many calibration batches.
        progress: Show a progress bar over the per-layer probes.
        owner: The callback named in the log line.
    """

    calibration: Iterable[Any] | None
    validation: Iterable[Any]
    model_input: Any = None
    calibration_batches: int = 8
    progress: bool = True
    owner: str = "PostTrainingQuantization"


@torch.no_grad()
def weight_only_within_budget(
    model: nn.Module, settings: WeightOnlySettings, data: BudgetData, max_quality_loss: float
) -> tuple[nn.Module, BudgetResult]:
    """The group-quantized (int4) copy of ``model`` with its most sensitive layers held back until within budget.

    Each layer's cost is measured with only that layer in int4 (swapped into a float copy); then, from the whole
    int4 model, the most costly layers step back, scoring after each: with float activations first to 8-bit groups
    (every layer may), then, if the budget is still missed, to float (at least one layer stays quantized). The
    final copy is quantized afresh that way and scored once more.
    """
    calibration, validation, model_input = data.calibration, data.validation, data.model_input
    calibration_batches, progress = data.calibration_batches, data.progress
    started = time.perf_counter()
    batches = [batch for _, batch in zip(range(SENSITIVITY_BATCHES), validation, strict=False)]
    probe = scoring_probe(model, batches, model_input)
    plain = module_copy(model).eval()
    reference = probe.score(plain)
    calibration = list(itertools.islice(calibration, calibration_batches)) if calibration is not None else None
    options = {"calibration_batches": calibration_batches, "model_input": model_input}
    quantized = settings.quantize(model, calibration, **options)
    layers = group_quantized_layers(quantized)
    costs = []
    for name in progress_bar(list(layers), progress, f"int{settings.bits} sensitivity"):
        original = plain.get_submodule(name)
        plain.set_submodule(name, layers[name])
        alone = probe.score(plain)
        plain.set_submodule(name, original)
        costs.append(LayerCost(name, alone, cost_of(probe.metric, reference, alone)))
    costs.sort(key=lambda c: c.cost, reverse=True)
    sensitivity = Sensitivity(probe.metric, reference, costs, time.perf_counter() - started)

    kept_8bit, kept = _step_back(model, quantized, settings, sensitivity, max_quality_loss, probe, calibration, options)
    held = [n for n, _ in kept], [n for n, _ in kept_8bit]
    final = _requantized(model, settings, calibration, options, *held, any_int4=len(layers) > sum(map(len, held)))
    label = f"int{settings.bits}"
    result = BudgetResult(
        max_quality_loss, probe.metric, reference, probe.score(final), kept, sensitivity, label, kept_8bit
    )
    (rank_zero_info if result.met else rank_zero_warn)(f"{data.owner}: {result.describe()}")
    return final, result


def _step_back(
    model: nn.Module,
    quantized: nn.Module,
    settings: WeightOnlySettings,
    sensitivity: Sensitivity,
    max_quality_loss: float,
    probe: QualityProbe,
    calibration: list[Any] | None,
    options: dict[str, Any],
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """In ``quantized``, the most sensitive layers to 8-bit groups, then (if still missed) to float: both lists.

    Int4 with float activations (W4A16) steps through 8 bits first (the same kernel, twice the weight bytes);
    8da4w has no 8-bit kernel to step to and goes straight to float. Sensitivities do not add up, so a layer held
    back early may not be needed once a later one went float: the held layers then try, least sensitive first, one
    step back down (float to 8 bits, 8 bits to int4), kept there only when the model stays within the budget. Every
    step is measured.
    """
    int4 = group_quantized_layers(quantized)
    formats: dict[str, dict[str, nn.Module]] = {"int4": int4}
    if settings.bits == 4 and settings.activations == "float":
        eight = dataclasses.replace(settings, bits=8).quantize(model, calibration, **options)
        formats["int8"] = group_quantized_layers(eight)
    formats["float"] = {name: module_copy(model.get_submodule(name)).eval() for name in int4}
    chosen = dict.fromkeys(int4, "int4")

    def score() -> float:
        return probe.score(quantized)

    def within() -> bool:
        return not _missed(sensitivity, score(), max_quality_loss)

    def put(name: str, fmt: str) -> None:
        chosen[name] = fmt
        quantized.set_submodule(name, formats[fmt][name])

    for fmt in list(formats)[1:]:  # up the ladder: the most sensitive layers first
        keep_float_until_within(sensitivity, max_quality_loss, score, functools.partial(put, fmt=fmt), fmt != "float")
    ladder = list(formats)
    for layer in reversed(sensitivity.costs):  # and back down where the budget allows
        while chosen[layer.name] != "int4" and within():
            before = chosen[layer.name]
            put(layer.name, ladder[ladder.index(before) - 1])
            if not within():
                put(layer.name, before)
                break
    held = [(c.name, c.cost) for c in sensitivity.costs]
    return [h for h in held if chosen[h[0]] == "int8"], [h for h in held if chosen[h[0]] == "float"]


def _missed(sensitivity: Sensitivity, score: float, max_quality_loss: float) -> bool:
    return cost_of(sensitivity.metric, sensitivity.float_score, score) > max_quality_loss


def _requantized(
    model: nn.Module,
    settings: WeightOnlySettings,
    calibration: list[Any] | None,
    options: dict[str, Any],
    kept_float: list[str],
    kept_8bit: list[str],
    any_int4: bool,
) -> nn.Module:
    """``model`` quantized afresh: the kept layers float, then (if any) the held-back ones at 8-bit groups.

    ``any_int4`` is false when no layer is left in int4 (all held back): the first step is then a float copy.
    """
    exclude = (*(settings.exclude or ()), *kept_float, *kept_8bit)
    if any_int4:
        final = dataclasses.replace(settings, exclude=exclude or None).quantize(model, calibration, **options)
    else:
        final = module_copy(model).eval()
    if not kept_8bit:
        return final
    eight = dataclasses.replace(settings, bits=8, include=tuple(kept_8bit), exclude=None)
    return eight.quantize(final, calibration, **options)

"""Quantization within a quality budget: the most sensitive layers stay float until the measured loss is within it.

``max_quality_loss`` is what the user may lose, in the score's own unit (:mod:`sensitivity`): accuracy points as a
fraction (0.01 = one point) where batches carry labels, perplexity for a causal LM, and for other models one minus
the cosine of each output to the float model's (0.01: cosine at least 0.99). The whole model is quantized and
scored; while its loss exceeds the budget, the layer whose quantization alone cost most is kept float and the
model is scored again (sensitivities do not add up, so every step is measured, never estimated). The final model is
calibrated afresh without the kept layers and measured once more: that figure is the promise (contract 15). A
budget that even the float-kept choice cannot meet is a warning with the figures, never silence.

Three entry points: :func:`quantize_within_budget` (int8 PTQ), :func:`trained_within_budget` (int8 QAT, at the end
of fit: the trained layers go back to float) and :mod:`budget_int4`'s ``weight_only_within_budget`` (int4 groups,
PTQ: held back to 8-bit groups first, then float).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.inputs import batch_picker
from lightning_accel._core.lightning import validation_loader
from lightning_accel._core.modules import module_copy
from lightning_accel._core.scoring import cost_of
from lightning_accel._core.validation import validate_quality_budget
from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.convert import as_evaluated
from lightning_accel.quantization.prepare import float_copy, quantized_modules, unprepare_module_
from lightning_accel.quantization.progress import QualityProbe
from lightning_accel.quantization.sensitivity import (
    SENSITIVITY_BATCHES,
    Sensitivity,
    int8_sensitivity,
    layer_costs,
    only_quantized,
    scoring_probe,
)


@dataclass
class BudgetResult:
    """What the budget decided and what was measured.

    Attributes:
        budget: The allowed loss.
        metric: The score's unit (``"accuracy"``, ``"perplexity"`` or ``"cosine"``).
        float_score: The float model's score.
        final_score: The deployed model's score (calibrated without the kept layers).
        kept_float: The layers kept float, most sensitive first, each with its cost when quantized alone.
        sensitivity: Every layer's cost.
        label: The format quantized to (``"int8"``, ``"int4"``).
        kept_8bit: Where 4 bits were asked, the layers held at 8-bit groups instead, with their int4 cost alone.
    """

    budget: float
    metric: str
    float_score: float
    final_score: float
    kept_float: list[tuple[str, float]] = field(default_factory=list)
    sensitivity: Sensitivity | None = None
    label: str = "int8"
    kept_8bit: list[tuple[str, float]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """The deployed model's measured loss against the float model."""
        return cost_of(self.metric, self.float_score, self.final_score)

    @property
    def met(self) -> bool:
        """Whether the measured loss is within the budget."""
        return self.loss <= self.budget

    def as_dict(self, limit: int = 20) -> dict[str, Any]:
        """Plain values for ``report.json``: the figures, and the ``limit`` most sensitive layers with their costs."""
        kept = {name for name, _ in self.kept_float}
        at_8_bits = {name for name, _ in self.kept_8bit}
        costs = self.sensitivity.costs[:limit] if self.sensitivity is not None else []
        return {
            "budget": self.budget,
            "metric": self.metric,
            "float": self.float_score,
            "final": self.final_score,
            "loss": self.loss,
            "met": self.met,
            "sensitivity_seconds": self.sensitivity.seconds if self.sensitivity is not None else None,
            "layers": [
                {"name": c.name, "cost": c.cost, "kept_float": c.name in kept, "kept_8bit": c.name in at_8_bits}
                for c in costs
            ],
        }

    def describe(self) -> str:
        """One line: the budget, the measured figures and every layer kept float with its cost."""
        kept = ", ".join(f"{name} (alone {cost:+.4f})" for name, cost in self.kept_float) or "none"
        verdict = "met" if self.met else "MISSED"
        held = ", ".join(f"{name} (int4 alone {cost:+.4f})" for name, cost in self.kept_8bit)
        return (
            f"quality budget {self.budget:g} ({self.metric}) {verdict}: float {self.float_score:.4f}, {self.label} "
            f"{self.final_score:.4f} (loss {self.loss:+.4f}); {f'held at int8 groups: {held}; ' if held else ''}"
            f"kept float: {kept}"
        )


def strip_layers_(model: nn.Module, names: list[str]) -> None:
    """Keep the named fake-quantized layers of ``model`` in float, in place (with their folded BatchNorm and ReLU).

    Everything else stays prepared; a later ``to_deployable`` exports the named layers as plain float layers.
    """
    layers = quantized_modules(model)
    for name in names:
        layer = layers[name]
        bn = layer.folded_bn
        for part in (layer, bn, getattr(layer, "relu_after", None), getattr(bn, "relu_after", None)):
            if part is not None:
                unprepare_module_(part)
        object.__setattr__(layer, "relu_after", None)


def validate_budget(max_quality_loss: Any) -> float | None:
    """``None``, or a non-negative finite number: the allowed loss (``ValueError`` naming the argument)."""
    return None if max_quality_loss is None else validate_quality_budget(max_quality_loss)


@torch.no_grad()
def quantize_within_budget(
    model: nn.Module,
    calibration: Iterable[Any],
    validation: Iterable[Any],
    max_quality_loss: float,
    model_input: Any = None,
    calibration_batches: int = 8,
    progress: bool = True,
    **prepare: Any,
) -> tuple[nn.Module, BudgetResult]:
    """A calibrated int8 copy of ``model`` whose measured loss is within ``max_quality_loss``, if any choice is.

    Args:
        model: The trained float model (not changed).
        calibration: Batches to calibrate on.
        validation: Batches to score on (the same ones for every measurement).
        max_quality_loss: The allowed loss (see the module docstring for its unit).
        model_input: Which part of a batch is the model's input.
        calibration_batches: How many calibration batches.
        progress: Show a progress bar over the sensitivity probes.
        **prepare: ``calibrate_``'s preparation options (``include``, ``exclude``, ...).

    Returns:
        The calibrated copy (kept layers excluded) and what was decided and measured.
    """
    calibration = list(itertools.islice(calibration, calibration_batches))
    sensitivity, quantized, probe = int8_sensitivity(
        model, calibration, validation, model_input, calibration_batches, progress, **prepare
    )
    kept = _keep_fake_quant_layers_float(quantized, probe, sensitivity, max_quality_loss)
    exclude = [*(prepare.pop("exclude", None) or []), *(name for name, _ in kept)]
    picker = batch_picker(model_input, model)
    plain = float_copy(model).eval()
    final = calibrate_(plain, calibration, calibration_batches, model_input=picker, exclude=exclude or None, **prepare)
    result = BudgetResult(
        max_quality_loss, probe.metric, sensitivity.float_score, probe.score(final.eval()), kept, sensitivity
    )
    if result.met:
        rank_zero_info(f"PostTrainingQuantization: {result.describe()}")
    else:
        rank_zero_warn(f"PostTrainingQuantization: {result.describe()}")
    return final, result


def keep_float_until_within(
    sensitivity: Sensitivity,
    max_quality_loss: float,
    score: Callable[[], float],
    keep_float: Callable[[str], None],
    keep_all: bool = False,
) -> list[tuple[str, float]]:
    """The layers to keep float, most sensitive first, until the whole model scores within the budget.

    ``score()`` scores the model as it stands and ``keep_float(name)`` puts one more layer back in float: every step
    is measured, never summed from the single costs. At least one layer stays quantized: an all-float model is no
    answer (the budget is then missed). ``keep_all``: the step is to a finer format, not float (int4 to 8 bits),
    and may take every layer.
    """
    kept: list[tuple[str, float]] = []
    current = score()
    most = len(sensitivity.costs) - (0 if keep_all else 1)
    for layer in sensitivity.costs:
        loss = cost_of(sensitivity.metric, sensitivity.float_score, current)
        if loss <= max_quality_loss or len(kept) == most:
            break
        kept.append((layer.name, layer.cost))
        keep_float(layer.name)
        current = score()
    return kept


def _keep_fake_quant_layers_float(
    quantized: nn.Module, probe: QualityProbe, sensitivity: Sensitivity, max_quality_loss: float
) -> list[tuple[str, float]]:
    """:func:`keep_float_until_within` on a fake-quantized model: a kept layer's quantizers are switched off."""
    names = list(quantized_modules(quantized))
    floats: set[str] = set()

    def score() -> float:
        if not floats:
            return probe.score(quantized)
        with only_quantized(quantized, [name for name in names if name not in floats]):
            return probe.score(quantized)

    return keep_float_until_within(sensitivity, max_quality_loss, score, floats.add)


@torch.no_grad()
def trained_within_budget(
    model: nn.Module, trainer: Any, max_quality_loss: float | None, model_input: Any, notes: list[str]
) -> tuple[nn.Module, BudgetResult | None]:
    """For a QAT-trained model: a copy with its most sensitive layers back in float until within the budget.

    The trained weights stay as trained (a layer kept float runs its QAT weights in float); the sensitivity is
    measured on the model as evaluated (on the trainer's validation batches, else training batches), and the
    returned copy is scored again. The result's line is appended to ``notes``. Without a budget: ``model``.
    """
    if max_quality_loss is None:
        return model, None
    validation = validation_loader(trainer) or trainer.train_dataloader
    started = time.perf_counter()
    batches = [batch for _, batch in zip(range(SENSITIVITY_BATCHES), validation, strict=False)]
    probe = scoring_probe(model, batches, model_input)
    reference = probe.score(float_copy(model).eval())
    evaluated = as_evaluated(model)
    costs = layer_costs(evaluated, probe, reference)
    sensitivity = Sensitivity(probe.metric, reference, costs, time.perf_counter() - started)
    kept = _keep_fake_quant_layers_float(evaluated, probe, sensitivity, max_quality_loss)
    final = module_copy(model)
    strip_layers_(final, [name for name, _ in kept])
    result = BudgetResult(
        max_quality_loss, probe.metric, reference, probe.score(as_evaluated(final)), kept, sensitivity
    )
    (rank_zero_info if result.met else rank_zero_warn)(f"QuantizationAwareTraining: {result.describe()}")
    notes.append(f"QAT: {result.describe()}.")
    return final, result

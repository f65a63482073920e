"""Int8 within a quality budget: the most sensitive layers stay float until the measured loss is within it.

``max_quality_loss`` is what the user may lose, in the score's own unit (:mod:`sensitivity`): accuracy points as a
fraction (0.01 = one point) where batches carry labels, perplexity for a causal LM, and for other models one minus
the cosine of each output to the float model's (0.01: cosine at least 0.99). The whole model is quantized and
scored; while its loss exceeds the budget, the layer whose quantization alone cost most is kept float and the
model is scored again (sensitivities do not add up, so every step is measured, never estimated). The final model is
calibrated afresh without the kept layers and measured once more: that figure is the promise (contract 15). A
budget that even the float-kept choice cannot meet is a warning with the figures, never silence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.inputs import batch_picker
from lightning_accel.quantization.calibration import calibrate_
from lightning_accel.quantization.prepare import float_copy, quantized_modules
from lightning_accel.quantization.sensitivity import Sensitivity, cost_of, int8_sensitivity, only_quantized


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
    """

    budget: float
    metric: str
    float_score: float
    final_score: float
    kept_float: list[tuple[str, float]] = field(default_factory=list)
    sensitivity: Sensitivity | None = None

    @property
    def loss(self) -> float:
        """The deployed model's measured loss against the float model."""
        return cost_of(self.metric, self.float_score, self.final_score)

    @property
    def met(self) -> bool:
        """Whether the measured loss is within the budget."""
        return self.loss <= self.budget

    def describe(self) -> str:
        """One line: the budget, the measured figures and every layer kept float with its cost."""
        kept = ", ".join(f"{name} (alone {cost:+.4f})" for name, cost in self.kept_float) or "none"
        verdict = "met" if self.met else "MISSED"
        return (
            f"quality budget {self.budget:g} ({self.metric}) {verdict}: float {self.float_score:.4f}, int8 "
            f"{self.final_score:.4f} (loss {self.loss:+.4f}); kept float: {kept}"
        )


def validate_budget(max_quality_loss: Any) -> float | None:
    """``None``, or a non-negative finite number: the allowed loss (``ValueError`` naming the argument)."""
    if max_quality_loss is None:
        return None
    if isinstance(max_quality_loss, bool) or not isinstance(max_quality_loss, int | float):
        raise ValueError(f"`max_quality_loss` must be a number >= 0 or None, got {max_quality_loss!r}")
    value = float(max_quality_loss)
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"`max_quality_loss` must be a finite number >= 0, got {max_quality_loss!r}")
    return value


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
    calibration = list(_first(calibration, calibration_batches))
    sensitivity, quantized, probe = int8_sensitivity(
        model, calibration, validation, model_input, calibration_batches, progress, **prepare
    )
    names = list(quantized_modules(quantized))
    kept: list[tuple[str, float]] = []
    score = probe.score(quantized)
    for layer in sensitivity.costs:
        # Keep at least one layer quantized: an all-float "int8" model is no answer (the budget is then missed).
        if cost_of(probe.metric, sensitivity.float_score, score) <= max_quality_loss or len(kept) == len(names) - 1:
            break
        kept.append((layer.name, layer.cost))
        still_quantized = [name for name in names if name not in {k for k, _ in kept}]
        with only_quantized(quantized, still_quantized):
            score = probe.score(quantized)
    exclude = [*(prepare.pop("exclude", None) or []), *(name for name, _ in kept)]
    picker = model_input if callable(model_input) else batch_picker(model_input, model)
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


def _first(batches: Iterable[Any], count: int) -> Iterable[Any]:
    for index, batch in enumerate(batches):
        if index >= count:
            return
        yield batch

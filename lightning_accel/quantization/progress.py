"""Whether QAT made the quantized model better: its quality when QAT starts (PTQ of those weights) and at the end.

QAT should never end worse than post-training quantization of the model it started from. When fake quantization
starts, a copy of the float model is quantized (int8: calibrated on the first batches of a new training loader;
int4: rounded to nearest, what QAT starts from) and scored on a few validation batches; at the end of fit the QAT
model is scored on the same batches. The score is accuracy where the batches carry class labels; perplexity (the
exponential of the mean next-token cross-entropy) for a causal language model, whose input is the token ids its
``[batch, tokens, vocabulary]`` logits predict; otherwise the cosine of each sample's output to the float model's
at QAT start (for an encoder distilled from its pretrained self, the figure that matters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.lightning import validation_loader
from lightning_accel._core.scoring import QualityProbe, probe_on
from lightning_accel.quantization.calibration import (
    batch_picker,
    calibrate_,
    fresh_train_loader,
)
from lightning_accel.quantization.prepare import float_copy

#: Validation batches scored at QAT start and end, and training batches PTQ calibrates on.
QUALITY_BATCHES = 8
CALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class ProbeRecipe:
    """How the probe makes the model it scores at QAT start.

    Attributes:
        quantize: ``(float copy, calibration batches) -> quantized copy`` (PTQ of the current weights).
        float_view: The float copy of the model being trained.
        label: The format named in the messages (``"int8"``, ``"int4"``).
    """

    quantize: Callable[[nn.Module, Any], nn.Module]
    float_view: Callable[[nn.Module], nn.Module] = float_copy
    label: str = "int8"


@torch.no_grad()
def probe_at_start(
    trainer: Trainer, pl_module: LightningModule, model_input: Any, recipe: ProbeRecipe, training_batches: list[Any]
) -> QualityProbe | None:
    """Score PTQ of the current float weights on a few validation batches; ``None`` without data to score on.

    Runs mid-epoch, so it never iterates the fit's training loader: with ``persistent_workers=True`` a second
    ``iter()`` resets the very iterator the fit loop is consuming (samples repeat or are skipped, on this rank
    only). PTQ calibrates on a new training loader from the data module (its first batches, the same in a resumed
    run), else on ``training_batches``, the batches the callback saw pass through training; the scored batches
    come from the validation loader (not in use between validation runs), or those training batches.
    """
    if not training_batches:
        return None
    calibration = fresh_train_loader(trainer) or training_batches
    loader = validation_loader(trainer)
    source = loader if loader is not None else training_batches
    batches = [batch for _, batch in zip(range(QUALITY_BATCHES), source, strict=False)]
    if not batches:
        return None
    plain = recipe.float_view(pl_module).eval()
    probe = probe_on(plain, batches, batch_picker(model_input, pl_module), recipe.label)
    probe.start = probe.score(recipe.quantize(plain, calibration).eval())
    return probe


def int8_ptq(model_input: Any, prepare: dict[str, Any]) -> ProbeRecipe:
    """PTQ for the probe: calibrate the float copy as QAT prepares it, on the first calibration batches."""
    return ProbeRecipe(
        lambda plain, calibration: calibrate_(
            plain, calibration, CALIBRATION_BATCHES, model_input=model_input, **prepare
        )
    )


def start_probe(
    trainer: Trainer, pl_module: LightningModule, model_input: Any, recipe: ProbeRecipe, batches: list[Any]
) -> QualityProbe | None:
    """:func:`probe_at_start`, leaving every RNG as it was, logged; ``None`` (and a note) when it cannot run.

    A score for the log is never a reason to stop training: any error becomes an info line.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            probe = probe_at_start(trainer, pl_module, model_input, recipe, batches)
    except Exception as error:
        rank_zero_info(f"QuantizationAwareTraining: {recipe.label} quality at QAT start not measured ({error})")
        return None
    if probe is not None:
        rank_zero_info(
            f"QuantizationAwareTraining: {recipe.label} {probe.metric} when QAT starts (PTQ of these weights): "
            f"{probe.start:.4f}"
        )
    return probe


def end_probe(probe: QualityProbe, evaluated: nn.Module) -> dict[str, Any] | None:
    """Score the quantized model as evaluated at the end of fit (once), log it, and warn if QAT ended below PTQ."""
    if probe.end is not None:
        return None
    probe.end = probe.score(evaluated)
    rank_zero_info(f"QuantizationAwareTraining: {probe.describe()}")
    if probe.ended_worse():
        rank_zero_warn(
            f"QuantizationAwareTraining ended worse than it started: {probe.describe()}. Post-training "
            "quantization of the starting weights would have been better; try a lower learning rate, a later "
            "`freeze_observers_step`, or PostTrainingQuantization."
        )
    return {"metric": probe.metric, "value": probe.end}

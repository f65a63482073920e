"""QAT's schedule: which phase each optimizer step is in, from the step options resolved against the fit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_accel._core.validation import resolve_step, validate_step

#: Phases logged as ``qat/phase``.
PHASE_FLOAT, PHASE_OBSERVING, PHASE_FROZEN = 0, 1, 2

#: (start, freeze observers, freeze BatchNorm) as optimizer steps.
Steps = tuple[int, int | None, int | None]


def check_step_order(start_step: int | float, freeze_observers_step: int | float | None) -> None:
    """Refuse observers that freeze before QAT starts (when both are given in the same unit)."""
    comparable = type(freeze_observers_step) is type(start_step)
    if freeze_observers_step is not None and comparable and freeze_observers_step <= start_step:
        raise ValueError(
            f"`freeze_observers_step` must be > `start_step` ({start_step}) so that ranges are observed before "
            f"they are frozen, or None; got {freeze_observers_step!r}"
        )


def phase_at(steps: Steps, step: int) -> int:
    """The phase at optimizer step ``step``: float, observing (fake-quant on) or frozen."""
    start, freeze_observers, _ = steps
    if step < start:
        return PHASE_FLOAT
    if freeze_observers is not None and step >= freeze_observers:
        return PHASE_FROZEN
    return PHASE_OBSERVING


def resolve_qat_steps(total: Any, start_step: Any, freeze_observers_step: Any, freeze_bn_step: Any) -> Steps:
    """Turn fractional step options into optimizer steps of a fit of ``total`` steps, and check their order.

    Raises:
        ValueError: when the observers would freeze before QAT starts, or QAT would never start in this fit.
    """
    start = resolve_step("start_step", start_step, total)
    freeze_observers = resolve_step("freeze_observers_step", freeze_observers_step, total)
    freeze_bn = resolve_step("freeze_bn_step", freeze_bn_step, total)
    if freeze_observers is not None and freeze_observers <= start:
        raise ValueError(
            f"`freeze_observers_step` ({freeze_observers_step!r} = step {freeze_observers}) must come after "
            f"`start_step` ({start_step!r} = step {start}) in this fit of {total} steps"
        )
    if isinstance(total, int | float) and math.isfinite(total) and total > 0 and start >= total:
        # Known before the first step: training the whole fit in float and only then finding no int8 model
        # cost a user 446 s.
        raise ValueError(
            f"QuantizationAwareTraining: `start_step` {start_step!r} (step {start}) is never reached in "
            f"this fit of {int(total)} training steps, so there would be no int8 model. Set `start_step` below "
            f"{int(total)}, or as a fraction of training such as 0.67"
        )
    return start, freeze_observers, freeze_bn


def phase_from_restored_state(quantizers: Mapping[str, Any], restored_quantized: bool, stage: str) -> int:
    """The phase ``validate``/``test``/``predict`` evaluate in outside fit, from the restored quantizer state.

    Lightning does not restore ``global_step`` there, so the state decides: quantized if the quantizers hold
    observed ranges (or a dynamic-only model's state says it was quantized), float with a warning if nothing was
    restored.

    Raises:
        RuntimeError: when only some quantizers have ranges (the checkpoint does not match the selection).
    """
    calibrated = [name for name, q in quantizers.items() if q.calibrated]
    if len(calibrated) == len(quantizers) and (quantizers or restored_quantized):
        return PHASE_FROZEN
    if calibrated:
        missing = [name for name in quantizers if name not in calibrated]
        raise RuntimeError(
            f"QuantizationAwareTraining: the restored quantizer state has ranges for {len(calibrated)} of "
            f"{len(quantizers)} quantizers (missing: {missing[:5]}); the checkpoint does not match this model's "
            "selection"
        )
    rank_zero_warn(
        f"QuantizationAwareTraining: no quantizer state was restored, so `{stage}` scores the float model, not the "
        "int8 one. Pass `ckpt_path=` a checkpoint written after QAT's start_step."
    )
    return PHASE_FLOAT


def validate_qat_steps(start: Any, freeze_observers: Any, freeze_bn: Any) -> tuple[Any, Any, Any]:
    """QAT's three step options, each checked (an int step or a fraction), in a possible order."""
    start = validate_step("start_step", start)
    freeze_observers = validate_step("freeze_observers_step", freeze_observers, allow_none=True)
    freeze_bn = validate_step("freeze_bn_step", freeze_bn, allow_none=True)
    check_step_order(start, freeze_observers)
    return start, freeze_observers, freeze_bn


def known_steps(steps: tuple[Any, Any, Any]) -> tuple[int, int | None, int | None] | None:
    """The steps as given when none is a fraction (else ``None`` until fit start resolves them)."""
    return None if any(isinstance(v, float) for v in steps) else steps

"""Sparsity schedules: pure functions of the step, so that resuming at any step gives the same target."""

from __future__ import annotations

from typing import Literal, get_args

from lightning_accel._core.validation import resolve_step, validate_fraction, validate_int, validate_step

Schedule = Literal["one_shot", "linear", "cubic"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def validate_schedule(
    schedule: str,
    target_sparsity: float,
    initial_sparsity: float,
    start_step: int | float,
    end_step: int | float | None,
    allow_fractions: bool = False,
) -> None:
    """Raise ``ValueError`` naming the argument when a schedule setting is out of range.

    With ``allow_fractions``, steps may also be fractions of the fit's training steps (floats in (0, 1]), as the
    callbacks accept them; they are compared with each other only when both are of the same kind.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}")
    validate_fraction("target_sparsity", target_sparsity)
    validate_fraction("initial_sparsity", initial_sparsity)
    if initial_sparsity > target_sparsity:
        raise ValueError(
            f"`initial_sparsity` must be <= `target_sparsity` ({target_sparsity!r}), got {initial_sparsity!r}"
        )
    if allow_fractions:
        start_step = validate_step("start_step", start_step)
        end_step = validate_step("end_step", end_step, allow_none=True)
    else:
        validate_int("start_step", start_step, 0)
        if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int)):
            raise ValueError(f"`end_step` must be an integer > `start_step` ({start_step}) or None, got {end_step!r}")
    if end_step is not None and type(end_step) is type(start_step) and end_step <= start_step:
        raise ValueError(f"`end_step` must be > `start_step` ({start_step}), got {end_step!r}")


def sparsity_at(
    step: int,
    target_sparsity: float,
    schedule: Schedule = "cubic",
    initial_sparsity: float = 0.0,
    start_step: int = 0,
    end_step: int = 1,
) -> float:
    """Return the absolute sparsity the schedule asks for at ``step``.

    The value depends on ``step`` alone (it never compounds), so asking twice at one step gives one answer.

    * ``"one_shot"``: 0 before ``start_step``, then ``target_sparsity``.
    * ``"linear"``: from ``initial_sparsity`` at ``start_step`` to ``target_sparsity`` at ``end_step``.
    * ``"cubic"``: Zhu & Gupta (2017), ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3``: fast
      pruning early, while the network can still recover, and slow near the target.

    Before ``start_step`` the gradual schedules return 0 (dense training); from ``end_step`` on, the target.

    Args:
        step: Optimizer step (``trainer.global_step``).
        target_sparsity: Final fraction of zeros ``s_f``, in [0, 1).
        schedule: ``"one_shot"``, ``"linear"`` or ``"cubic"``.
        initial_sparsity: Sparsity ``s_i`` at ``start_step`` for the gradual schedules.
        start_step: First step ``t0`` that prunes.
        end_step: Step ``t1`` at which the target is reached.

    Example:
        >>> sparsity_at(50, 0.9, "cubic", start_step=0, end_step=100)
        0.7875
    """
    validate_schedule(schedule, target_sparsity, initial_sparsity, start_step, end_step)
    if step < start_step:
        return 0.0
    if schedule == "one_shot" or step >= end_step:
        return float(target_sparsity)
    progress = (step - start_step) / (end_step - start_step)
    remaining = 1.0 - progress if schedule == "linear" else (1.0 - progress) ** 3
    return float(target_sparsity + (initial_sparsity - target_sparsity) * remaining)


def resolve_schedule_steps(total: float, start_step: int | float, end_step: int | float) -> tuple[int, int]:
    """``start_step`` and ``end_step`` as optimizer steps of a fit of ``total`` steps (fractions resolved).

    Raises:
        ValueError: when an integer ``end_step`` does not come after the start.
    """
    start = resolve_step("start_step", start_step, total)
    end = resolve_step("end_step", end_step, total)
    if end <= start:
        if isinstance(end_step, float):  # a fraction of a short fit: prune at once after the start
            end = start + 1
        else:
            raise ValueError(
                f"`end_step` ({end_step!r}) must come after `start_step` ({start_step!r} = step {start}) "
                f"in this fit of {total} steps"
            )
    return start, end

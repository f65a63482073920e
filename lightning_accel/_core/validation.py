"""Argument checks shared by the callbacks and functions.

Each error names the argument, what is allowed, and the value given. numpy integer and float scalars are accepted
wherever Python numbers are (they come from sweeps and configs), and returned as plain Python numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def _plain_number(value: Any) -> Any:
    """A numpy (or other ``numbers``) scalar as a plain ``int``/``float``; anything else unchanged."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, float | int):
        return float(value)
    return value


def validate_int(argument: str, value: object, minimum: int, allow_none: bool = False) -> int | None:
    """Return ``value`` as an ``int`` >= ``minimum`` (or None if allowed); else raise ``ValueError`` naming it."""
    if value is None and allow_none:
        return None
    value = _plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{argument}` must be {allowed}, got {value!r}")
    return value


def validate_fraction(argument: str, value: object) -> float:
    """Return ``value`` as a ``float`` in [0, 1); else raise ``ValueError`` naming ``argument``."""
    value = _plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{argument}` must be a number in [0, 1), got {value!r}")
    return float(value)


def validate_step(argument: str, value: object, allow_none: bool = False) -> int | float | None:
    """Check a schedule position: an optimizer step (int >= 0) or a fraction of the fit's steps (float in (0, 1]).

    This is Lightning's own convention (``val_check_interval``, ``StochasticWeightAveraging(swa_epoch_start)``):
    an int counts steps, a float is a fraction of the training that :func:`resolve_step` turns into a step.
    """
    if value is None and allow_none:
        return None
    value = _plain_number(value)
    if isinstance(value, float) and value > 1.0:
        # Never guessed: 2.0 may mean step 2 or 200% of the training, and neither reading is safe to assume.
        whole = f"`{math.floor(value)}`"
        raise ValueError(
            f"`{argument}` got the float {value!r}: a float is a fraction of the fit's training steps and must be "
            f"in (0, 1]; for an optimizer step write {whole} (an integer), for a fraction write a value such as "
            f"`{min(value / 100, 1.0):g}`"
        )
    valid_int = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    valid_fraction = isinstance(value, float) and 0.0 < value <= 1.0
    if not (valid_int or valid_fraction):
        allowed = "an optimizer step (an integer >= 0) or a fraction of the fit's training steps (a float in (0, 1])"
        raise ValueError(f"`{argument}` must be {allowed}" + (" or None" if allow_none else "") + f", got {value!r}")
    return value


def resolve_step(argument: str, value: int | float | None, total_steps: float) -> int | None:
    """Turn a :func:`validate_step` value into an optimizer step, given the fit's total number of steps.

    Raises:
        ValueError: naming ``argument`` when it is a fraction and the total is unknown.
    """
    if value is None or isinstance(value, int):
        return value
    if not math.isfinite(total_steps):
        raise ValueError(
            f"`{argument}`={value!r} is a fraction of the fit's training steps, but their number is unknown "
            "(max_steps=-1 with unbounded max_epochs, or an iterable dataset without a length): give an integer "
            "step instead"
        )
    return int(value * total_steps)


def validate_patterns(argument: str, patterns: Sequence[str] | None) -> list[str] | None:
    """Check that ``patterns`` is ``None`` or a list of non-empty strings, and return it as a list.

    Raises:
        TypeError: naming ``argument`` when it is not a list of strings.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(
            f"`{argument}` must be a list of glob patterns (non-empty strings) such as ['encoder.*'], "
            f"got {patterns!r}" + (f"; write [{patterns!r}]" if isinstance(patterns, str) else "")
        )
    return list(patterns)


def validate_bool(argument: str, value: object) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (numpy booleans too); else raise ``TypeError``."""
    if type(value).__name__ == "bool_":
        value = bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be true or false, got {value!r}")
    return value


#: What an export does when the written file does not reproduce the evaluated model.
ON_MISMATCH_CHOICES = ("warn", "raise", "ignore")


def check_state_version(owner: str, state: dict[str, Any], version: int) -> None:
    """Refuse, in one line, a callback state written in another format (an earlier pre-release's checkpoint).

    Raises:
        ValueError: naming the callback, the version found and the one this release reads.
    """
    saved = state.get("version")
    if saved != version:
        raise ValueError(
            f"{owner}: the checkpoint holds this callback's state in format version {saved}, written by an earlier "
            f"pre-release of lightning_accel; this release reads version {version}. Train again, or load only the "
            "weights (`model.load_state_dict(torch.load(path)['state_dict'])`)"
        )


def validate_quality_budget(value: object) -> float | None:
    """``max_quality_loss``: ``None``, or a finite number >= 0 (``ValueError`` naming the argument otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`max_quality_loss` must be a finite number >= 0 or None, got {value!r}")
    return float(value)

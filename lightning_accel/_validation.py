"""Argument checks shared by the callbacks and functions.

Each error names the argument, what is allowed, and the value given.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_int(argument: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is an integer >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{argument}` must be {allowed}, got {value!r}")


def validate_fraction(argument: str, value: object) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{argument}` must be a number in [0, 1), got {value!r}")


def validate_patterns(argument: str, patterns: Sequence[str] | None) -> list[str] | None:
    """Check that ``patterns`` is ``None`` or a list of non-empty strings, and return it as a list.

    Raises:
        TypeError: naming ``argument`` when it is not a list of strings.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(
            f"`{argument}` must be a list of glob patterns (non-empty strings) such as ['net.*.weight'], "
            f"got {patterns!r}"
        )
    return list(patterns)


def validate_bool(argument: str, value: object) -> None:
    """Raise ``TypeError`` naming ``argument`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be true or false, got {value!r}")

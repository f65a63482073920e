"""Module paths that moved: each old module forwards its names to the new home, with a warning, for one release."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def forward_module(old: str, new: str, names: set[str]) -> Any:
    """A module ``__getattr__`` that serves ``names`` from ``new`` and warns that ``old`` is deprecated."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old} moved to {new}; import {name} from there (or from lightning_accel). The old path goes in the "
            "next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__

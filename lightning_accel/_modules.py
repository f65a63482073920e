"""Selecting parameters and modules by include/exclude glob patterns over their names."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

#: Module types whose ``weight`` the callbacks act on by default.
WEIGHT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_weights(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Select parameters by name.

    Args:
        model: The model whose ``named_parameters()`` are searched.
        include: Glob patterns over parameter names. ``None`` selects the ``weight`` of every ``nn.Linear`` and
            ``nn.Conv1d/2d/3d``, and no bias or normalisation parameter.
        exclude: Glob patterns over parameter names removed from the selection.

    Returns:
        Selected parameters by name, in ``named_parameters()`` order.
    """
    if include is None:
        default = {
            f"{module_name}.weight" if module_name else "weight"
            for module_name, module in model.named_modules()
            if isinstance(module, WEIGHT_MODULE_TYPES)
        }
        chosen = {name: p for name, p in model.named_parameters() if name in default}
    else:
        chosen = {name: p for name, p in model.named_parameters() if _matches(name, include)}
    return {name: p for name, p in chosen.items() if not (exclude and _matches(name, exclude))}


def select_modules(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = WEIGHT_MODULE_TYPES,
) -> dict[str, nn.Module]:
    """Select modules of ``types`` by name.

    Args:
        model: The model whose ``named_modules()`` are searched.
        include: Glob patterns over module names; ``None`` selects every module of ``types``.
        exclude: Glob patterns over module names removed from the selection.
        types: Only modules of these types are candidates.

    Returns:
        Selected modules by name, in ``named_modules()`` order.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, types)
        and (include is None or _matches(name, include))
        and not (exclude and _matches(name, exclude))
    }


def describe_selection(include: Sequence[str] | None, exclude: Sequence[str] | None) -> str:
    """Describe include/exclude patterns for an error message."""
    what = f"include={include!r}" if include is not None else "include=None (every Linear/Conv weight)"
    return f"{what}, exclude={exclude!r}"

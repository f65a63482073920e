"""The float view of a model that a technique instrumented for training.

Quantization swaps layers for fake-quantized subclasses and adds quantizer children; tracing (channel groups),
slimming's proofs and a distillation teacher want the plain float model those stand for, with the same names.
A technique that instruments models registers how to see through its instrumentation; the others ask
:func:`float_view` without knowing which technique that was, so no technique imports another.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: Each returns the float copy of a model it instrumented, or ``None`` for a model it did not touch.
_VIEWS: list[Callable[[nn.Module], nn.Module | None]] = []


def register_float_view(view: Callable[[nn.Module], nn.Module | None]) -> None:
    """Register how to see a model instrumented by one technique as its plain float model (once per technique)."""
    if view not in _VIEWS:
        _VIEWS.append(view)


def float_view(model: nn.Module) -> nn.Module:
    """A plain float copy of ``model`` where a technique instrumented it; ``model`` itself otherwise."""
    for view in _VIEWS:
        plain = view(model)
        if plain is not None:
            return plain
    return model

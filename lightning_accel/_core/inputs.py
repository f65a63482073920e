"""Model inputs as the tracer, the exporters and the checks take them (Lightning's convention for lists)."""

from __future__ import annotations

from typing import Any


def as_model_input(inputs: Any) -> Any:
    """A model input in the form everything here takes: a list becomes a tuple of positional inputs."""
    return tuple(inputs) if isinstance(inputs, list) else inputs


def example_input(module: Any) -> Any:
    """A module's ``example_input_array`` as a model input (a list is positional inputs), or ``None``."""
    return as_model_input(getattr(module, "example_input_array", None))

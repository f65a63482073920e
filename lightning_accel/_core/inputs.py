"""Model inputs as the tracer, the exporters and the checks take them (Lightning's convention for lists)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def as_model_input(inputs: Any) -> Any:
    """A model input in the form everything here takes: a list becomes a tuple of positional inputs."""
    return tuple(inputs) if isinstance(inputs, list) else inputs


def example_input(module: Any) -> Any:
    """A module's ``example_input_array`` as a model input (a list is positional inputs), or ``None``."""
    return as_model_input(getattr(module, "example_input_array", None))


def batch_labels(batch: Any) -> torch.Tensor | None:
    """The integer class labels of a batch: an (input, class) pair's second element or a dict's ``labels``."""
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    else:
        labels = batch[1] if isinstance(batch, tuple | list) and len(batch) == 2 else None
    is_classes = isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
    return labels if is_classes else None

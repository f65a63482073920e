"""Model inputs: picked out of a batch, run through a model, and in the form the tracer and exporters take."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_accel._core.modules import model_device


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


def default_model_input(batch: Any) -> Any:
    """The model input of a batch: its first element if it is a tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def forward_keywords(model: nn.Module) -> set[str] | None:
    """The named parameters of ``model.forward`` (``None`` when it cannot be inspected)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in kinds}


def batch_picker(
    model_input: str | int | Sequence[str] | Callable[[Any], Any] | None, model: nn.Module | None = None
) -> Callable[[Any], Any]:
    """A function that picks the model input out of a batch.

    Args:
        model_input: ``None``: the first element of a tuple/list batch; for a dict batch, the keys that the model's
            ``forward`` names as parameters (``input_ids`` and ``attention_mask``, not ``labels``, for most Hugging
            Face encoders), else the whole batch. A key of dict batches, a list of keys (passed as keywords), an
            index into tuple/list batches, or such a function itself.
        model: The model, whose ``forward`` signature the default picks dict keys by.
    """
    if callable(model_input):
        return model_input
    accepted = forward_keywords(model) if model is not None else None

    def pick(batch: Any) -> Any:
        if model_input is None:
            if isinstance(batch, Mapping) and accepted:
                taken = {k: v for k, v in batch.items() if k in accepted}
                return taken or batch
            return default_model_input(batch)
        if isinstance(model_input, list | tuple):
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"`model_input`={list(model_input)!r} names keys, but the batch is a {type(batch).__name__}"
                )
            missing = [k for k in model_input if k not in batch]
            if missing:
                raise ValueError(
                    f"`model_input` keys {missing} are not in the batch; its keys are {sorted(map(str, batch))}"
                )
            return {k: batch[k] for k in model_input}
        if isinstance(batch, Mapping):
            if model_input not in batch:
                raise ValueError(
                    f"`model_input`={model_input!r} is not a key of the batch; its keys are {sorted(map(str, batch))}"
                )
            return batch[model_input]
        if isinstance(batch, tuple | list) and isinstance(model_input, int) and -len(batch) <= model_input < len(batch):
            return batch[model_input]
        raise ValueError(
            f"`model_input`={model_input!r} cannot pick from a batch of type {type(batch).__name__}"
            + (f" with {len(batch)} elements" if isinstance(batch, tuple | list) else "")
        )

    return pick


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a picked model input: a dict as keywords, a tuple as positional inputs, else one input."""
    device = model_device(model)
    if isinstance(inputs, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    if isinstance(inputs, tuple):
        return model(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs])
    if isinstance(inputs, torch.Tensor):
        return model(inputs.to(device))
    raise TypeError(
        f"The model input picked from the batch is a {type(inputs).__name__}; it must be a tensor, a tuple of "
        "tensors or a dict of tensors. Set `model_input` to the batch key or index of the model's input."
    )

"""The tensors of a model's output, named as the ONNX export names them (shared by the export and the scoring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor


def named_outputs(outputs: Any) -> list[tuple[str, Tensor]]:
    """The tensors of a model output with the names the ONNX file gives them, in order.

    A tensor is ``output``; a tuple or list gives ``output_0``, ``output_1``, ...; a dict (HuggingFace's
    ``ModelOutput`` too) and a dataclass keep their keys and field names. Entries that are not tensors (``None``,
    ints) are left out, as the exporter leaves them out.
    """
    if isinstance(outputs, Tensor):
        return [("output", outputs)]
    if isinstance(outputs, Mapping):
        return [(str(k), v) for k, v in outputs.items() if isinstance(v, Tensor)]
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        fields = ((f.name, getattr(outputs, f.name)) for f in dataclasses.fields(outputs))
        return [(name, value) for name, value in fields if isinstance(value, Tensor)]
    if isinstance(outputs, tuple | list):
        tensors = [t for t in outputs if isinstance(t, Tensor)]
        return [("output" if len(tensors) == 1 else f"output_{i}", t) for i, t in enumerate(tensors)]
    raise TypeError(
        "The model output must be a tensor, a tuple/list of tensors, a dict or a dataclass of tensors, got "
        f"{type(outputs).__name__}"
    )


def output_tensors(outputs: Any) -> list[Tensor]:
    """The tensors of a model output, in the order of :func:`named_outputs`."""
    return [tensor for _, tensor in named_outputs(outputs)]

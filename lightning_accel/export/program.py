"""Writing a model as a ``torch.export`` program (``.pt2``) for PyTorch serving."""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel._core.files import atomic_target
from lightning_accel._core.modules import module_copy
from lightning_accel.export.check import split_example


def export_program(model: nn.Module, path: str | os.PathLike, example_input: Any) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``: weights and graph, no pickled Python code).

    The batch dimension is dynamic. The file is written under a temporary name and renamed. Load it with
    ``torch.export.load(path).module()``.
    """
    args, kwargs, _ = split_example(example_input)
    model = module_copy(model).eval().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about specialising tiny example batches
        try:
            program = torch.export.export(
                model, args, kwargs or None, dynamic_shapes=_dynamic_batch(model, args, kwargs)
            )
        except Exception:  # a model whose code pins the batch size: export it with the example's fixed shape
            program = torch.export.export(model, args, kwargs or None)
    target = Path(path)
    with atomic_target(target) as temporary:
        torch.export.save(program, str(temporary))
    return target


def _dynamic_batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` that free dimension 0 of every input, keyed by forward's parameter names."""
    batch = torch.export.Dim("batch", min=1)
    positional = [
        name
        for name, parameter in inspect.signature(model.forward).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    return {name: {0: batch} for name in [*positional[: len(args)], *kwargs]}

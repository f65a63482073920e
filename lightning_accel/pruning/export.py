"""Writing the slimmed model: fp32 ONNX, or a ``torch.export`` program (``.pt2``) for PyTorch serving."""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_accel._files import atomic_target
from lightning_accel.pruning.groups import ChannelGroups, slim
from lightning_accel.quantization.check import split_example

#: The file types a slim export writes, by suffix.
SLIM_EXPORT_SUFFIXES = (".onnx", ".pt2")


def validate_slim_export_path(export_path: Any, pattern_kind: str) -> str | None:
    """Check ``export_path`` (``None``, or a ``.onnx``/``.pt2`` path, only with ``pattern="channels"``)."""
    if export_path is None:
        return None
    if not isinstance(export_path, str | os.PathLike) or Path(export_path).suffix not in SLIM_EXPORT_SUFFIXES:
        raise ValueError(
            f"`export_path` must be a path ending in {' or '.join(SLIM_EXPORT_SUFFIXES)} (fp32 ONNX or a "
            f"torch.export program), got {export_path!r}"
        )
    if pattern_kind != "channels":
        raise ValueError(
            "`export_path` writes the physically smaller model that only pattern='channels' makes, got pattern "
            f"{pattern_kind!r}; for unstructured or N:M sparsity use `save_sparse`, or the int8 exports"
        )
    return os.fspath(export_path)


def export_program(model: nn.Module, path: str | os.PathLike, example_input: Any) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``: weights and graph, no pickled Python code).

    The batch dimension is dynamic. The file is written under a temporary name and renamed. Load it with
    ``torch.export.load(path).module()``.
    """
    args, kwargs, _ = split_example(example_input)
    model = copy.deepcopy(model).eval().float()
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


def _write_slim(
    model: nn.Module, path: Path, example_input: Any, groups: ChannelGroups | None, on_mismatch: str
) -> tuple[Path, nn.Module, nn.Module]:
    """Slim ``model`` (its float model, if prepared for QAT) and write it; return the path, model and slim model."""
    from lightning_accel.quantization.export import as_evaluated, check_rewrite, export_onnx
    from lightning_accel.quantization.prepare import float_copy, is_prepared

    if is_prepared(model):  # this export is the float model; the QAT/PTQ callbacks write the int8 one
        model = float_copy(model)
    small = slim(model, example_input, groups)
    check_rewrite(as_evaluated(model), as_evaluated(small), [example_input], "The slim model")
    if path.suffix == ".pt2":
        return export_program(small, path, example_input), model, small
    return export_onnx(small, path, example_input, on_mismatch=on_mismatch), model, small


def export_slim(
    model: nn.Module, path: str | os.PathLike, example_input: Any, groups: ChannelGroups | None = None
) -> Path:
    """Slim ``model`` (:func:`~lightning_accel.pruning.groups.slim`) and write it as ``.onnx`` (fp32) or ``.pt2``.

    A model prepared for QAT is written as its float model (the QAT/PTQ exports write int8). The ONNX export
    checks itself against the slim PyTorch model in ONNX Runtime, as :func:`export_onnx` does.

    Returns:
        The path written.
    """
    written, model, small = _write_slim(model, Path(path), example_input, groups, on_mismatch="warn")
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    rank_zero_info(
        f"Wrote the slim model to {written} ({written.stat().st_size:,} bytes; {after:,} parameters, "
        f"{after / before:.1%} of {before:,})"
    )
    return written


def dry_run_slim_export(model: nn.Module, example_input: Any, groups: ChannelGroups, export_path: str) -> None:
    """Export a copy (unpruned: nothing is removed yet) to a temporary file, so that the end of fit cannot fail."""
    try:
        with tempfile.TemporaryDirectory() as directory:
            probe = Path(directory) / f"dry_run{Path(export_path).suffix}"
            _write_slim(model, probe, example_input, groups, on_mismatch="ignore")
    except Exception as error:
        raise RuntimeError(
            f"MagnitudePruning: the slim export to {export_path!r} fails on example_input_array, so it would fail at "
            f"the end of fit. Checked at setup, before training: {type(error).__name__}: {error}"
        ) from error

"""Checking the slim export's path (writing it is :func:`~lightning_accel.pruning.slim.export_slim`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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

"""The half-precision state dict: the trained weights at half the size, loadable into the fp32 model."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from lightning_accel._core.files import atomic_target


def half_dtype(precision: str) -> torch.dtype:
    """The dtype a run trained in ``precision`` stores its half copy in: fp16 for ``16-mixed``, else bf16."""
    return torch.float16 if "16" in precision and "bf16" not in precision else torch.bfloat16


def state_dict_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> bytes:
    """The model's ``state_dict`` as ``torch.save`` writes it (floating tensors cast to ``dtype`` if given)."""
    buffer = io.BytesIO()
    torch.save(_state(model, dtype), buffer)
    return buffer.getvalue()


def _state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }


def save_half(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the floating tensors of ``model.state_dict()`` as ``dtype``, atomically (temporary name, rename).

    ``model.load_state_dict(torch.load(path))`` casts them back into an fp32 model.
    """
    target = Path(path)
    with atomic_target(target) as temporary:
        torch.save(_state(model, dtype), temporary)
    return target

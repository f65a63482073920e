"""Slicing a layer to the channels it keeps: one handler per layer type, in one table.

A new layer type that channel groups may touch is one handler (``matches``, ``size``, ``resize_``) added to
:data:`HANDLERS`. Per-output-channel state that instrumentation keeps in a layer's children (a QAT weight
quantizer's scales) follows the kept output channels, whatever the layer type.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_accel._core.modules import BATCH_NORMS, is_transposed_linear
from lightning_accel.pruning.groups import is_depthwise

Role = Literal["out", "in"]


def _take(tensor: Tensor, dim: int, kept: Tensor) -> Tensor:
    return tensor.index_select(dim, kept.to(tensor.device)).clone()


def _slice_parameter(module: nn.Module, name: str, dim: int, kept: Tensor) -> None:
    value = getattr(module, name, None)
    if value is not None:
        setattr(module, name, nn.Parameter(_take(value, dim, kept), requires_grad=value.requires_grad))


def _slice_child_state(module: nn.Module, old_count: int, kept: Tensor) -> None:
    """Buffers of the layer's children with one entry per output channel follow the kept channels."""
    for child in module.children():
        for name, buffer in list(child.named_buffers(recurse=False)):
            if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == old_count and buffer.numel() > 1:
                setattr(child, name, _take(buffer, 0, kept))


class _TransposedLinear:
    """GPT-2's ``Conv1D``: the weight is stored ``in x out``, and the width is read from ``nf``/``nx``."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return is_transposed_linear(module)

    @staticmethod
    def size(module: nn.Module, role: Role) -> int:
        return module.weight.shape[1] if role == "out" else module.weight.shape[0]

    @staticmethod
    def resize_(module: nn.Module, role: Role, kept: Tensor) -> None:
        if role == "out":
            _slice_parameter(module, "weight", 1, kept)
            _slice_parameter(module, "bias", 0, kept)
        else:
            _slice_parameter(module, "weight", 0, kept)
        for attribute, dim in (("nf", 1), ("nx", 0)):
            if isinstance(getattr(module, attribute, None), int):
                setattr(module, attribute, module.weight.shape[dim])


class _BatchNorm:
    """A BatchNorm: affine parameters and running statistics, one entry per feature."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, BATCH_NORMS)

    @staticmethod
    def size(module: nn.Module, role: Role) -> int:
        return module.num_features

    @staticmethod
    def resize_(module: nn.Module, role: Role, kept: Tensor) -> None:
        _slice_parameter(module, "weight", 0, kept)
        _slice_parameter(module, "bias", 0, kept)
        for buffer in ("running_mean", "running_var"):
            if getattr(module, buffer, None) is not None:
                setattr(module, buffer, _take(getattr(module, buffer), 0, kept))
        module.num_features = kept.numel()


class _Linear:
    """``nn.Linear``: rows are output channels, columns input channels."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def size(module: nn.Module, role: Role) -> int:
        return module.out_features if role == "out" else module.in_features

    @staticmethod
    def resize_(module: nn.Module, role: Role, kept: Tensor) -> None:
        if role == "out":
            old_count = module.weight.shape[0]
            _slice_parameter(module, "weight", 0, kept)
            _slice_parameter(module, "bias", 0, kept)
            _slice_child_state(module, old_count, kept)
            module.out_features = kept.numel()
        else:
            _slice_parameter(module, "weight", 1, kept)
            module.in_features = kept.numel()


class _Conv:
    """``nn.Conv1d/2d/3d``, plain or depthwise (a depthwise conv's input and output channels go together)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)

    @staticmethod
    def size(module: nn.Module, role: Role) -> int:
        return module.out_channels if role == "out" else module.in_channels

    @staticmethod
    def resize_(module: nn.Module, role: Role, kept: Tensor) -> None:
        depthwise = is_depthwise(module)  # before resizing: it compares the channel counts
        if role == "out" or depthwise:
            old_count = module.weight.shape[0]
            _slice_parameter(module, "weight", 0, kept)
            _slice_parameter(module, "bias", 0, kept)
            _slice_child_state(module, old_count, kept)
            module.out_channels = kept.numel()
            if depthwise:
                module.in_channels = module.groups = kept.numel()
        else:
            _slice_parameter(module, "weight", 1, kept)
            module.in_channels = kept.numel()


#: The layer types channel groups touch, most specific first (a transposed Linear is no nn.Linear).
HANDLERS = (_TransposedLinear, _BatchNorm, _Linear, _Conv)


def _handler(module: nn.Module) -> type:
    for handler in HANDLERS:
        if handler.matches(module):
            return handler
    raise TypeError(f"slim: no channel handler for {type(module).__name__} (known: Linear, Conv, BatchNorm, Conv1D)")


def dimension_size(module: nn.Module, role: Role) -> int:
    """How many output (``"out"``) or input (``"in"``) channels ``module`` has."""
    return _handler(module).size(module, role)


@torch.no_grad()
def resize_(module: nn.Module, role: Role, kept: Tensor) -> None:
    """Keep only positions ``kept`` of ``module``'s output (``"out"``) or input (``"in"``) channels, in place."""
    _handler(module).resize_(module, role, kept)

"""Quantization-aware training for group-wise weights (int4 W4A16 or 8da4w): train what the runtime will round.

:func:`prepare_group_qat_` makes every selected Linear and transposed Linear (GPT-2's ``Conv1D``) multiply with its
weight rounded group-wise to the integers of :mod:`groupwise`, recomputed from the current weights at every forward
(round to nearest, the scale from each group's extreme value), with the straight-through gradient; with
``activations="dynamic"`` its inputs are rounded to int8 per token and group too (:mod:`block_activations`).
Parameters keep their identity and names and no buffer is added, so optimizers, checkpoints and LoRA adapters that
wrap the layers keep working, and a weights-only checkpoint loads into the plain model.

:func:`group_qat_to_deployable` then makes the deployable copy: the same rounding of the trained weights, stored as
``MatMulNBits`` integers. It computes exactly what the prepared model computes in evaluation (contract 9/14).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel._core.modules import is_transposed_linear, module_copy
from lightning_accel._core.views import register_float_view
from lightning_accel.quantization.block_activations import fake_quantize_activation_blocks
from lightning_accel.quantization.groupwise import (
    dequantize_groups,
    group_qparams,
    padded_groups,
    quantize_to_levels,
)
from lightning_accel.quantization.weight_only import (
    WeightOnlySettings,
    quantize_weights,
    weight_only_targets,
)


class _GroupRound(torch.autograd.Function):
    """Group-wise round to nearest of a weight ``[N, K]``, with the straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, bits: int, group_size: int, symmetric: bool) -> Tensor:
        groups = padded_groups(weight.detach().float(), group_size)
        scales, zeros = group_qparams(groups, bits, symmetric)
        levels = quantize_to_levels(groups, scales, zeros, bits).reshape(weight.shape[0], -1)
        restored = dequantize_groups(levels, scales, None if symmetric else zeros, bits, group_size)
        return restored[:, : weight.shape[1]].to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def group_round(weight: Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True) -> Tensor:
    """``weight`` ``[N, K]`` as the runtime will multiply with it (see :func:`quantize_groups_rtn`)."""
    return _GroupRound.apply(weight, bits, group_size, symmetric)


class _GroupQAT:
    """Forward of a group-wise fake-quantized layer; mixed into a subclass of the layer's own class."""

    _group_settings: tuple[int, int, bool, str]  # bits, group size, symmetric, activations
    _transposed: bool

    #: Whether the rounding is on; the QAT callback keeps it off before ``start_step`` (the float phase).
    _group_active = True

    def forward(self, x: Tensor) -> Tensor:
        if not self._group_active:
            return super().forward(x)
        bits, size, symmetric, activations = self._group_settings
        if activations == "dynamic":  # 8da4w: the inputs rounded per token and group, as the kernel will
            x = fake_quantize_activation_blocks(x, size)
        if self._transposed:  # ``x @ W + b`` with ``W`` stored ``[in, out]``: round along the inputs
            weight = group_round(self.weight.T, bits, size, symmetric).T
            shape = (*x.shape[:-1], weight.shape[1])
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight).reshape(shape)
        return F.linear(x, group_round(self.weight, bits, size, symmetric), self.bias)


_CLASSES: dict[type, type] = {}
#: peft's LoRA adapter layers stay float (the QLoRA recipe: the frozen base is quantized, the adapters are not).
_ADAPTER_PREFIXES = ("lora_A", "lora_B", "lora_embedding")


def _group_qat_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"GroupQAT{cls.__name__}", (_GroupQAT, cls), {"_plain_class": cls})
    return _CLASSES[cls]


def prepare_group_qat_(model: nn.Module, settings: WeightOnlySettings | None = None) -> dict[str, nn.Module]:
    """Make the selected layers of ``model`` train with group-wise rounded weights, in place.

    Layers inside peft LoRA adapters (``lora_A``, ``lora_B``) are left float: prepare the base before or after
    ``get_peft_model``; after ``merge_and_unload()`` the merged weights are what is rounded and deployed.

    Args:
        model: The model (its parameters keep identity and names).
        settings: Bits, group size, symmetry and the ``include``/``exclude`` selection (default: int4, groups of 32).

    Returns:
        The prepared layers by name.
    """
    settings = settings or WeightOnlySettings()
    include = list(settings.include) if settings.include is not None else None
    exclude = list(settings.exclude) if settings.exclude is not None else None
    targets = {
        name: module
        for name, module in weight_only_targets(model, include, exclude, owner="prepare_group_qat_").items()
        if not any(part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))
    }
    for module in targets.values():
        transposed = is_transposed_linear(module)
        if not isinstance(module, _GroupQAT):
            module.__class__ = _group_qat_class(type(module))
        module._group_settings = (settings.bits, settings.group_size, settings.symmetric, settings.activations)
        module._transposed = transposed
    return targets


def set_group_qat_active(layers: Iterable[nn.Module], active: bool) -> None:
    """Switch the rounding of prepared ``layers`` on (fake-quantized) or off (plain float forward)."""
    for module in layers:
        module._group_active = active


def group_qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers :func:`prepare_group_qat_` prepared, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _GroupQAT)}


def strip_group_qat(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every prepared layer back to its plain class (same weights)."""
    copy = module_copy(model)
    for module in group_qat_layers(copy).values():
        module.__class__ = module._plain_class
    return copy


def _float_view(model: nn.Module) -> nn.Module | None:
    return strip_group_qat(model) if group_qat_layers(model) else None


register_float_view(_float_view)  # a distillation teacher, tracing and slimming see the float model


def group_qat_to_deployable(model: nn.Module) -> nn.Module:
    """The deployable copy of a prepared model: its rounded weights stored as ``MatMulNBits`` integers.

    Raises:
        ValueError: when ``model`` holds no prepared layer, or layers prepared with different settings.
    """
    layers = group_qat_layers(model)
    settings = {m._group_settings for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(
            f"group_qat_to_deployable: the model must hold layers prepared with one setting, found {sorted(settings)}"
        )
    bits, size, symmetric, activations = settings.pop()
    plain = strip_group_qat(model)
    return quantize_weights(
        plain, bits=bits, group_size=size, symmetric=symmetric, include=list(layers), activations=activations
    )

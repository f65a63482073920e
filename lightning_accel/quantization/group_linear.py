"""The group-quantized Linear: integers in ``MatMulNBits``' layout, computing exactly what the runtime computes.

With float activations (``W4A16``) the layer multiplies by the dequantized weight, as ``accuracy_level=1`` does;
with ``activations="dynamic"`` (``8da4w``) it first rounds its inputs to int8 per token and group, as
``accuracy_level=4`` does (:mod:`block_activations`). The export writes one ``com.microsoft::MatMulNBits`` node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel.quantization.block_activations import round_activation_blocks
from lightning_accel.quantization.groupwise import GroupQuantized, unpack_levels

#: Activations of weight-only layers: float (``W4A16``) or int8 per token and group inside the kernel (``8da4w``).
WEIGHT_ONLY_ACTIVATIONS = ("float", "dynamic")
#: ``MatMulNBits``' ``accuracy_level`` for each: 1 computes in fp32; 4 rounds the activations to int8 as modelled.
ACCURACY_LEVELS = {"float": 1, "dynamic": 4}


class _MatMulNBits(torch.autograd.Function):
    """``x @ W^T`` for group-wise integer weights; exported as one ``com.microsoft::MatMulNBits`` node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor | None, layer: Any) -> Tensor:
        if layer.activations == "dynamic":
            x = round_activation_blocks(x, layer.group_size)
        return F.linear(x, layer.dequantized_weight().to(x.dtype))

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scales: Any, zero_points: Any, layer: Any) -> Any:
        inputs = [x, packed, scales] + ([] if layer.zero_points is None else [zero_points])
        output = g.op(
            "com.microsoft::MatMulNBits",
            *inputs,
            K_i=layer.in_features,
            N_i=layer.out_features,
            bits_i=layer.bits,
            block_size_i=layer.group_size,
            accuracy_level_i=ACCURACY_LEVELS[layer.activations],
        )
        sizes = x.type().varyingSizes() if x.type().kind() == "TensorType" else None
        if sizes is not None:  # the exporter's shape inference does not know the contrib op: say its output shape
            output.setType(x.type().with_sizes([*sizes[:-1], layer.out_features]))
        return output


class GroupQuantizedLinear(nn.Module):
    """A Linear whose weight is stored as group-wise integers (``MatMulNBits`` layout).

    Buffers: ``packed`` ``[N, groups, group_size * bits / 8]`` uint8, ``scales`` ``[N, groups]``, ``zero_points``
    (asymmetric only) ``[N, ceil(groups * bits / 8)]`` uint8; ``bias`` a float parameter. The forward unpacks the
    integers, so the model computes what the file stores. ``activations``: ``"float"`` (``W4A16``) or ``"dynamic"``
    (int8 per token and group, as the runtime's ``accuracy_level=4`` kernel rounds them).
    """

    def __init__(self, quantized: GroupQuantized, bias: Tensor | None, activations: str = "float") -> None:
        super().__init__()
        self.activations = activations
        packed, scales, zero_points = quantized.packed()
        self.in_features, self.out_features = quantized.in_features, scales.shape[0]
        self.bits, self.group_size = quantized.bits, quantized.group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._dequantized: Tensor | None = None

    def dequantized_weight(self) -> Tensor:
        """The float weight ``[N, K]`` the stored integers mean (cached; the buffers are the truth)."""
        if self._dequantized is None or self._dequantized.device != self.packed.device:
            groups = self.scales.shape[1]
            levels = unpack_levels(self.packed, self.bits, self.group_size).reshape(self.out_features, -1)
            zeros = None
            if self.zero_points is not None:
                zeros = unpack_levels(self.zero_points, self.bits, groups)
            self._dequantized = GroupQuantized(
                levels, self.scales, zeros, self.bits, self.group_size, self.in_features
            ).dequantized()
        return self._dequantized

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T + b`` with ``W`` the stored integers' meaning (one ``MatMulNBits`` node in ONNX)."""
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.zero_points, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        """The shape and the format, for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.zero_points is None}, activations={self.activations}"
        )

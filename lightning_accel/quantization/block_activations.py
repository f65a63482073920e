"""Int8 activations per token and group: what ``MatMulNBits`` computes at ``accuracy_level=4`` (``8da4w``).

At ``accuracy_level=4`` ONNX Runtime's CPU kernel rounds the activations to int8 inside the kernel before the
integer dot products: each row of ``A`` (one token) is cut along ``K`` into blocks of the weight's group size, and
each block is scaled symmetrically by its own largest magnitude, ``scale = max|a| / 127``, ``q = round(a / scale)``
(round half to even), a zero block staying zero. The result is ``sum over blocks of scale_a * scale_w * (q_a .
(q_w - zero_point))``, which equals the float product of the rounded activations with the dequantized weight.

Measured against ONNX Runtime 1.32 on AMD EPYC (AVX-512 VNNI): groups of 32 and 128, 1 to 128 rows, the largest
difference was 3.3e-6 on outputs of magnitude 4-12 (float rounding of the sums), against 3-8e-2 for the product
with float activations; so this rounding, and not float activations, is what the file computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Largest int8 level of the symmetric activation blocks.
ACTIVATION_QMAX = 127


def round_activation_blocks(x: Tensor, block: int) -> Tensor:
    """``x`` with every ``block`` consecutive values of its last dimension rounded to int8 at their own scale."""
    features = x.shape[-1]
    padding = (-features) % block  # the kernel's last block is partial: zeros change no maximum
    blocks = F.pad(x.float(), (0, padding)).reshape(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / ACTIVATION_QMAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    rounded = torch.round(blocks / safe) * scale
    return rounded.reshape(*x.shape[:-1], -1)[..., :features].to(x.dtype)


class _RoundActivationBlocks(torch.autograd.Function):
    """:func:`round_activation_blocks` with the straight-through gradient (for QAT)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, block: int) -> Tensor:
        return round_activation_blocks(x, block)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fake_quantize_activation_blocks(x: Tensor, block: int) -> Tensor:
    """:func:`round_activation_blocks` in training: the forward rounds, the gradient passes straight through."""
    return _RoundActivationBlocks.apply(x, block)

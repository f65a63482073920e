"""Group-wise low-bit weights in the layout of ONNX Runtime's ``MatMulNBits``: the integers are the format.

A weight ``W`` of ``N`` outputs and ``K`` inputs is cut, along ``K``, into groups of ``group_size`` values (``K`` is
padded with zeros to a whole number of groups). Each group has one float scale and one unsigned zero point; a
value is stored as an unsigned level ``q`` in ``[0, 2**bits - 1]`` and means ``(q - zero_point) * scale``.

- Symmetric (the default): no zero point is stored and the runtime uses ``2**(bits - 1)`` (8 for 4 bits). The scale
  is the group's value of largest magnitude divided by ``-2**(bits - 1)``, sign included, so that extreme value is
  represented exactly by level 0 and the 16 levels are all used (the values at the other end round to 15).
- Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is spread over all levels with a stored zero point.

Levels are packed two per byte for 4 bits (the first in the low nibble), one per byte for 8 bits, as
``[N, groups, group_size * bits / 8]``; zero points likewise per output row, ``[N, ceil(groups * bits / 8)]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Widths ``MatMulNBits`` runs on CPU.
GROUP_BITS_CHOICES = (4, 8)
#: Group sizes along the input dimension (powers of two, at least 16, as ``MatMulNBits`` requires).
GROUP_SIZE_CHOICES = (16, 32, 64, 128, 256)
_EPS = torch.finfo(torch.float32).eps


@dataclass
class GroupQuantized:
    """A weight as group-wise integers: what is stored and what it means.

    Attributes:
        levels: Unsigned levels, ``[N, groups * group_size]`` (int16, unpacked; padding columns included).
        scales: ``[N, groups]`` float32.
        zero_points: ``[N, groups]`` levels, or ``None`` for symmetric (the runtime's default ``2**(bits-1)``).
        bits: 4 or 8.
        group_size: Values per group along ``K``.
        in_features: ``K`` before padding.
    """

    levels: Tensor
    scales: Tensor
    zero_points: Tensor | None
    bits: int
    group_size: int
    in_features: int

    @classmethod
    def from_levels(
        cls,
        levels: Tensor,
        scales: Tensor,
        zeros: Tensor,
        bits: int,
        group_size: int,
        in_features: int,
        symmetric: bool,
    ) -> GroupQuantized:
        """Integers computed in float (``[N, padded K]`` levels, per-group scales and zero points), stored."""
        return cls(
            levels=levels.to(torch.int16),
            scales=scales.float(),
            zero_points=None if symmetric else zeros.to(torch.int16),
            bits=bits,
            group_size=group_size,
            in_features=in_features,
        )

    def dequantized(self) -> Tensor:
        """The float weight ``[N, K]`` these integers mean: exactly what the runtime multiplies with."""
        return dequantize_groups(self.levels, self.scales, self.zero_points, self.bits, self.group_size)[
            :, : self.in_features
        ]

    def packed(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(B, scales, zero_points)`` as ``MatMulNBits`` takes them (uint8, float32, uint8 or ``None``)."""
        rows, groups = self.scales.shape
        blob = pack_levels(self.levels, self.bits).reshape(rows, groups, self.group_size * self.bits // 8)
        zeros = None if self.zero_points is None else pack_levels(self.zero_points, self.bits, pad_to_byte=True)
        return blob, self.scales.float().contiguous(), zeros


def default_zero_point(bits: int) -> int:
    """The zero point ``MatMulNBits`` uses when none is stored: the middle level."""
    return 2 ** (bits - 1)


def padded_groups(weight: Tensor, group_size: int) -> Tensor:
    """``weight`` ``[N, K]`` zero-padded along ``K`` and viewed as ``[N, groups, group_size]``."""
    rows, columns = weight.shape
    groups = math.ceil(columns / group_size)
    if groups * group_size != columns:
        weight = torch.nn.functional.pad(weight, (0, groups * group_size - columns))
    return weight.reshape(rows, groups, group_size)


def group_qparams(groups: Tensor, bits: int, symmetric: bool, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Scales and zero points (as float levels) for ``groups`` ``[..., group_size]``, one per group.

    Args:
        groups: Values, the last dimension one group.
        bits: 4 or 8.
        symmetric: Symmetric (zero point ``2**(bits-1)``) or asymmetric (min/max).
        clip: Shrinks the range (``< 1`` clips outliers); a tensor broadcasts per group.
    """
    top = 2**bits - 1
    if symmetric:
        low, high = groups.amin(-1), groups.amax(-1)
        # The extreme value keeps its sign: it lands exactly on level 0, using the level an absmax scale wastes.
        extreme = torch.where(-low >= high, low, high) * clip
        scales = extreme / -default_zero_point(bits)
        scales = torch.where(scales.abs() < _EPS, torch.full_like(scales, _EPS), scales)
        return scales, torch.full_like(scales, default_zero_point(bits))
    low = groups.amin(-1).clamp(max=0.0) * clip
    high = groups.amax(-1).clamp(min=0.0) * clip
    scales = ((high - low) / top).clamp(min=_EPS)
    zero_points = torch.round(-low / scales).clamp(0, top)
    return scales, zero_points


def quantize_to_levels(groups: Tensor, scales: Tensor, zero_points: Tensor, bits: int) -> Tensor:
    """Unsigned levels of ``groups`` at ``scales``/``zero_points`` (one per group), as float."""
    return torch.clamp(torch.round(groups / scales.unsqueeze(-1)) + zero_points.unsqueeze(-1), 0, 2**bits - 1)


def dequantize_groups(levels: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int, group_size: int) -> Tensor:
    """``(levels - zero_point) * scale`` per group: ``[N, groups * group_size]`` float32."""
    rows, groups = scales.shape
    zeros = torch.full_like(scales, default_zero_point(bits)) if zero_points is None else zero_points.to(torch.float32)
    grouped = levels.to(torch.float32).reshape(rows, groups, group_size)
    return ((grouped - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(rows, groups * group_size)


def search_clip(groups: Tensor, bits: int, symmetric: bool, ratios: tuple[float, ...]) -> Tensor:
    """Per group, the range shrink of ``ratios`` with the least squared rounding error (1.0 when none beats it)."""
    best_error = torch.full(groups.shape[:-1], float("inf"), dtype=groups.dtype, device=groups.device)
    best = torch.ones_like(best_error)
    for ratio in ratios:
        scales, zeros = group_qparams(groups, bits, symmetric, ratio)
        levels = quantize_to_levels(groups, scales, zeros, bits)
        error = ((levels - zeros.unsqueeze(-1)) * scales.unsqueeze(-1) - groups).square().sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def quantize_groups_rtn(
    weight: Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True, clip: Tensor | float = 1.0
) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of ``weight`` ``[N, K]`` (what ORT's ``RTN`` config does).

    Args:
        weight: Output rows first, inputs along dimension 1.
        bits: 4 or 8.
        group_size: Values per group along the inputs.
        symmetric: See the module docstring.
        clip: Range shrink per group (``[N, groups]``) or one for all.
    """
    groups = padded_groups(weight.detach().float(), group_size)
    scales, zeros = group_qparams(groups, bits, symmetric, clip)
    levels = quantize_to_levels(groups, scales, zeros, bits).reshape(weight.shape[0], -1)
    return GroupQuantized.from_levels(levels, scales, zeros, bits, group_size, weight.shape[1], symmetric)


def pack_levels(levels: Tensor, bits: int, pad_to_byte: bool = False) -> Tensor:
    """Pack unsigned levels (last dimension) into bytes: two 4-bit levels per byte, the first in the low nibble."""
    levels = levels.to(torch.uint8)
    if bits == 8:
        return levels.contiguous()
    if levels.shape[-1] % 2:
        if not pad_to_byte:
            raise ValueError(f"cannot pack an odd number ({levels.shape[-1]}) of 4-bit levels into whole bytes")
        levels = torch.nn.functional.pad(levels, (0, 1))
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).contiguous()


def unpack_levels(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_levels`: the first ``count`` levels along the last dimension."""
    if bits == 8:
        return packed[..., :count]
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :count]

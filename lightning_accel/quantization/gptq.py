"""GPTQ-style error compensation for group-wise weights, from calibration inputs.

A weight is quantized one input column at a time, each column's rounding error pushed onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs. The layer's output error on the calibration
inputs ``X`` is ``||(W - Q) X||``; its Hessian in ``W`` is
``H = 2 X X^T / n``. Quantizing column ``j`` to ``q_j`` and updating the remaining columns by
``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,(j+1):`` keeps that error minimal (Frantar et al., 2022, after Optimal Brain
Surgeon). Group scales are chosen when their group's first column is reached, from the already-updated weights.
Written here from the paper's algorithm; the layout and integers are those of :mod:`groupwise`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_accel.quantization.groupwise import (
    GroupQuantized,
    group_qparams,
    padded_groups,
    search_clip,
)

#: Diagonal damping, as a fraction of the Hessian's mean diagonal: keeps the inverse well conditioned.
DAMPING = 0.01
#: Range shrinks tried per group (by squared weight error) before its columns are quantized.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


class HessianAccumulator:
    """Accumulates ``2 X X^T / n`` over the inputs a layer receives (rows of ``X`` are tokens)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.samples = 0

    def add(self, inputs: Tensor) -> None:
        """Add a batch of inputs ``[..., in_features]``."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64).cpu()
        total = self.samples + rows.shape[0]
        self.hessian.mul_(self.samples / total).add_(rows.T @ rows, alpha=2.0 / total)
        self.samples = total


def _inverse_hessian_factor(hessian: Tensor, weight: Tensor) -> Tensor:
    """Upper Cholesky factor of ``(H + damping I)^-1``; inputs that never varied (zero diagonal) get weight 0."""
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damping = DAMPING * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(damping)
    for _ in range(5):  # a nearly singular Hessian: more damping until Cholesky succeeds
        factor, info = torch.linalg.cholesky_ex(hessian)
        if info == 0:
            break
        hessian.diagonal().add_(damping)
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def quantize_groups_gptq(
    weight: Tensor,
    hessian: Tensor,
    bits: int = 4,
    group_size: int = 32,
    symmetric: bool = True,
    block: int = 128,
) -> GroupQuantized:
    """Quantize ``weight`` ``[N, K]`` group-wise with GPTQ error compensation on ``hessian`` ``[K, K]``.

    Args:
        weight: Output rows first, inputs along dimension 1.
        hessian: ``2 X X^T / n`` of the layer's calibration inputs (:class:`HessianAccumulator`).
        bits: 4 or 8.
        group_size: Values per group along the inputs.
        symmetric: Symmetric groups (no stored zero point) or asymmetric.
        block: Columns updated together (lazy batch updates); rounded up to a multiple of ``group_size``.

    Returns:
        The integers, scales and zero points; ``dequantized()`` is the weight the runtime multiplies with.
    """
    rows, columns = weight.shape
    work = padded_groups(weight.detach().to(torch.float64), group_size).reshape(rows, -1).clone()
    padded = work.shape[1]
    full = torch.eye(padded, dtype=torch.float64)
    full[:columns, :columns] = hessian.to(torch.float64)
    factor = _inverse_hessian_factor(full, work)
    groups = padded // group_size
    scales = torch.zeros(rows, groups, dtype=torch.float64)
    zeros = torch.zeros(rows, groups, dtype=torch.float64)
    levels = torch.zeros(rows, padded, dtype=torch.float64)
    block = max(block // group_size, 1) * group_size
    top = 2**bits - 1
    for start in range(0, padded, block):
        end = min(start + block, padded)
        chunk, errors = work[:, start:end].clone(), torch.zeros(rows, end - start, dtype=torch.float64)
        inverse = factor[start:end, start:end]
        for offset in range(end - start):
            column = start + offset
            if column % group_size == 0:  # a new group: its scale from the weights as updated so far
                group = column // group_size
                values = chunk[:, offset : offset + group_size].unsqueeze(1)
                clip = search_clip(values, bits, symmetric, CLIP_RATIOS)
                scale, zero = group_qparams(values, bits, symmetric, clip)
                scales[:, group], zeros[:, group] = scale[:, 0], zero[:, 0]
            group = column // group_size
            scale, zero = scales[:, group], zeros[:, group]
            level = torch.clamp(torch.round(chunk[:, offset] / scale) + zero, 0, top)
            levels[:, column] = level
            quantized = (level - zero) * scale
            error = (chunk[:, offset] - quantized) / inverse[offset, offset]
            chunk[:, offset:] -= error.unsqueeze(1) * inverse[offset, offset:].unsqueeze(0)
            errors[:, offset] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    return GroupQuantized.from_levels(levels, scales, zeros, bits, group_size, columns, symmetric)

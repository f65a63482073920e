"""Magnitude masks for each pruning pattern, and applying them in place. Pure tensor code, no Lightning.

A mask is a bool tensor shaped like its weight: ``True`` keeps the element, ``False`` prunes it. Every
function accepts the previous masks, so that pruned weights stay pruned as the sparsity grows, and each keeps
exactly ``round(sparsity * n)`` zeros of the ``n`` elements it governs (ties broken by position, deterministically).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_accel._core.validation import validate_fraction

Scope = Literal["global", "layer", "lamp"]
SCOPES: tuple[str, ...] = ("global", "layer", "lamp")

# Score that ranks an already pruned element below every real magnitude (magnitudes are >= 0).
_PRUNED_SCORE = -1.0


class Pattern(NamedTuple):
    """A parsed pruning pattern: ``kind`` is "unstructured", "channels" or "N:M" (with ``n`` and ``m``)."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies, ``1 - N/M``; ``None`` for the other patterns."""
        return (self.m - self.n) / self.m if self.kind == "N:M" else None


def parse_pattern(pattern: str) -> Pattern:
    """Parse ``"unstructured"``, ``"channels"`` or ``"N:M"`` (e.g. ``"2:4"``, with 0 < N < M).

    Raises:
        ValueError: naming ``pattern``, the allowed forms and the given value.
    """
    if pattern in ("unstructured", "channels"):
        return Pattern(pattern)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"`pattern` must be 'unstructured', 'channels' or 'N:M' with integers 0 < N < M (e.g. '2:4'), "
            f"got {pattern!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"`pattern` must be 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return Pattern("N:M", n, m)


def _scores(weight: Tensor, previous: Tensor | None) -> Tensor:
    """Absolute magnitudes in float32, with previously pruned elements ranked lowest."""
    score = weight.detach().abs().float()
    if previous is not None:
        score = score.masked_fill(~previous, _PRUNED_SCORE)
    return score


def lamp_scores(weight: Tensor, previous: Tensor | None = None) -> Tensor:
    """Layer-adaptive magnitude scores (LAMP, Lee et al. 2021): ``w_i^2 / sum of w_j^2 over |w_j| >= |w_i|``.

    The score compares a weight with the weights of its own tensor that are at least as large, so it does not
    depend on the tensor's scale: a layer whose weights are all small by initialisation (large fan-in, T5's unscaled
    attention) is not emptied first by one global threshold, and each tensor's largest weight scores 1, the most any
    weight can, so no tensor is emptied before every other weight is gone.
    """
    squared = weight.detach().float().flatten().square()
    if previous is not None:
        squared = squared.masked_fill(~previous.flatten(), 0.0)
    order = torch.argsort(squared)
    ascending = squared[order]
    at_least = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])  # sum over this and all larger ones
    scores = torch.empty_like(squared)
    scores[order] = ascending / at_least.clamp_min(torch.finfo(torch.float32).tiny)
    if previous is not None:
        scores = scores.masked_fill(~previous.flatten(), _PRUNED_SCORE)
    return scores.view_as(weight)


def _keep_all_but_smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask over a 1-D ``scores`` that drops exactly the ``k`` smallest entries."""
    n = scores.numel()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # topk cost grows with k: select whichever side of the split is smaller.
    if k <= n // 2:
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    else:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, n - k, largest=True, sorted=False).indices] = True
    return keep


def unstructured_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: Scope = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Prune the smallest-magnitude elements: one threshold over all weights, or the same fraction in each.

    Args:
        weights: Tensors by name.
        sparsity: Fraction of zeros to reach, in [0, 1).
        scope: ``"global"`` ranks all elements together by magnitude; ``"layer"`` prunes ``sparsity`` of each
            tensor; ``"lamp"`` ranks all elements together by :func:`lamp_scores` (scale-aware).
        previous: Earlier masks by name; elements they pruned stay pruned.

    Returns:
        Bool keep-masks by name.
    """
    previous = previous or {}
    if scope == "lamp":
        scores = {name: lamp_scores(w, previous.get(name)).flatten() for name, w in weights.items()}
    else:
        scores = {name: _scores(w, previous.get(name)).flatten() for name, w in weights.items()}
    if scope == "layer":
        return {
            name: _keep_all_but_smallest(s, round(sparsity * s.numel())).view_as(weights[name])
            for name, s in scores.items()
        }
    if scope not in ("global", "lamp"):
        raise ValueError(f"`scope` must be one of {list(SCOPES)}, got {scope!r}")
    if not scores:
        return {}
    total = sum(s.numel() for s in scores.values())
    keep = _global_keep(scores, round(sparsity * total))
    return {name: part.view_as(weights[name]) for name, part in keep.items()}


#: Buckets of the histogram that narrows down the global threshold.
_HISTOGRAM_BINS = 4096
#: Up to this many scores (8 MB of float32), the threshold comes from one concatenation: faster, and small.
_SMALL_TOTAL = 2**21


def _global_keep(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Keep-masks that drop exactly the ``k`` smallest scores over all tensors, ties broken by position.

    Concatenating every score and sorting it costs several times the weights' own memory, which at a billion
    parameters is the difference between fitting and not. Instead a histogram narrows the k-th value down to one
    bucket, only that bucket's scores are gathered to find it exactly (a selection, not a sort), and each tensor is then
    masked on its own: extra memory stays near one tensor's size plus the masks.
    """
    if k <= 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    if total <= _SMALL_TOTAL:  # memory is no concern here: one concatenation and a selection are fastest
        flat = torch.cat([s.float().cpu() for s in scores.values()])
        threshold = _kth_smallest(flat, k)
        return _keep_below_threshold(scores, k, threshold)
    low = min(float(s.min()) for s in scores.values())
    high = max(float(s.max()) for s in scores.values())
    threshold = low
    if high > low:
        counts = sum(torch.histc(s.float().cpu(), _HISTOGRAM_BINS, low, high) for s in scores.values())
        cumulative = torch.cumsum(counts, 0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(float(k))))
        width = (high - low) / _HISTOGRAM_BINS
        # Widen by a bucket on each side: histc's edge rounding must not lose the k-th value.
        lower, upper = low + (bucket - 1) * width, low + (bucket + 2) * width
        below = sum(int((s < lower).sum()) for s in scores.values())
        inside = torch.cat([s[(s >= lower) & (s <= upper)].float().cpu() for s in scores.values()])
        if below < k <= below + inside.numel():
            threshold = _kth_smallest(inside, k - below)
        else:  # the histogram missed (pathological rounding): take the exact value the simple way
            threshold = _kth_smallest(torch.cat([s.float().cpu() for s in scores.values()]), k)
    return _keep_below_threshold(scores, k, threshold)


def _keep_below_threshold(scores: Mapping[str, Tensor], k: int, threshold: float) -> dict[str, Tensor]:
    """Drop every score below ``threshold`` and, of those equal to it, the first ones by position, ``k`` in all."""
    keep = {name: score >= threshold for name, score in scores.items()}
    remaining_ties = k - sum(int((~mask).sum()) for mask in keep.values())
    for name, score in scores.items():
        if remaining_ties <= 0:
            break
        tied = (score == threshold).nonzero().flatten()[:remaining_ties]
        keep[name][tied] = False
        remaining_ties -= tied.numel()
    return keep


def _kth_smallest(values: Tensor, k: int) -> float:
    """The ``k``-th smallest of a 1-D tensor (1-based). On CPU, numpy's introselect: ~6x faster than kthvalue."""
    if values.device.type == "cpu":
        array = values.numpy()
        return float(np.partition(array, k - 1)[k - 1])
    return float(torch.kthvalue(values, k).values)


def channel_mask(weight: Tensor, sparsity: float, previous: Tensor | None = None) -> Tensor:
    """Prune whole output channels (rows of a linear weight) with the smallest L2 norm.

    Exactly ``round(sparsity * out_channels)`` channels are zeroed.
    """
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    norms = rows.norm(dim=1)
    if previous is not None:
        norms = norms.masked_fill(~previous.reshape(weight.shape[0], -1).any(dim=1), _PRUNED_SCORE)
    keep_rows = _keep_all_but_smallest(norms, round(sparsity * weight.shape[0]))
    return keep_rows.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def n_m_mask(weight: Tensor, n: int, m: int, sparsity: float, previous: Tensor | None = None) -> Tensor:
    """Keep ``n`` of every ``m`` consecutive input channels (per output row and kernel position), reached gradually.

    A Linear weight ``(out, in)`` is grouped along ``in``. A conv weight ``(out, in, *kernel)`` is grouped along its
    input channels at each kernel position, the layout NVIDIA's sparse tensor cores (and ASP) use: the weight is
    viewed as ``(out, *kernel, in)``, which is how implicit-GEMM convolutions read it.

    The candidates are the ``m - n`` smallest magnitudes of each group. At ``sparsity == 1 - n/m`` all of them
    are pruned, which is the N:M layout sparse tensor cores run. Below it, only the ``round(sparsity * numel)``
    smallest candidates are pruned, so a schedule can approach the pattern gradually.

    Raises:
        ValueError: when the input dimension (``weight.shape[1]``) is not a multiple of ``m``.
    """
    if weight.dim() < 2 or weight.shape[1] % m:
        raise ValueError(
            f"pattern '{n}:{m}' needs weights whose input dimension (shape[1]) is a multiple of {m}, got shape "
            f"{tuple(weight.shape)}; exclude this parameter with `exclude`"
        )
    channels_last = (0, *range(2, weight.dim()), 1)  # (out, in, *kernel) -> (out, *kernel, in)
    scores = _scores(weight, previous).permute(channels_last).contiguous()
    groups = scores.reshape(-1, m)
    rank_in_group = groups.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    candidate = rank_in_group < (m - n)
    limit = min(round(sparsity * weight.numel()), int(candidate.sum()))
    candidate_scores = groups.masked_fill(~candidate, math.inf).flatten()
    keep = _keep_all_but_smallest(candidate_scores, limit).view(scores.shape)
    inverse = tuple(channels_last.index(d) for d in range(weight.dim()))
    return keep.permute(inverse).contiguous()


def compute_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    pattern: str = "unstructured",
    scope: Scope = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Compute magnitude keep-masks for ``weights`` at ``sparsity`` with the given pattern.

    Args:
        weights: Tensors by name.
        sparsity: Fraction of zeros to reach, in [0, 1). For ``"N:M"`` it is at most ``1 - N/M``.
        pattern: ``"unstructured"``, ``"channels"`` or ``"N:M"`` such as ``"2:4"``.
        scope: ``"global"`` or ``"layer"``; only unstructured pruning has a global threshold, the structured
            patterns always work per tensor.
        previous: Earlier masks by name; what they pruned stays pruned.

    Returns:
        Bool keep-masks by name, shaped like the weights.

    Example:
        >>> w = {"fc.weight": torch.tensor([[0.1, -2.0], [0.5, 0.0]])}
        >>> compute_masks(w, 0.5)["fc.weight"]
        tensor([[False,  True],
                [ True, False]])
    """
    parsed = parse_pattern(pattern)
    validate_fraction("sparsity", sparsity)
    if parsed.kind == "N:M" and sparsity > parsed.sparsity + 1e-9:
        raise ValueError(
            f"`sparsity` must be at most 1 - N/M = {parsed.sparsity} for pattern {pattern!r}, got {sparsity!r}"
        )
    previous = previous or {}
    if parsed.kind == "unstructured":
        return unstructured_masks(weights, sparsity, scope, previous)
    if parsed.kind == "channels":
        return {name: channel_mask(w, sparsity, previous.get(name)) for name, w in weights.items()}
    return {name: n_m_mask(w, parsed.n, parsed.m, sparsity, previous.get(name)) for name, w in weights.items()}


# --- sharded parameters (FSDP2 / DTensor) ---------------------------------------------------------------------
# Under FSDP each rank holds a shard of every parameter (a DTensor). Magnitudes must be ranked over the full
# tensors, or every rank would prune its own shard to the target and the global threshold would differ by rank;
# the zeroing then acts on each rank's local shard. Outside FSDP these helpers return their input.


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: call it on every rank)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (a tensor shaped like ``like``) that this rank holds, if ``like`` is sharded."""
    if not isinstance(like, DTensor):
        return full
    # src_data_rank=None: every rank holds the same ``full`` already, so each takes its part without communicating.
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def apply_masks_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, every element of ``params`` that its mask prunes. Parameters keep their identity.

    A sharded parameter (DTensor) takes a full-size mask; each rank zeroes its own shard.
    """
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"`masks` must name entries of `params` ({sorted(params)[:5]}...), got unknown {unknown[:5]}")
    for name, mask in masks.items():
        param = params[name]
        local_tensor(param).masked_fill_(~local_part(mask, param), 0)


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned elements over all masks together."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return pruned / total if total else 0.0


def _count_zeros(tensor: Tensor) -> int:
    zeros = (tensor == 0).sum()
    return int(zeros.full_tensor() if isinstance(zeros, DTensor) else zeros)  # sharded: summed over ranks


def tensor_sparsity(tensors: Mapping[str, Tensor]) -> float:
    """Fraction of exact zeros over all tensors together (what the weights really hold; over all shards)."""
    total = sum(t.numel() for t in tensors.values())
    zeros = sum(_count_zeros(t) for t in tensors.values())
    return zeros / total if total else 0.0

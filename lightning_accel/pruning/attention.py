"""Multi-head attention with fewer heads than its model width: what ``nn.MultiheadAttention`` becomes after slimming.

``nn.MultiheadAttention`` requires ``heads x head_dim == embed_dim`` (its kernel splits the model width into
heads), so a model with heads removed cannot keep it. :class:`HeadPrunedMultiheadAttention` computes the same
attention with explicit matrix products (ONNX exports them as plain ``MatMul``/``Softmax``, which ORT runs and our
int8 export quantizes like any Linear), for the calls torch's own transformer layers make.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class HeadPrunedMultiheadAttention(nn.Module):
    """Self- or cross-attention with ``num_heads`` heads of ``head_dim`` each, projecting back to ``embed_dim``.

    Takes the arguments ``nn.MultiheadAttention.forward`` takes and returns ``(output, None)`` or, with
    ``need_weights=True``, the head-averaged attention weights as the second item.

    Args:
        source: The attention it replaces (its dropout, ``batch_first`` and width).
        in_proj_weight: ``(3 * num_heads * head_dim, embed_dim)`` rows of the kept heads' Q, K and V.
        in_proj_bias: Their biases, or ``None``.
        out_proj: The output projection, ``num_heads * head_dim`` inputs.
        num_heads: The heads kept.
    """

    def __init__(
        self,
        source: nn.MultiheadAttention,
        in_proj_weight: Tensor,
        in_proj_bias: Tensor | None,
        out_proj: nn.Linear,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.embed_dim = source.embed_dim
        self.head_dim = source.head_dim
        self.num_heads = num_heads
        self.batch_first = source.batch_first
        self.dropout = source.dropout
        # torch's transformer layers take their fused fast path only with a packed, full-width attention.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = nn.Parameter(in_proj_weight)
        self.in_proj_bias = None if in_proj_bias is None else nn.Parameter(in_proj_bias)
        self.out_proj = out_proj

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; masks as ``nn.MultiheadAttention`` takes them."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        width = self.num_heads * self.head_dim
        weights = self.in_proj_weight.split(width)
        biases = self.in_proj_bias.split(width) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (self._heads(F.linear(x, w, b)) for x, w, b in zip((query, key, value), weights, biases, strict=True))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            scores = self._masked(scores, attn_mask if attn_mask.dim() == 2 else attn_mask.view(scores.shape))
        if key_padding_mask is not None:
            scores = self._masked(scores, key_padding_mask[:, None, None, :])
        probabilities = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        context = (probabilities @ v).transpose(1, 2).reshape(*query.shape[:-1], width)
        output = self.out_proj(context)
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, probabilities.mean(dim=1) if average_attn_weights else probabilities

    def _heads(self, projected: Tensor) -> Tensor:
        return projected.reshape(*projected.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _masked(scores: Tensor, mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:  # True: not allowed to attend
            return scores.masked_fill(mask, float("-inf"))
        return scores + mask


def prune_heads(attention: nn.MultiheadAttention, kept_heads: Tensor) -> HeadPrunedMultiheadAttention:
    """A :class:`HeadPrunedMultiheadAttention` with only the heads ``kept_heads`` of ``attention``."""
    width, embed = attention.head_dim, attention.embed_dim
    rows = (kept_heads[:, None] * width + torch.arange(width)).flatten()
    packed = torch.cat([rows + part * embed for part in range(3)]).to(attention.in_proj_weight.device)
    with torch.no_grad():
        weight = attention.in_proj_weight.index_select(0, packed).clone()
        bias = None if attention.in_proj_bias is None else attention.in_proj_bias.index_select(0, packed).clone()
        out_proj = nn.Linear(rows.numel(), embed, bias=attention.out_proj.bias is not None)
        out_proj = out_proj.to(device=weight.device, dtype=weight.dtype)
        out_proj.weight.copy_(attention.out_proj.weight.index_select(1, rows.to(weight.device)))
        if attention.out_proj.bias is not None:
            out_proj.bias.copy_(attention.out_proj.bias)
    return HeadPrunedMultiheadAttention(attention, weight, bias, out_proj, int(kept_heads.numel()))

"""Attention heads as channel groups: the head trace (``heads.py``) turned into groups that slim exactly.

One group is one head's query, key and value rows (and biases) and the output projection's matching columns, for
separate projections, a fused ``qkv``/``c_attn`` (one slice of each third per head) and ``nn.MultiheadAttention``'s
packed ``in_proj_weight``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_accel._core.graph import ATTENTION_CONSUMERS, run_example, trace_consumers
from lightning_accel.pruning.groups import ChannelGroup, GroupMember, Role, layer_slices
from lightning_accel.pruning.heads import multihead_attention_heads, trace_attention


def head_groups(
    model: nn.Module, example: Any, layers: dict[str, nn.Module], transposed: set[str], selected: Any
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """One group per attention whose heads can be removed; for the others, the reason by projection name."""
    attentions, reasons = trace_attention(model, example, layers, run_example)
    groups: list[ChannelGroup] = []
    for attention in attentions:
        modules = list(dict.fromkeys([attention.query, attention.key, attention.value, attention.output]))
        unselected = [name for name in modules if f"{name}.weight" not in selected]
        if unselected:
            for name in modules:
                reasons[name] = f"heads coupled with {', '.join(unselected)}, which include/exclude leave dense"
            continue
        members = [
            _head_member(name, layers[name], "out", rows, name in transposed)
            for name, rows in (
                (attention.query, attention.query_rows),
                (attention.key, attention.key_rows),
                (attention.value, attention.value_rows),
            )
        ]
        output = attention.output
        members.append(_head_member(output, layers[output], "in", attention.output_columns, output in transposed))
        owner = _common_parent(modules)
        groups.append(ChannelGroup(attention.query, attention.heads, tuple(members), kind="heads", owner=owner))
    for name, module in multihead_attention_heads(model):
        if f"{name}.in_proj_weight" not in selected:
            continue
        heads, width = module.num_heads, module.head_dim
        rows = torch.arange(heads * width).reshape(heads, width)
        bias = [(f"{name}.in_proj_bias", 0)] if module.in_proj_bias is not None else []
        members = [
            GroupMember(
                name,
                "out",
                (rows + offset * module.embed_dim).flatten(),
                torch.arange(heads).repeat_interleave(width),
                ((f"{name}.in_proj_weight", 0), *bias),
            )
            for offset in range(3)
        ]
        members.append(_head_member(f"{name}.out_proj", module.out_proj, "in", rows, False))
        groups.append(ChannelGroup(name, heads, tuple(members), kind="heads", owner=name))
    return groups, reasons


def _head_member(layer: str, module: nn.Module, role: Role, table: Tensor, transposed: bool) -> GroupMember:
    """A head group's member: ``table`` holds, per head, the rows (``"out"``) or columns (``"in"``) of ``layer``."""
    heads, width = table.shape
    slices = layer_slices(module, role, transposed)
    return GroupMember(
        layer,
        role,
        table.flatten(),
        torch.arange(heads).repeat_interleave(width),
        tuple((f"{layer}.{parameter}", dim) for parameter, dim in slices),
    )


def _common_parent(names: list[str]) -> str:
    """The innermost module that contains every module in ``names``."""
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def attention_projections(model: nn.Module, example: Any, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layers whose output an attention op consumes (Q/K/V of plain-tensor attention, as in Hugging Face models).

    torch-pruning sees a reshape into heads as ordinary channels, so a group of Q/K/V rows and the output
    projection's columns looked removable; slimming then left row counts that the model reshapes into other heads
    (measured on MiniLM: the slim model's cosine to the masked one 0.880). Decided from the traced consumers.
    """
    consumers = trace_consumers(model, example, layers) or {}
    return {
        name: ", ".join(sorted(used & ATTENTION_CONSUMERS))
        for name, used in consumers.items()
        if used & ATTENTION_CONSUMERS
    }

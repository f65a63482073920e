"""Coupled channel groups and group masks: the plan for removing pruned channels (``pruning.slim`` removes them).

A channel can only be removed when every tensor that shares it loses it too: the BatchNorm after a conv, the next
layer's input channels, every branch of a residual add or concat, a depthwise conv, the Linear after a flatten.
torch-pruning's ``DependencyGraph`` (DepGraph, Fang et al., CVPR 2023) traces the model once and answers "what else
must change if this channel goes"; this module uses that answer as a plan only. Training keeps every tensor at its
full size and zeroes whole groups with masks (contract 2: parameters keep their identity and names); :func:`slim`
then removes the zeroed channels from a copy, with our own slicing of the few layer types we accept.

A group is described with plain data (module names and index tensors), so it can be checked, logged and reused
on a deep copy of the model, whose modules have the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_accel._core.modules import BATCH_NORMS

Role = Literal["out", "in"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, *_CONVS)


@dataclass(frozen=True)
class GroupMember:
    """One tensor dimension that a channel group owns.

    Attributes:
        module: Name of the module (a Linear, Conv or BatchNorm).
        role: ``"out"`` for the module's output channels (rows; a BatchNorm's features), ``"in"`` for its input
            channels (columns).
        indices: Positions along that dimension, one per entry of ``root_indices``.
        root_indices: The group channel each position belongs to (a flatten maps one channel to many positions).
        slices: ``(parameter name, dimension)`` pairs that hold those positions: a layer's rows and bias for
            ``"out"``, its columns for ``"in"``, a BatchNorm's weight and bias.
    """

    module: str
    role: Role
    indices: Tensor
    root_indices: Tensor
    slices: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together; ``channels`` of them, named by the ``root`` module's output.

    ``kind`` is ``"channels"`` (a layer's output channels and everything coupled to them) or ``"heads"`` (one
    channel is a whole attention head: its query, key and value rows and the output projection's columns); for
    heads, ``owner`` names the attention module whose head-count attributes :func:`slim` updates.
    """

    root: str
    channels: int
    members: tuple[GroupMember, ...]
    kind: Literal["channels", "heads"] = "channels"
    owner: str = ""

    def modules(self) -> list[str]:
        """The names of the modules this group touches, in order."""
        return list(dict.fromkeys(member.module for member in self.members))


@dataclass
class ChannelGroups:
    """The result of tracing: the prunable groups, and the layers left dense with the reason for each."""

    groups: list[ChannelGroup] = field(default_factory=list)
    left_dense: dict[str, str] = field(default_factory=dict)
    #: Each group's multiplier of the sparsity (non-uniform pruning), in the order of ``groups``; ``None``: 1.
    fractions: list[float] | None = None

    def parameter_names(self) -> list[str]:
        """Names of every parameter the groups zero (weights, biases, BatchNorm affine), each once."""
        return list(dict.fromkeys(name for group in self.groups for name, _, _ in _member_slices(group)))

    def summary(self) -> str:
        """One line: how many groups and channels are pruned, and what is left dense and why."""
        channel_groups = [group for group in self.groups if group.kind == "channels"]
        head_groups = [group for group in self.groups if group.kind == "heads"]
        channels = sum(group.channels for group in channel_groups)
        text = f"{len(channel_groups)} channel groups ({channels} channels)"
        if head_groups:
            heads = sum(group.channels for group in head_groups)
            text += f", {len(head_groups)} attention head groups ({heads} heads: {', '.join(head_groups[0].modules())}"
            text += ", ...)" if len(head_groups) > 1 else ")"
        if self.left_dense:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in list(self.left_dense.items())[:8])
            more = f"; and {len(self.left_dense) - 8} more" if len(self.left_dense) > 8 else ""
            text += f"; left dense: {reasons}{more}"
        return text


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise conv (one filter per input channel): its channels follow its input's."""
    return (
        isinstance(module, _CONVS) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
    )


def layer_slices(module: nn.Module, role: Role, transposed: bool = False) -> list[tuple[str, int]]:
    """(parameter name, dimension) pairs that one channel of ``role`` occupies in ``module``.

    A transposed Linear (GPT-2's ``Conv1D``) stores its weight ``in x out``: its rows are input channels.
    """
    if transposed:
        return [("weight", 1), ("bias", 0)] if role == "out" else [("weight", 0)]
    if isinstance(module, BATCH_NORMS) or is_depthwise(module) or role == "out":
        return [(name, 0) for name in ("weight", "bias") if getattr(module, name, None) is not None]
    return [("weight", 1)]


def _member_slices(group: ChannelGroup) -> list[tuple[str, GroupMember, int]]:
    """Every (parameter name, member, dimension) of a group."""
    return [(name, member, dim) for member in group.members for name, dim in member.slices]


def channel_sums(group: ChannelGroup, tensors: Mapping[str, Tensor]) -> Tensor:
    """Per group channel, the sum of ``tensors`` over every slice of it (tensors shaped like the parameters).

    Names missing from ``tensors`` contribute nothing. The per-position sums are reduced where the tensors live and
    reach the host in one transfer: Taylor importance calls this after every optimizer step, and a transfer per
    slice was a device sync per slice.
    """
    sums = torch.zeros(group.channels, dtype=torch.float64)
    slices = [(name, member, dim) for name, member, dim in _member_slices(group) if name in tensors]
    if not slices:
        return sums
    reduced = []
    for name, _, dim in slices:
        values = tensors[name].detach().float()
        reduced.append(values.transpose(0, dim).reshape(values.shape[dim], -1).sum(dim=1))
    on_host = torch.cat(reduced).cpu().split([part.numel() for part in reduced])
    for (_, member, _), per_position in zip(slices, on_host, strict=True):
        sums.index_add_(0, member.root_indices, per_position[member.indices].double())
    return sums


def _channel_scores(group: ChannelGroup, parameters: Mapping[str, Tensor]) -> Tensor:
    """The group's magnitude importance per channel: squared L2 norm summed over every tensor slice in the group."""
    return channel_sums(group, {name: parameters[name].detach().float().pow(2) for name, _, _ in _member_slices(group)})


def group_masks(
    parameters: Mapping[str, Tensor],
    groups: ChannelGroups,
    sparsity: float,
    previous: Mapping[str, Tensor] | None = None,
    scores: Sequence[Tensor] | None = None,
    fractions: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks that remove ``round(sparsity * channels)`` channels of every group, the least important first.

    At most all but one channel of a group goes: an emptied layer, or an attention without heads, cuts the model.

    Importance is the group's summed squared L2 norm per channel (magnitude), or ``scores`` when given (Taylor
    importance, :class:`~lightning_accel.pruning.importance.TaylorImportance`); channels that ``previous`` pruned
    stay pruned (they rank lowest). Every tensor slice of a pruned channel is masked: the producing layer's rows and
    bias, the BatchNorm's weight and bias, the consuming layers' input columns. So the masked model computes exactly
    what the slimmed model computes, whatever the activation between the layers.

    Args:
        parameters: The model's parameters by name (``dict(model.named_parameters())``).
        groups: The groups from :func:`find_channel_groups`.
        sparsity: Fraction of each group's channels to remove, in [0, 1).
        previous: Earlier masks by name; channels they removed stay removed.
        scores: One importance tensor per group (``channels`` values each), in the order of ``groups.groups``;
            ``None``: magnitude.
        fractions: One multiplier of ``sparsity`` per group (non-uniform pruning: a group removes
            ``round(sparsity * fraction * channels)``), in the order of ``groups.groups``; ``None``: 1 for every group.

    Returns:
        Bool keep-masks by parameter name, shaped like the parameters.
    """
    masks = {name: torch.ones_like(parameters[name], dtype=torch.bool) for name in groups.parameter_names()}
    fractions = fractions if fractions is not None else groups.fractions
    for index, group in enumerate(groups.groups):
        importance = _channel_scores(group, parameters) if scores is None else scores[index].double().clone()
        if previous:
            importance[~kept_channels(group, previous)] = -1.0
        # One channel always stays: an emptied layer (or attention without heads) would silently cut the model.
        share = sparsity * (fractions[index] if fractions is not None else 1.0)
        count = min(round(share * group.channels), group.channels - 1)
        if count <= 0:
            continue
        pruned = torch.zeros(group.channels, dtype=torch.bool)
        pruned[torch.sort(importance, stable=True).indices[:count]] = True
        for name, member, dim in _member_slices(group):
            positions = member.indices[pruned[member.root_indices]]
            masks[name].index_fill_(dim, positions.to(masks[name].device), False)
    return masks


def kept_channels(group: ChannelGroup, tensors: Mapping[str, Tensor]) -> Tensor:
    """Bool per group channel: ``True`` unless every slice of it in ``tensors`` is zero (``False`` in a mask)."""
    alive = torch.zeros(group.channels, dtype=torch.bool)
    for name, member, dim in _member_slices(group):
        if name not in tensors:
            continue
        values = tensors[name].detach()
        nonzero = values.transpose(0, dim).reshape(values.shape[dim], -1).ne(0).any(dim=1).cpu()
        alive.index_fill_(0, member.root_indices[nonzero[member.indices]], True)
    return alive


def channel_sparsity(parameters: Mapping[str, Tensor], groups: ChannelGroups) -> float:
    """Fraction of the groups' channels whose every tensor slice is zero: what :func:`slim` would remove."""
    total = sum(group.channels for group in groups.groups)
    removed = sum(int((~kept_channels(group, parameters)).sum()) for group in groups.groups)
    return removed / total if total else 0.0


def trainer_channel_groups(callbacks: Sequence[Any]) -> ChannelGroups | None:
    """The channel groups that ``MagnitudePruning(pattern="channels")`` callbacks in ``callbacks`` prune, if any."""
    groups = [
        group
        for callback in callbacks
        if isinstance(getattr(callback, "channel_groups", None), ChannelGroups)
        for group in callback.channel_groups.groups
    ]
    return ChannelGroups(groups) if groups else None

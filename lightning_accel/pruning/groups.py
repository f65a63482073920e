"""Coupled channel groups and group masks: the plan for removing pruned channels (``deploy.slim`` removes them).

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

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_accel._core.graph import ATTENTION_CONSUMERS, eager_only, run_example, trace_consumers
from lightning_accel._core.modules import is_transposed_linear, module_copy, select_weights
from lightning_accel.pruning.heads import multihead_attention_heads, trace_attention

Role = Literal["out", "in"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = (nn.Linear, *_CONVS)
_INSTALL_HINT = "pip install 'lightning-accel[slim]' (torch-pruning)"


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


def _require_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as error:  # pragma: no cover - the extra is part of `make install`
        raise ImportError(f"pattern='channels' traces coupled channels with torch-pruning: {_INSTALL_HINT}") from error
    return torch_pruning


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise conv (one filter per input channel): its channels follow its input's."""
    return (
        isinstance(module, _CONVS) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
    )


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with parameters cannot take part in a removable group, or ``None`` when it can."""
    if isinstance(module, (nn.Linear, *_BATCH_NORMS)):
        return None
    if isinstance(module, _CONVS):
        if module.groups == 1 or is_depthwise(module):
            return None
        return f"grouped convolution (groups={module.groups})"
    return f"couples with {type(module).__name__}, which slimming does not resize"


def _slices(module: nn.Module, role: Role, transposed: bool = False) -> list[tuple[str, int]]:
    """(parameter name, dimension) pairs that one channel of ``role`` occupies in ``module``.

    A transposed Linear (GPT-2's ``Conv1D``) stores its weight ``in x out``: its rows are input channels.
    """
    if transposed:
        return [("weight", 1), ("bias", 0)] if role == "out" else [("weight", 0)]
    if isinstance(module, _BATCH_NORMS) or is_depthwise(module) or role == "out":
        return [(name, 0) for name in ("weight", "bias") if getattr(module, name, None) is not None]
    return [("weight", 1)]


def _member_slices(group: ChannelGroup) -> list[tuple[str, GroupMember, int]]:
    """Every (parameter name, member, dimension) of a group."""
    return [(name, member, dim) for member in group.members for name, dim in member.slices]


def _reaches_output(node: Any, layer_modules: set[nn.Module]) -> bool:
    """Whether channels leaving ``node`` reach the model's output without a Linear/Conv consuming them."""
    if not node.outputs:
        return True
    stack, seen = list(node.outputs), set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in layer_modules and not is_depthwise(current.module):
            continue  # a layer consumes the channels (its input dimension)
        if not current.outputs:
            return True
        stack.extend(current.outputs)
    return False


def find_channel_groups(
    model: nn.Module,
    example_input: Any,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> ChannelGroups:
    """Trace ``model`` once on ``example_input`` and return the channel groups that can be removed.

    A group is kept when every Linear/Conv whose output channels it holds is selected by ``include``/``exclude``
    (the same module patterns as the callbacks), and it only touches Linear, Conv (plain or depthwise) and
    BatchNorm layers. Left dense, with the reason: layers whose output channels reach the model's output (the
    classifier's rows), groups that touch other layers with parameters (LayerNorm, attention, embeddings), grouped
    convolutions, tied parameters, and layers the tracer did not see in the forward pass.

    Args:
        model: The model (plain, or prepared for QAT: tracing runs its float path). It runs one forward pass in
            eval mode with gradients on; its training mode is restored after.
        example_input: An input for ``model``: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        include: Module patterns to prune (``None``: every Linear/Conv).
        exclude: Module patterns to leave dense.

    Returns:
        The groups, and the layers left dense by name with the reason.
    """
    tp = _require_torch_pruning()
    selected = select_weights(model, include, exclude)
    transposed = {name for name, m in model.named_modules() if is_transposed_linear(m)}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS) or name in transposed}
    tied = _tied_parameter_ids(model)
    example = tuple(example_input) if isinstance(example_input, list) else example_input
    if not layers:
        weight_holders = sorted({type(m).__name__ for m in model.modules() if getattr(m, "weight", None) is not None})
        raise ValueError(
            f"pattern='channels' removes channels of Linear/Conv layers, and {type(model).__name__} has none "
            f"(its weight-holding layers are {weight_holders[:6]}). Use pattern='unstructured' or 'N:M', which take "
            "such weights when a pattern names them."
        )
    found = ChannelGroups()
    head_groups, head_reasons = _head_groups(model, example, layers, transposed, selected)
    found.groups.extend(head_groups)
    in_heads = {module for group in head_groups for module in group.modules()}
    # torch-pruning knows Linear and Conv: a transposed Linear is traced as the Linear it is (same names).
    traced_model = _linear_view(model, transposed) if transposed else model
    names = {module: name for name, module in traced_model.named_modules()}
    traced_layers = {name: m for name, m in traced_model.named_modules() if isinstance(m, _LAYERS)}
    modes = {module: module.training for module in traced_model.modules()}
    try:
        with torch.enable_grad(), eager_only():
            graph = tp.DependencyGraph().build_dependency(
                traced_model,
                example_inputs=_without_cache(model, example),
                output_transform=_output_tensors,
                verbose=False,
            )
    except Exception as error:
        raise ValueError(
            f"pattern='channels' traces {type(model).__name__} with torch-pruning's DependencyGraph to find the "
            f"channels that go together, and the trace failed ({type(error).__name__}: {error}). Use "
            "pattern='unstructured' or 'N:M', or exclude the part of the model the tracer cannot follow."
        ) from error
    finally:
        for module, mode in modes.items():
            module.training = mode
    seen_roots: set[str] = set(in_heads)
    attention = _attention_projections(model, example, layers)
    layer_modules = set(traced_layers.values())
    for tp_group in graph.get_all_groups(root_module_types=(nn.Linear, *_CONVS)):
        members, reason, out_layers = [], None, []
        for item in tp_group:
            module, handler = item.dep.target.module, item.dep.handler
            name = names.get(module)
            if name is None or not any(True for _ in module.parameters(recurse=False)):
                continue  # a functional op (add, cat, flatten, pooling...): nothing to resize
            role: Role = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
            reason = reason or _unsupported_reason(module)
            if any(id(p) in tied for p in module.parameters(recurse=False)):
                reason = reason or f"shares a parameter with another layer ({name})"
            if role == "out" and isinstance(module, _LAYERS):
                out_layers.append(name)
                if name in attention:
                    reason = (
                        reason
                        or head_reasons.get(name)
                        or (
                            f"{name}'s channels are reshaped into attention heads ({attention[name]}); removing "
                            "channels would not follow head boundaries, so the group stays dense"
                        )
                    )
                if _reaches_output(graph.module2node[module], layer_modules):
                    reason = reason or "its output channels are the model's output"
            prefix = f"{name}." if name else ""
            members.append(
                GroupMember(
                    name,
                    role,
                    torch.as_tensor(list(item.idxs), dtype=torch.long),
                    torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                    tuple((prefix + parameter, dim) for parameter, dim in _slices(module, role, name in transposed)),
                )
            )
        if not out_layers:
            continue
        root = out_layers[0]
        seen_roots.update(out_layers)
        if all(name in in_heads for name in out_layers):
            continue  # attention projections: their channels go as whole heads (the head groups above)
        unselected = [name for name in out_layers if f"{name}.weight" not in selected]
        if reason is None and unselected:
            reason = f"coupled with {', '.join(unselected)}, which include/exclude leave dense"
        if reason is not None:
            found.left_dense[", ".join(out_layers)] = reason
            continue
        channels = int(max(int(m.root_indices.max()) for m in members) + 1)
        found.groups.append(ChannelGroup(root, channels, tuple(members)))
    traced = {names[m]: m for m in graph.module2node if m in names}
    for name, module in traced_layers.items():
        if name in seen_roots or module in graph.module2node:
            continue
        owner = next((prefix for prefix in _parents(name) if prefix in traced), None)
        found.left_dense[name] = (
            f"inside {type(traced[owner]).__name__} {owner!r}, which is left dense"
            if owner is not None
            else "not seen by the tracer in the example forward pass"
        )
    return found


def _without_cache(model: nn.Module, example: Any) -> Any:
    """``example`` with ``use_cache=False`` when the forward takes that keyword and the example does not set it.

    A key/value cache is state for generation, not channels; torch-pruning cannot follow the concatenation that
    fills it (GPT-2: ``TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'``).
    """
    if not isinstance(example, Mapping) or "use_cache" in example:
        return example
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return example
    return {**example, "use_cache": False} if accepts else example


def _linear_view(model: nn.Module, transposed: set[str]) -> nn.Module:
    """A copy of ``model`` whose transposed Linears are plain ``nn.Linear`` layers (same names, same results)."""
    view = module_copy(model)
    for name in transposed:
        parent_name, _, child = name.rpartition(".")
        parent = view.get_submodule(parent_name)
        original = getattr(parent, child)
        weight = original.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            linear.bias.copy_(original.bias.detach())
        setattr(parent, child, linear)
    return view


def _head_groups(
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
    slices = _slices(module, role, transposed)
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


def _attention_projections(model: nn.Module, example: Any, layers: dict[str, nn.Module]) -> dict[str, str]:
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


def _output_tensors(output: Any) -> list[Tensor]:
    """The floating tensors of a model output, which the tracer follows.

    Hugging Face ``ModelOutput``s and tuples hold several (GPT-2's holds the cache too).
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [t for item in output for t in _output_tensors(item) if t.is_floating_point()]
    return []


def _parents(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b", "a"]``: the modules that contain a module, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    owners: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), set()).add(name.rsplit(".", 1)[0] if "." in name else "")
    return {key for key, modules in owners.items() if len(modules) > 1}


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

    Returns:
        Bool keep-masks by parameter name, shaped like the parameters.
    """
    masks = {name: torch.ones_like(parameters[name], dtype=torch.bool) for name in groups.parameter_names()}
    for index, group in enumerate(groups.groups):
        importance = _channel_scores(group, parameters) if scores is None else scores[index].double().clone()
        if previous:
            importance[~kept_channels(group, previous)] = -1.0
        # One channel always stays: an emptied layer (or attention without heads) would silently cut the model.
        count = min(round(sparsity * group.channels), group.channels - 1)
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

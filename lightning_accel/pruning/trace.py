"""Finding the channel groups: one trace of the model with torch-pruning's DependencyGraph, and the heads.

The plan's data (``ChannelGroup``, ``ChannelGroups``) lives in ``groups.py``; this module traces a model and
decides, group by group, whether it can be removed or stays dense (with the reason). torch-pruning's
``DependencyGraph`` (DepGraph, Fang et al., CVPR 2023) answers "what else must change if this channel goes";
attention heads come from our own trace (``heads.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_accel._core.graph import eager_only
from lightning_accel._core.inputs import as_model_input
from lightning_accel._core.modules import BATCH_NORMS, is_transposed_linear, module_copy, select_weights
from lightning_accel.pruning.groups import (
    _CONVS,
    _LAYERS,
    ChannelGroup,
    ChannelGroups,
    GroupMember,
    Role,
    is_depthwise,
    layer_slices,
)
from lightning_accel.pruning.head_groups import attention_projections, head_groups

_INSTALL_HINT = "pip install 'lightning-accel[slim]' (torch-pruning)"


def _require_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as error:  # pragma: no cover - the extra is part of `make install`
        raise ImportError(f"pattern='channels' traces coupled channels with torch-pruning: {_INSTALL_HINT}") from error
    return torch_pruning


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with parameters cannot take part in a removable group, or ``None`` when it can."""
    if isinstance(module, (nn.Linear, *BATCH_NORMS)):
        return None
    if isinstance(module, _CONVS):
        if module.groups == 1 or is_depthwise(module):
            return None
        return f"grouped convolution (groups={module.groups})"
    return f"couples with {type(module).__name__}, which slimming does not resize"


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
    selected = select_weights(model, include, exclude)
    transposed = {name for name, m in model.named_modules() if is_transposed_linear(m)}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS) or name in transposed}
    example = as_model_input(example_input)
    if not layers:
        weight_holders = sorted({type(m).__name__ for m in model.modules() if getattr(m, "weight", None) is not None})
        raise ValueError(
            f"pattern='channels' removes channels of Linear/Conv layers, and {type(model).__name__} has none "
            f"(its weight-holding layers are {weight_holders[:6]}). Use pattern='unstructured' or 'N:M', which take "
            "such weights when a pattern names them."
        )
    _refuse_rotary_decoders(model)
    found = ChannelGroups()
    heads, head_reasons = head_groups(model, example, layers, transposed, selected)
    found.groups.extend(heads)
    trace = _trace_dependencies(model, example, transposed)
    context = _GroupContext(
        trace=trace,
        transposed=transposed,
        selected=selected,
        tied=_tied_parameter_ids(model),
        attention=attention_projections(model, example, layers),
        head_reasons=head_reasons,
        in_heads={module for group in heads for module in group.modules()},
    )
    seen_roots: set[str] = set(context.in_heads)
    for tp_group in trace.graph.get_all_groups(root_module_types=(nn.Linear, *_CONVS)):
        decided = _group_or_reason(tp_group, context)
        if decided is None:
            continue
        out_layers, group, reason = decided
        seen_roots.update(out_layers)
        if group is not None:
            found.groups.append(group)
        elif reason is not None:
            found.left_dense[", ".join(out_layers)] = reason
    found.left_dense.update(_untraced_layers(trace, seen_roots))
    return found


def _refuse_rotary_decoders(model: nn.Module) -> None:
    """Refuse, before any trace, the decoders whose channel planning does not finish (Llama, Qwen, Mistral, Gemma).

    Measured on a 2-layer Llama with 64 hidden units: torch-pruning's ``get_all_groups`` ran over 60 s without
    finishing (its dependency fixing walks the rotary slices and the residual stream), and our head trace does not
    recognise grouped-query attention. A refusal at setup beats a fit that hangs before its first step.
    """
    for name, module in model.named_modules():
        rotary = type(module).__name__.endswith("RotaryEmbedding")
        if rotary or hasattr(module, "num_key_value_groups"):
            raise ValueError(
                f"pattern='channels' does not remove heads or FFN units of rotary decoders (Llama, Qwen, Mistral, "
                f"Gemma style; found {type(module).__name__} at {name or 'the model'!r}): their grouped-query heads "
                "are not planned yet and torch-pruning's trace of them does not finish in minutes. Use "
                "pattern='unstructured' or 'N:M' (importance='wanda' ranks by activations), or int4 weights "
                "(PostTrainingQuantization or QuantizationAwareTraining with weight_bits=4)."
            )


@dataclass
class _Trace:
    """torch-pruning's dependency graph of the model (a transposed Linear traced as the Linear it is)."""

    graph: Any
    names: dict[nn.Module, str]
    layers: dict[str, nn.Module]


@dataclass
class _GroupContext:
    """What deciding a traced group needs: the trace, the selection, and what the head trace found."""

    trace: _Trace
    transposed: set[str]
    selected: Mapping[str, Any]
    tied: set[int]
    attention: dict[str, str]
    head_reasons: dict[str, str]
    in_heads: set[str]
    layer_modules: set[nn.Module] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.layer_modules = set(self.trace.layers.values())


def _trace_dependencies(model: nn.Module, example: Any, transposed: set[str]) -> _Trace:
    """Build torch-pruning's dependency graph once (gradients on, training modes restored afterwards)."""
    tp = _require_torch_pruning()
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
    return _Trace(graph, names, traced_layers)


def _layer_reason(name: str, module: nn.Module, role: Role, context: _GroupContext) -> str | None:
    """Why this member keeps its group dense, or ``None``."""
    reason = _unsupported_reason(module)
    if any(id(p) in context.tied for p in module.parameters(recurse=False)):
        reason = reason or f"shares a parameter with another layer ({name})"
    if role != "out" or not isinstance(module, _LAYERS):
        return reason
    if name in context.attention:
        reason = (
            reason
            or context.head_reasons.get(name)
            or (
                f"{name}'s channels are reshaped into attention heads ({context.attention[name]}); removing "
                "channels would not follow head boundaries, so the group stays dense"
            )
        )
    if _reaches_output(context.trace.graph.module2node[module], context.layer_modules):
        reason = reason or "its output channels are the model's output"
    return reason


def _group_or_reason(tp_group: Any, context: _GroupContext) -> tuple[list[str], ChannelGroup | None, str | None] | None:
    """One traced group: its output layers, and the removable group or the reason it stays dense.

    ``None`` when the group has no output layer; ``(layers, None, None)`` for attention projections, whose channels
    go as whole heads (the head groups).
    """
    graph, names = context.trace.graph, context.trace.names
    members, reason, out_layers = [], None, []
    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        name = names.get(module)
        if name is None or not any(True for _ in module.parameters(recurse=False)):
            continue  # a functional op (add, cat, flatten, pooling...): nothing to resize
        role: Role = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
        reason = reason or _layer_reason(name, module, role, context)
        if role == "out" and isinstance(module, _LAYERS):
            out_layers.append(name)
        prefix = f"{name}." if name else ""
        slices = layer_slices(module, role, name in context.transposed)
        members.append(
            GroupMember(
                name,
                role,
                torch.as_tensor(list(item.idxs), dtype=torch.long),
                torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                tuple((prefix + parameter, dim) for parameter, dim in slices),
            )
        )
    if not out_layers:
        return None
    if all(name in context.in_heads for name in out_layers):
        return out_layers, None, None
    unselected = [name for name in out_layers if f"{name}.weight" not in context.selected]
    if reason is None and unselected:
        reason = f"coupled with {', '.join(unselected)}, which include/exclude leave dense"
    if reason is not None:
        return out_layers, None, reason
    channels = int(max(int(m.root_indices.max()) for m in members) + 1)
    return out_layers, ChannelGroup(out_layers[0], channels, tuple(members)), None


def _untraced_layers(trace: _Trace, seen_roots: set[str]) -> dict[str, str]:
    """Layers the groups did not cover, with the reason: inside a layer left dense, or never run by the example."""
    traced = {trace.names[m]: m for m in trace.graph.module2node if m in trace.names}
    left = {}
    for name, module in trace.layers.items():
        if name in seen_roots or module in trace.graph.module2node:
            continue
        owner = next((prefix for prefix in _parents(name) if prefix in traced), None)
        left[name] = (
            f"inside {type(traced[owner]).__name__} {owner!r}, which is left dense"
            if owner is not None
            else "not seen by the tracer in the example forward pass"
        )
    return left


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

"""Attention heads as removable groups, found from the traced forward pass (contract 12: from the graph, not types).

A head is ``head_dim`` rows of the query, key and value projections and the matching columns of the output
projection. Which rows those are depends on how the model reshapes a projection into heads (BERT views
``query(x)`` as ``(batch, tokens, -1, head_dim)``; GPT-2 splits one fused ``c_attn`` output in three first; timm
reshapes a fused ``qkv`` into ``(batch, tokens, 3, heads, head_dim)``), so nothing here is keyed on a layer type.
Instead the forward pass runs once with a *channel-id companion* beside each projection output: an integer tensor of
the same shape holding, at every position, the output channel of the projection the value came from. Every shape
op (view, reshape, split, permute, unbind...) is applied to the companion too, so at the attention product the
companion of the query says which projection channels each head holds, whatever the reshapes were. The scores
``q @ k^T`` and the context ``probs @ v`` carry which heads they came from, and the layer that consumes the merged
context is the output projection, its columns labelled by the value channels they read.

``nn.MultiheadAttention`` computes its projections inside one fused kernel the trace cannot see into; its heads
follow its documented layout (``in_proj_weight`` rows ``[q; k; v]``, ``head_dim`` each per head) and are found by
:func:`multihead_attention_heads`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_accel._core.graph import IGNORED_CALLS, tensors_in

#: Ops that move values without mixing channels: the same call on the companion says where each channel went.
_SHAPE_OPS = frozenset(
    {
        "view",
        "reshape",
        "transpose",
        "permute",
        "split",
        "chunk",
        "unbind",
        "__getitem__",
        "narrow",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "expand",
        "t",
        "movedim",
        "swapaxes",
        "split_with_sizes",
    }
)
#: Ops that keep every value where it is (casts, copies, dropout): the companion is unchanged.
_SAME_PLACE_OPS = frozenset({"contiguous", "to", "float", "half", "bfloat16", "type", "clone", "detach", "dropout"})
_MATMULS = frozenset({"matmul", "__matmul__", "bmm"})


@dataclass
class _Projection:
    """A tensor derived from a projection's output; ``ids`` holds the projection channel of every element."""

    layer: str
    ids: Tensor


@dataclass
class _Scores:
    """Attention scores; ``rows`` maps each batch position (all but the last two dims) to its (q, k) channel ids."""

    query: str
    key: str
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]]
    shape: torch.Size


@dataclass
class _Context:
    """The attention context: heads' (q, k, v) channel ids, and the value channel of every element (``ids``)."""

    query: str
    key: str
    value: str
    heads: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    ids: Tensor


@dataclass(frozen=True)
class Attention:
    """One attention's heads: for each head, the channels of each projection, and the output projection's columns.

    Attributes:
        query, key, value: Names of the projection layers (the same name three times for a fused QKV layer).
        output: Name of the layer that consumes the merged heads.
        query_rows, key_rows, value_rows: ``(heads, head_dim)`` output channels of each projection per head.
        output_columns: ``(heads, head_dim)`` input columns of the output projection per head.
    """

    query: str
    key: str
    value: str
    output: str
    query_rows: Tensor
    key_rows: Tensor
    value_rows: Tensor
    output_columns: Tensor

    @property
    def heads(self) -> int:
        """The number of heads."""
        return int(self.query_rows.shape[0])


def _batch_rows(ids: Tensor, transposed: bool) -> list[tuple[int, ...]]:
    """Per batch position of a matmul operand, the channel ids along its contracted (or kept) last axis."""
    values = ids[..., :, 0] if transposed else ids[..., 0, :]
    return [tuple(int(v) for v in row) for row in values.reshape(-1, values.shape[-1])]


class _HeadTrace(TorchFunctionMode):
    """Carries channel-id companions through the forward pass and records each attention it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[Tensor, Any]] = {}  # the tensor is kept alive so that ids stay unique
        self.contexts: list[tuple[_Context, str]] = []  # (context, the layer that consumed it)
        self.paused = 0

    def tag(self, tensor: Any, tag: Any) -> None:
        if isinstance(tensor, Tensor):
            self.tags[id(tensor)] = (tensor, tag)

    def tag_of(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            entry = self.tags.get(id(value))
            if entry is not None and entry[0] is value:
                return entry[1]
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.paused or name in IGNORED_CALLS:
            return result
        tagged = [(t, self.tag_of(t)) for t in tensors_in((args, kwargs)) if self.tag_of(t) is not None]
        if not tagged:
            return result
        # A companion that cannot follow an op loses its tag there, and no head is found through it.
        with contextlib.suppress(RuntimeError, IndexError, ValueError, TypeError):
            self._follow(name, args, kwargs, result, tagged)
        return result

    def _follow(self, name: str, args: tuple, kwargs: dict, result: Any, tagged: list) -> None:
        first, tag = tagged[0]
        if name in _SHAPE_OPS and len(tagged) == 1 and args and args[0] is first and hasattr(tag, "ids"):
            moved = getattr(torch.Tensor, name)(tag.ids, *args[1:], **kwargs)
            for out, ids in zip(tensors_in(result), tensors_in(moved), strict=True):
                self.tag(out, _with_ids(tag, ids))
        elif name in _SAME_PLACE_OPS and isinstance(result, Tensor) and result.shape == first.shape:
            self.tag(result, tag)
        elif name == "scaled_dot_product_attention":
            self._follow_sdpa(args, result)
        elif name in _MATMULS and len(args) == 2:
            self._follow_matmul(args, result)
        elif isinstance(tag, _Scores) and isinstance(result, Tensor) and result.shape == tag.shape:
            self.tag(result, tag)  # scaling, masking, softmax, dropout: elementwise on the scores
        elif len(tagged) == 1 and isinstance(result, Tensor) and result.shape == first.shape:
            self.tag(result, tag)  # an elementwise op with an untagged operand (q * scale) keeps every channel

    def _follow_sdpa(self, args: tuple, result: Any) -> None:
        """``scaled_dot_product_attention(q, k, v)``: the context of the heads the three projections hold."""
        q, k, v = (self.tag_of(t) for t in args[:3])
        if all(isinstance(t, _Projection) for t in (q, k, v)):
            rows = list(zip(_batch_rows(q.ids, False), _batch_rows(k.ids, False), strict=True))
            scores = _Scores(q.layer, k.layer, rows, torch.Size(()))
            self.tag(result, _context(scores, v, result))

    def _follow_matmul(self, args: tuple, result: Any) -> None:
        """``q @ k^T`` gives the scores of the heads; ``scores @ v`` their context."""
        a, b = (self.tag_of(t) for t in args)
        if isinstance(a, _Projection) and isinstance(b, _Projection):
            rows = list(zip(_batch_rows(a.ids, False), _batch_rows(b.ids, True), strict=True))
            self.tag(result, _Scores(a.layer, b.layer, rows, result.shape))
        elif isinstance(a, _Scores) and isinstance(b, _Projection):
            self.tag(result, _context(a, b, result))


def _with_ids(tag: Any, ids: Tensor) -> Any:
    if isinstance(tag, _Projection):
        return _Projection(tag.layer, ids)
    return _Context(tag.query, tag.key, tag.value, tag.heads, ids)


def _context(scores: _Scores, value: _Projection, result: Tensor) -> _Context:
    """The context ``probs @ v``: each batch position's head, and the value channel of each element."""
    value_rows = _batch_rows(value.ids, False)
    heads = [(q, k, v) for (q, k), v in zip(scores.rows, value_rows, strict=True)]
    # Every query position of a head reads the same value channels: the value ids along the last axis.
    ids = value.ids[..., :1, :].expand(result.shape)
    return _Context(scores.query, scores.key, value.layer, heads, ids)


def trace_attention(
    model: nn.Module, example_input: Any, layers: Mapping[str, nn.Module], run: Any
) -> tuple[list[Attention], dict[str, str]]:
    """Run ``model`` once and return the attentions whose heads can be removed, and the reasons others cannot.

    Args:
        model: The float model.
        example_input: Its example input.
        layers: The projection layers to follow by name (Linear and transposed-Linear layers).
        run: ``run(model, example_input)`` runs the forward pass.

    Returns:
        The attentions found, and for projections whose heads cannot be removed, the reason by layer name.
    """
    trace = _HeadTrace()
    names = {id(module): name for name, module in layers.items()}
    handles = []

    def before(module: nn.Module, args: tuple) -> None:
        tag = trace.tag_of(args[0]) if args else None
        if isinstance(tag, _Context):
            trace.contexts.append((tag, names[id(module)]))
        trace.paused += 1  # the layer's own ops compute it; they are not consumers

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        trace.paused -= 1
        if isinstance(output, Tensor) and output.dim() >= 1:
            channels = torch.arange(output.shape[-1], device=output.device)
            trace.tag(output, _Projection(names[id(module)], channels.expand(output.shape)))

    for module in layers.values():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), trace:
            run(model, example_input)
    except Exception:
        return [], {}
    finally:
        for module, mode in modes.items():
            module.training = mode
        for handle in handles:
            handle.remove()
    found: dict[str, Attention] = {}
    reasons: dict[str, str] = {}
    for context, output in trace.contexts:
        attention, reason = _attention(context, output)
        if attention is not None:
            found.setdefault(f"{attention.query}|{attention.output}", attention)
        else:
            for layer in (context.query, context.key, context.value):
                reasons[layer] = reason or "unknown"
    return list(found.values()), reasons


def _attention(context: _Context, output: str) -> tuple[Attention | None, str | None]:
    """Turn a traced context into an :class:`Attention`, or say why its heads cannot be removed."""
    heads = list(dict.fromkeys(context.heads))
    widths = {len(part) for head in heads for part in head}
    if len(widths) != 1:
        return None, "query, key and value heads differ in width"
    for position, role in enumerate(("query", "key", "value")):
        channels = [c for head in heads for c in head[position]]
        if len(set(channels)) != len(channels):
            return None, f"several heads share {role} channels (grouped-query attention), so a head cannot go alone"
    columns = context.ids.reshape(-1, context.ids.shape[-1])
    if not bool((columns == columns[:1]).all()):
        return None, "the output projection's columns do not map to value channels the same way at every position"
    column_of = {int(v): i for i, v in enumerate(columns[0])}
    try:
        output_columns = [[column_of[c] for c in head[2]] for head in heads]
    except KeyError:
        return None, "the output projection does not read every value channel"
    if len(column_of) != sum(len(head[2]) for head in heads):
        return None, "the output projection reads more than the attention heads"

    def rows(position: int) -> Tensor:
        return torch.tensor([list(head[position]) for head in heads], dtype=torch.long)

    attention = Attention(
        context.query,
        context.key,
        context.value,
        output,
        rows(0),
        rows(1),
        rows(2),
        torch.tensor(output_columns, dtype=torch.long),
    )
    return attention, None


def multihead_attention_heads(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """The ``nn.MultiheadAttention`` modules whose heads can be removed (packed Q/K/V, a bias or none, no k/v bias)."""
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.MultiheadAttention)
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and module.num_heads > 1
        ):
            found.append((name, module))
    return found

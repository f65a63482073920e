"""``slim``: a physically smaller copy of a channel-pruned model, and writing it (fp32 ONNX or ``.pt2``).

Pruning's channel groups are the plan (``lightning_accel.pruning.groups``); this is the action: the channels
whose every tensor slice is zero are removed from a copy, with our own slicing of the layer types the groups
accept. Per-output-channel state that instrumentation keeps in a layer's children (a QAT weight quantizer's scales)
follows the kept channels, so a prepared model stays prepared; checking such a model as it is evaluated is
``deploy.compose``'s (the one place two techniques meet).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_accel._core.modules import BATCH_NORMS, module_copy
from lightning_accel._core.views import float_view
from lightning_accel.export.check import check_rewrite
from lightning_accel.export.onnx import export_float_onnx
from lightning_accel.export.program import export_program
from lightning_accel.pruning.attention import prune_heads
from lightning_accel.pruning.groups import (
    ChannelGroup,
    ChannelGroups,
    group_masks,
    is_depthwise,
    kept_channels,
)
from lightning_accel.pruning.resize import dimension_size, resize_
from lightning_accel.pruning.trace import find_channel_groups

Role = Literal["out", "in"]


def slim(model: nn.Module, example_input: Any, groups: ChannelGroups | None = None) -> nn.Module:
    """Return a physically smaller copy of ``model`` without the channels that pruning zeroed.

    A channel is removed when every tensor slice of its group is exactly zero (what ``pattern="channels"`` leaves),
    so the copy computes what ``model`` computes, up to float summation order. ``model`` is not changed (contract
    5: fit never converts). A model prepared for QAT stays prepared: per-channel weight scales follow the kept
    channels, so the copy exports to int8 like the original.

    Args:
        model: A trained model, plain or prepared for QAT.
        example_input: An input to trace the model with (``example_input_array``).
        groups: Groups found earlier by :func:`find_channel_groups`; traced again when ``None``.

    Returns:
        A new dense model with fewer channels.

    Example:
        >>> small = slim(model, torch.randn(1, 1, 8, 8))  # doctest: +SKIP
    """
    if groups is None:
        groups = removable_groups(model, example_input, find_channel_groups(float_view(model), example_input))
    parameters = dict(model.named_parameters())
    keep: dict[tuple[str, str], Tensor] = {}  # (module, "out"|"in") -> kept positions
    kept_heads: dict[str, tuple[ChannelGroup, Tensor]] = {}  # attention owner -> (its head group, heads kept)
    modules = dict(model.named_modules())
    for group in groups.groups:
        alive = kept_channels(group, parameters)
        if alive.all():
            continue
        if group.kind == "heads":
            kept_heads[group.owner] = (group, alive)
            if isinstance(modules[group.owner], nn.MultiheadAttention):
                continue  # replaced as a whole below
        for member in group.members:
            module = modules[member.module]
            role = "out" if isinstance(module, BATCH_NORMS) or is_depthwise(module) else member.role
            size = dimension_size(module, role)
            kept = keep.get((member.module, role), torch.ones(size, dtype=torch.bool)).clone()
            kept[member.indices[~alive[member.root_indices]]] = False
            keep[(member.module, role)] = kept
    for module in modules.values():
        if getattr(module, "_fold_check", None) is not None:
            module._fold_check = None  # a pending non-leaf tensor cannot be deep-copied
    small = module_copy(model)
    small_modules = dict(small.named_modules())
    for (name, role), kept in keep.items():
        resize_(small_modules[name], role, kept.nonzero().flatten())
    for owner, (group, alive) in kept_heads.items():
        attention = small_modules[owner]
        if isinstance(attention, nn.MultiheadAttention):
            parent, _, child = owner.rpartition(".")
            setattr(small.get_submodule(parent), child, prune_heads(attention, alive.nonzero().flatten()))
        else:
            _update_head_attributes(small, group, int(alive.sum()))
    return small


#: Attributes that attention modules read their head count from (Hugging Face, timm, torch and common code).
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_head", "n_heads", "heads")
#: Attributes that hold the width of all heads together (``heads x head_dim``).
HEAD_WIDTH_ATTRIBUTES = ("all_head_size", "split_size", "inner_dim")


def _update_head_attributes(model: nn.Module, group: ChannelGroup, heads: int) -> None:
    """Set the head count and the heads' total width on the attention module(s) below ``group.owner``.

    Only attributes that hold the old value are changed, and the slim model is then checked against the masked one
    (:func:`slim_checked`), so an attention whose forward reads its width elsewhere fails that check instead of
    computing something else.
    """
    head_dim = group.members[0].indices.numel() // group.channels
    changes = [
        (HEAD_COUNT_ATTRIBUTES, group.channels, heads),
        (HEAD_WIDTH_ATTRIBUTES, group.channels * head_dim, heads * head_dim),
    ]
    for module in model.get_submodule(group.owner).modules():
        for attributes, old, new in changes:
            for attribute in attributes:
                value = getattr(module, attribute, None)
                if isinstance(value, int) and value == old:
                    setattr(module, attribute, new)


def slim_checked(model: nn.Module, example_input: Any, groups: ChannelGroups | None = None) -> nn.Module:
    """:func:`slim` a float model, then raise unless the slim copy computes what ``model`` computes.

    Slimming must never change what the masked model computes: the files are then checked against the slim model,
    so a wrong slim would pass its own check. (A fake-quantized model is checked as it is evaluated by
    ``deploy.compose.slim_evaluated``.)
    """
    small = slim(model, example_input, groups)
    reference, rewritten = module_copy(model).eval().float(), module_copy(small).eval().float()
    check_rewrite(reference, rewritten, [example_input], "The slim model")
    return small


def removable_groups(model: nn.Module, example_input: Any, groups: ChannelGroups) -> ChannelGroups:
    """The groups whose removal :func:`slim` computes exactly, checked on a copy with half of each group zeroed.

    The plan comes from tracing; this proves it before training (contract 10). An attention whose forward reads its
    width from the input (timm's ``reshape(B, N, C)``) runs with fewer heads only after its code changes, so its head
    group is left dense with that reason instead of failing at the end of fit.

    Returns:
        ``groups`` without the groups that failed, each named in ``left_dense`` with the reason.
    """
    plain = float_view(model)

    def slims_exactly(candidates: list[ChannelGroup]) -> str | None:
        masked = module_copy(plain)
        parameters = dict(masked.named_parameters())
        with torch.no_grad():
            for name, mask in group_masks(parameters, ChannelGroups(candidates), 0.5).items():
                parameters[name].mul_(mask.to(parameters[name].dtype))
        try:
            slim_checked(masked, example_input, ChannelGroups(candidates))
        except Exception as error:  # a shape error or a mismatch: either way this group cannot go
            return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return None

    if not groups.groups or slims_exactly(groups.groups) is None:
        return groups
    failures = {index: slims_exactly([group]) for index, group in enumerate(groups.groups)}
    # Repeated blocks may share a tensor sized by the first block's head count (T5's cross-attention position bias):
    # none of them slims alone, yet all slim together when each loses the same number of heads, which is what
    # `group_masks` does (one fraction for every group). Such a family is proved together and kept together.
    for family in _block_families(groups.groups).values():
        retry = len(family) > 1 and any(failures[i] for i in family)
        if retry and slims_exactly([groups.groups[i] for i in family]) is None:
            for index in family:
                failures[index] = None
    checked = ChannelGroups(left_dense=dict(groups.left_dense))
    for index, group in enumerate(groups.groups):
        if failures[index] is None:
            checked.groups.append(group)
        else:
            what = "its heads" if group.kind == "heads" else "its channels"
            checked.left_dense[", ".join(group.modules())] = (
                f"the model does not compute the same without {what} (checked at setup: {failures[index]}); its "
                "forward reads a width, or holds a per-head tensor (a position bias), that slimming does not update"
            )
    return checked


def _block_families(groups: list[ChannelGroup]) -> dict[tuple[str, str, int], list[int]]:
    """Group indices by the same layer in repeated blocks: the owner (or root) with block numbers as ``*``."""
    families: dict[tuple[str, str, int], list[int]] = {}
    for index, group in enumerate(groups):
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", group.owner or group.root)
        families.setdefault((group.kind, pattern, group.channels), []).append(index)
    return families


def write_slim(model: nn.Module, path: str | os.PathLike, example_input: Any, on_mismatch: str = "warn") -> Path:
    """Write an already slim model as ``.onnx`` (fp32, checked in ONNX Runtime) or ``.pt2``."""
    path = Path(path)
    if path.suffix == ".pt2":
        return export_program(model, path, example_input)
    return export_float_onnx(model, path, example_input, on_mismatch=on_mismatch)[0]


def export_slim(
    model: nn.Module, path: str | os.PathLike, example_input: Any, groups: ChannelGroups | None = None
) -> Path:
    """Slim ``model`` (:func:`slim`) and write it as ``.onnx`` (fp32) or ``.pt2``.

    A model prepared for QAT is written as its float model (the int8 export is separate). The slim model is
    checked against ``model`` first, and the ONNX file against the slim model in ONNX Runtime.

    Returns:
        The path written.
    """
    model = float_view(model)
    small = slim_checked(model, example_input, groups)
    written = write_slim(small, path, example_input)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    rank_zero_info(
        f"Wrote the slim model to {written} ({written.stat().st_size:,} bytes; {after:,} parameters, "
        f"{after / before:.1%} of {before:,})"
    )
    return written


def dry_run_slim_export(model: nn.Module, example_input: Any, groups: ChannelGroups, export_path: str) -> None:
    """Export a copy (unpruned: nothing is removed yet) to a temporary file, so that the end of fit cannot fail."""
    try:
        with tempfile.TemporaryDirectory() as directory:
            plain = float_view(model)
            small = slim_checked(plain, example_input, groups)
            write_slim(small, Path(directory) / f"dry_run{Path(export_path).suffix}", example_input, "ignore")
    except Exception as error:
        raise RuntimeError(
            f"MagnitudePruning: the slim export to {export_path!r} fails on example_input_array, so it would fail at "
            f"the end of fit. Checked at setup, before training: {type(error).__name__}: {error}"
        ) from error

"""Non-uniform channel pruning: each group's share of the target from its measured sensitivity.

With ``channel_fractions="sensitivity"``, when the first channel masks are due, every channel group (a layer's
output channels, an attention's heads, an FFN's units) in turn loses the target share of its channels alone (by
magnitude), and the model is scored on up to 8 validation batches (:mod:`lightning_accel._core.scoring`: accuracy,
perplexity or cosine to the unpruned outputs). A group's fraction then scales the schedule's sparsity for that
group: more is taken from groups whose removal cost little, less from costly ones, and the channels removed
overall stay what a uniform fraction removes. Rank 0 measures, every rank receives the fractions, and they are part
of the callback's state, so a resumed fit and every DDP rank prune alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_accel._core.inputs import batch_picker
from lightning_accel._core.lightning import validation_loader
from lightning_accel._core.scoring import QualityProbe, cost_of, probe_on
from lightning_accel.pruning.groups import ChannelGroups, group_masks

CHANNEL_FRACTIONS = ("uniform", "sensitivity")
#: Validation batches each group's removal is scored on.
SCORED_BATCHES = 8
#: Bounds of a group's multiplier: every group gives something, none more than twice its uniform share.
MIN_FRACTION, MAX_FRACTION = 0.25, 2.0


def validate_channel_fractions(value: Any, pattern_kind: str) -> str:
    """``"uniform"`` or ``"sensitivity"`` (channels only); ``ValueError`` naming the argument otherwise."""
    if value not in CHANNEL_FRACTIONS:
        raise ValueError(f"`channel_fractions` must be one of {list(CHANNEL_FRACTIONS)}, got {value!r}")
    if value == "sensitivity" and pattern_kind != "channels":
        raise ValueError(
            f"`channel_fractions`='sensitivity' shares the target between channel groups: it needs "
            f"pattern='channels', got a {pattern_kind!r} pattern"
        )
    return value


def fractions_from_costs(costs: Sequence[float], channels: Sequence[int], sparsity: float) -> list[float]:
    """Multipliers of ``sparsity`` per group: inversely to each group's cost, the same channels removed overall.

    Each weight is ``1 / (cost + typical cost)`` (negative costs count as 0), so a group as costly as the typical
    one keeps about its uniform share; the multipliers are clipped to [0.25, 2] (and below ``0.95 / sparsity``, so
    that no group is emptied) and rescaled until the channel-weighted mean is 1.
    """
    clean = [max(float(c), 0.0) for c in costs]
    typical = sum(clean) / len(clean) + 1e-9
    weights = [1.0 / (c + typical) for c in clean]
    ceiling = min(MAX_FRACTION, 0.95 / max(sparsity, 1e-9))
    total = float(sum(channels))
    fractions = [w * total / sum(w_ * n for w_, n in zip(weights, channels, strict=True)) for w in weights]
    for _ in range(50):  # clip, then rescale the free groups so that the channels removed stay the same
        fractions = [min(max(f, MIN_FRACTION), ceiling) for f in fractions]
        removed = sum(f * n for f, n in zip(fractions, channels, strict=True))
        free = [i for i, f in enumerate(fractions) if MIN_FRACTION < f < ceiling]
        if abs(removed - total) < 1e-6 * total or not free:
            break
        free_channels = sum(fractions[i] * channels[i] for i in free)
        scale = (free_channels + total - removed) / free_channels
        fractions = [f * scale if i in free else f for i, f in enumerate(fractions)]
    return fractions


def shared_by_kind(groups: ChannelGroups, costs: Sequence[float], sparsity: float) -> list[float]:
    """:func:`fractions_from_costs` within each kind: channels share among channel groups, heads among heads.

    A head spans as many parameters as an FFN's hundreds of units, so counted together the few heads would
    hardly weigh in the balance and could all go; within each kind the same heads and the same channels are
    removed overall as with uniform fractions.
    """
    fractions = [1.0] * len(groups.groups)
    for kind in sorted({group.kind for group in groups.groups}):
        members = [i for i, group in enumerate(groups.groups) if group.kind == kind]
        shared = fractions_from_costs(
            [costs[i] for i in members], [groups.groups[i].channels for i in members], sparsity
        )
        for i, fraction in zip(members, shared, strict=True):
            fractions[i] = fraction
    return fractions


def measured_fractions(callback: Any, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict | None:
    """For ``MagnitudePruning``: rank 0 measures at its target (:func:`channel_sensitivity`); other ranks ``None``."""
    if not trainer.is_global_zero:
        return None
    return channel_sensitivity(trainer, pl_module, callback._groups, callback.target_sparsity, batch, None)


@torch.no_grad()
def channel_sensitivity(
    trainer: Trainer, pl_module: LightningModule, groups: ChannelGroups, sparsity: float, batch: Any, model_input: Any
) -> dict[str, Any]:
    """Score each group's removal alone on validation batches (else this training batch) and share ``sparsity``.

    Returns:
        Plain values (checkpoints and the report keep them): ``metric``, ``sparsity``, ``seconds``, and ``groups``,
        one row per group in the order of ``groups.groups``: ``group`` (its root module), ``kind``, ``cost`` (the
        score lost with that group alone at ``sparsity``) and ``fraction`` (its multiplier of the target).
    """
    started = time.perf_counter()
    was_training = pl_module.training
    probe = scoring_probe(trainer, pl_module, batch, model_input)
    reference = probe.score(pl_module)
    parameters = dict(pl_module.named_parameters())
    costs = [_cost_alone(pl_module, parameters, group, sparsity, probe, reference) for group in groups.groups]
    pl_module.train(was_training)
    fractions = shared_by_kind(groups, costs, sparsity)
    rows = [
        {"group": g.root, "kind": g.kind, "cost": float(c), "fraction": float(f)}
        for g, f, c in zip(groups.groups, fractions, costs, strict=True)
    ]
    seconds = time.perf_counter() - started
    shown = ", ".join(f"{row['group']} {row['fraction']:.2f}x (cost {row['cost']:+.4f})" for row in rows)
    rank_zero_info(
        f"MagnitudePruning: channel fractions from each group's measured {probe.metric} cost at {sparsity:.0%} alone "
        f"({seconds:.2f} s): {shown}"
    )
    return {"metric": probe.metric, "sparsity": float(sparsity), "seconds": seconds, "groups": rows}


@torch.no_grad()
def scoring_probe(trainer: Trainer, pl_module: LightningModule, batch: Any, model_input: Any = None) -> QualityProbe:
    """A probe on up to 8 validation batches (else ``batch``), against the model's outputs now (eval mode)."""
    loader = validation_loader(trainer)
    batches = [b for _, b in zip(range(SCORED_BATCHES), loader, strict=False)] if loader is not None else [batch]
    pl_module.eval()
    return probe_on(pl_module, batches, batch_picker(model_input, pl_module), "pruned")


def _cost_alone(
    model: nn.Module, parameters: dict, group: Any, sparsity: float, probe: QualityProbe, reference: float
) -> float:
    """The score lost when only ``group`` loses ``sparsity`` of its channels (by magnitude); weights restored."""
    masks = group_masks({n: p.detach() for n, p in parameters.items()}, ChannelGroups([group]), sparsity)
    saved = {name: parameters[name].detach().clone() for name in masks}
    for name, mask in masks.items():
        parameters[name].mul_(mask.to(parameters[name].dtype))
    score = probe.score(model)
    for name, value in saved.items():
        parameters[name].copy_(value)
    return cost_of(probe.metric, reference, score)

"""What ``MagnitudePruning`` prunes: the selection as pure functions (testable without a Trainer), and its checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_accel._core.inputs import example_input
from lightning_accel._core.modules import (
    default_weight_names,
    select_weights,
    summarize_selection,
    unpruned_weight_holders,
)
from lightning_accel.pruning.groups import ChannelGroups, channel_sparsity, group_masks, is_depthwise
from lightning_accel.pruning.importance import IMPORTANCES
from lightning_accel.pruning.masks import SCOPES, compute_masks, full_tensor, parse_pattern, tensor_sparsity
from lightning_accel.pruning.slim import removable_groups
from lightning_accel.pruning.trace import find_channel_groups
from lightning_accel.pruning.wanda import WandaNorms, wanda_masks

#: A layer with more zeros than this no longer computes anything useful: it is named at every recompute.
EMPTIED_LAYER = 0.99


def warn_about_emptied_layers(masks: dict[str, Tensor], target: float) -> None:
    """Name every selected weight above :data:`EMPTIED_LAYER` zeros, at each recompute.

    A global threshold empties the layers whose weights are small by initialisation or scale first (T5 lost whole
    attention projections at 50% global sparsity), and nothing else would say so.
    """
    emptied = {name: float((~mask).float().mean()) for name, mask in masks.items()}
    emptied = {name: zeros for name, zeros in emptied.items() if zeros > EMPTIED_LAYER}
    if emptied:
        listed = ", ".join(f"{name} {zeros:.1%}" for name, zeros in list(emptied.items())[:8])
        more = f" and {len(emptied) - 8} more" if len(emptied) > 8 else ""
        rank_zero_warn(
            f"MagnitudePruning: at sparsity {target:.2%}, {len(emptied)} layer(s) are above {EMPTIED_LAYER:.0%} zeros: "
            f"{listed}{more}. A global magnitude threshold prunes layers with small weights (large fan-in, unscaled "
            "attention) first; scope='lamp' (the default) ranks each weight within its own layer, scope='layer' "
            "prunes each alike, or exclude these layers."
        )


def refuse_lora_adapters(pl_module: LightningModule, include: Any) -> None:
    """Refuse a default selection that would prune LoRA adapters (PEFT's ``lora_A``/``lora_B``) instead of weights.

    Pruning an adapter leaves the merged weight (base + B @ A) dense: after ``merge_and_unload`` nothing is sparse,
    while the log said 50%. Measured: ``lora_B`` ended 86% zero and the merged weight dense.
    """
    if include is not None:
        return
    adapters = [name for name, _ in pl_module.named_modules() if name.rpartition(".")[2] in ("lora_A", "lora_B")]
    if adapters:
        raise ValueError(
            f"MagnitudePruning: the model holds LoRA adapters ({', '.join(adapters[:4])}"
            f"{' ...' if len(adapters) > 4 else ''}). Pruning them by default would leave the merged weight "
            "(base + B @ A) dense, so nothing deployed would be sparse. Prune the frozen base weights by name, "
            "include=['*.base_layer'], and merge the adapters after training; or merge first and prune the merged "
            "model."
        )


def select_weight_parameters(
    pl_module: LightningModule, unstructured: bool, include: Any, exclude: Any
) -> tuple[dict[str, Tensor], str]:
    """The weights unstructured or N:M pruning takes, and the one-line summary of what was selected and left out.

    Raises:
        ValueError: when LoRA adapters would be pruned by default, or nothing is selected.
    """
    refuse_lora_adapters(pl_module, include)
    params = select_weights(pl_module, include, exclude)
    depthwise = []
    if unstructured and include is None:
        # A depthwise kernel holds 9 weights per channel: unstructured targets empty whole channels (MobileNetV3
        # at 90% layer scope: validation loss 270). Pruned only when a pattern names them.
        modules = dict(pl_module.named_modules())
        depthwise = [n for n in params if is_depthwise(modules.get(n.rpartition(".")[0], pl_module))]
        params = {n: p for n, p in params.items() if n not in depthwise}
    if not params:
        raise ValueError(
            f"MagnitudePruning selected no parameter of {type(pl_module).__name__}: include={include!r} "
            f"and exclude={exclude!r} leave no Linear/Conv weight (name parameters such as "
            "'*.in_proj_weight' explicitly to prune others)"
        )
    return params, _selection_summary(pl_module, params, include, depthwise)


def _selection_summary(
    pl_module: LightningModule, params: dict[str, Tensor], include: Any, depthwise: list[str]
) -> str:
    default = default_weight_names(pl_module)
    candidates = [name for name, _ in pl_module.named_parameters() if name in default]
    frozen = [n for n, p in pl_module.named_parameters() if n in candidates and not p.requires_grad]
    summary = summarize_selection(params, [c for c in candidates if c not in frozen and c not in depthwise])
    if frozen and include is None:
        summary += f"; left dense because frozen (requires_grad=False): {', '.join(frozen[:6])}"
    if include is None:
        summary += unpruned_weight_holders(pl_module, default)
    if depthwise:
        summary += (
            "; left dense by default, depthwise convs (a few weights per channel, so unstructured pruning would "
            f"empty whole channels, name them to prune): {', '.join(depthwise[:6])}"
        )
    return summary


def check_n_m_fits(params: dict[str, Tensor], n: int, m: int) -> None:
    """Raise unless every selected weight's input dimension is a multiple of ``m`` (N:M groups input channels)."""
    misfits = [f"{name} {tuple(p.shape)}" for name, p in params.items() if p.dim() < 2 or p.shape[1] % m]
    if misfits:
        raise ValueError(
            f"`pattern` '{n}:{m}' groups input channels, so it needs an input dimension (shape[1]) that is a "
            f"multiple of {m}; these selected parameters have other shapes: {', '.join(misfits)}. Leave them dense "
            "with `exclude`."
        )


def check_masks_fit(masks: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    """Raise unless restored masks belong to exactly these parameters, shape for shape."""
    if set(masks) != set(params):
        raise ValueError(
            "The checkpoint's MagnitudePruning masks belong to other parameters: the checkpoint has "
            f"{sorted(masks)}, this model selects {sorted(params)}."
        )
    wrong = [
        f"{name}: checkpoint {tuple(masks[name].shape)} vs model {tuple(p.shape)}"
        for name, p in params.items()
        if masks[name].shape != p.shape
    ]
    if wrong:
        raise ValueError(f"The checkpoint's MagnitudePruning masks do not fit this model's shapes: {wrong}")


def sparsity_metrics(
    params: dict[str, Tensor], groups: ChannelGroups | None, target: float, per_layer: bool
) -> dict[str, float]:
    """What is logged: the target, the measured sparsity (the channel fraction for channel groups), per layer."""
    if groups is not None:  # the fraction of channels removed, which the target counts
        actual = channel_sparsity({name: full_tensor(p) for name, p in params.items()}, groups)
        metrics = {"sparsity/target": target, "sparsity/actual": actual, "sparsity/weights": tensor_sparsity(params)}
    else:
        metrics = {"sparsity/target": target, "sparsity/actual": tensor_sparsity(params)}
    if per_layer:
        for name, p in params.items():
            metrics[f"sparsity/layer/{name}"] = tensor_sparsity({name: p})
    return metrics


def best_checkpoint_below_target(trainer: Trainer, state_key: str, target: float) -> str | None:
    """The "best" checkpoint saved below the target sparsity, warned about; ``None`` if there is none."""
    below = None
    for checkpoint in trainer.checkpoint_callbacks:
        path = getattr(checkpoint, "best_model_path", "")
        if not path or getattr(checkpoint, "monitor", None) is None:
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError):
            continue
        sparsity = float(saved.get("callbacks", {}).get(state_key, {}).get("mask_sparsity", 0.0))
        if sparsity < target:
            below = path
            rank_zero_warn(
                f"MagnitudePruning: the best checkpoint by {checkpoint.monitor!r} ({path}) was saved at "
                f"{sparsity:.2%} sparsity, below the target {target:.2%} that the final weights reached. "
                "`test(ckpt_path='best')` would score a less-pruned model than the one you deploy; "
                "`lightning-accel --test_after_fit` tests the final weights instead."
            )
    return below


def check_pattern_options(pattern: Any, scope: Any, target_sparsity: float) -> Any:
    """Parse ``pattern`` and check ``scope`` and, for N:M, that the target is ``1 - N/M``; return the pattern."""
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {list(SCOPES)}, got {scope!r}")
    parsed = parse_pattern(pattern)
    if parsed.kind == "N:M" and not math.isclose(target_sparsity, parsed.sparsity, abs_tol=1e-6):
        raise ValueError(
            f"`target_sparsity` must equal 1 - N/M = {parsed.sparsity} for pattern {pattern!r}, got {target_sparsity!r}"
        )
    return parsed


def check_state_pattern(state: dict[str, Any], pattern: str) -> None:
    """Refuse a checkpoint's pruning state made with another pattern than ``pattern``."""
    saved = state.get("pattern", pattern)
    if saved != pattern:
        raise ValueError(
            f"The checkpoint's MagnitudePruning state was made with pattern {saved!r}, but this callback uses "
            f"pattern {pattern!r}. Resume with the same pattern, or start a new run."
        )


def check_importance(importance: Any, kind: str, pattern: Any) -> str:
    """The ranking to use: ``importance`` as given (checked), else Taylor for channels and magnitude otherwise."""
    if importance is not None and importance not in IMPORTANCES:
        raise ValueError(f"`importance` must be one of {list(IMPORTANCES)} or None, got {importance!r}")
    if importance == "taylor" and kind != "channels":
        raise ValueError(
            f"`importance='taylor'` ranks channel and head groups: it needs pattern='channels', got {pattern!r}"
        )
    if importance == "wanda" and kind == "channels":
        raise ValueError(
            "`importance='wanda'` ranks single weights (unstructured or N:M patterns), got pattern='channels'; "
            "channels and heads are ranked by 'taylor' or 'magnitude'"
        )
    return importance or ("taylor" if kind == "channels" else "magnitude")


def report_final_sparsity(reached: float, masks_at: float, target: float, steps: int, end_step: int | None) -> None:
    """Say the final sparsity, or warn when training ended before the schedule reached the target."""
    if masks_at < target:
        rank_zero_warn(
            f"MagnitudePruning: training ended after {steps} optimizer steps (the last one was step {steps - 1}), "
            f"but the schedule reaches its target only at step {end_step}; sparsity is {reached:.2%}, target "
            f"{target:.2%}. Set `end_step` below {steps} (or a fraction below 1.0), or train longer."
        )
    else:
        rank_zero_info(f"MagnitudePruning: final sparsity {reached:.2%} (target {target:.2%})")


def plan_channel_groups(
    pl_module: LightningModule, include: Any, exclude: Any
) -> tuple[ChannelGroups, dict[str, Tensor]]:
    """The channel groups ``pattern="channels"`` prunes, proven removable, and the parameters they touch.

    Raises:
        ValueError: without ``example_input_array``, or when no group can be removed (with what stays and why).
    """
    if pl_module.example_input_array is None:
        raise ValueError(
            "MagnitudePruning(pattern='channels') traces the model to find the channels that must be removed "
            f"together, and needs an example input: set `self.example_input_array` in "
            f"{type(pl_module).__name__}.__init__ (e.g. torch.zeros(1, 1, 8, 8))"
        )
    example = example_input(pl_module)
    # Selects with include/exclude first, so a pattern that matches nothing fails before the trace.
    groups = find_channel_groups(pl_module, example, include, exclude)
    # Proven before training: removing half of each group on a copy must compute what the masked copy computes.
    groups = removable_groups(pl_module, example, groups)
    if not groups.groups:
        raise ValueError(
            f"MagnitudePruning(pattern='channels') found no removable channel group in "
            f"{type(pl_module).__name__}: {groups.summary()}"
        )
    parameters = dict(pl_module.named_parameters())
    return groups, {name: parameters[name] for name in groups.parameter_names()}


def next_masks(
    weights: dict[str, Tensor],
    target: float,
    groups: ChannelGroups | None,
    pattern: str,
    scope: str,
    previous: dict[str, Tensor] | None,
    scores: Any,
) -> dict[str, Tensor]:
    """The keep-masks for ``target``: whole channel groups, or the pattern's masks; emptied layers are named."""
    if groups is not None:
        masks = group_masks(weights, groups, target, previous=previous, scores=scores)
    elif isinstance(scores, WandaNorms):
        masks = wanda_masks(weights, scores.norms, target, pattern, previous, scores.transposed)
    else:
        masks = compute_masks(weights, target, pattern, scope, previous=previous)
    warn_about_emptied_layers(masks, target)
    return masks


def warn_when_restored_above_target(restored: float, target: float) -> None:
    """Say that masks restored above the target stay: pruned weights are zero and are chosen first again."""
    if restored > target:
        rank_zero_warn(
            f"MagnitudePruning: target_sparsity {target:.2f} is below the {restored:.2%} that the checkpoint's masks "
            "reached. Pruned weights are exactly zero, and zeros have the smallest magnitude, so they are chosen "
            "first again and do not come back: expect the final sparsity to stay near the checkpoint's, not the new "
            "target. Start from a dense checkpoint to prune less."
        )

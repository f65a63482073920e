"""MagnitudePruning's checkpoint state: what is saved, and how it is restored and checked."""

from __future__ import annotations

from typing import Any

from lightning_accel._core.validation import check_state_version
from lightning_accel.pruning.selection import check_masks_fit, check_state_pattern


def pruning_state(callback: Any, version: int) -> dict[str, Any]:
    """The saved state: masks (bool, on CPU), their sparsity, the schedule position, importance sums, fractions."""
    return {
        "version": version,
        "pattern": callback.pattern_string,
        "masks": {name: mask.cpu() for name, mask in (callback._masks or {}).items()},
        "mask_sparsity": callback._mask_sparsity,
        "last_step": callback._last_step,
        "training_batches": callback._training_steps.batches,
        "importance_scores": callback._scorer.state_dict() if callback._scorer is not None else {},
        "channel_fractions": callback._fractions,  # derived from channel_sensitivity: readable without it
        "channel_sensitivity": callback.channel_sensitivity,
    }


def restore_pruning_state(callback: Any, state: dict[str, Any], version: int) -> None:
    """Restore ``state`` into ``callback``; refuse masks from another pattern, model or format."""
    check_state_version("MagnitudePruning", state, version)
    check_state_pattern(state, callback.pattern_string)
    masks = state.get("masks") or None
    if masks is not None and callback._params:
        check_masks_fit(masks, callback._params)
    callback._masks = masks
    callback._mask_sparsity = float(state.get("mask_sparsity", 0.0))
    callback._last_step = int(state.get("last_step", -1))
    callback._training_steps.batches = int(state.get("training_batches", 0))
    callback.channel_sensitivity = state.get("channel_sensitivity")
    callback._scorer_state = dict(state.get("importance_scores") or state.get("taylor") or {}) or None
    if callback._scorer is not None and callback._scorer_state is not None:
        callback._scorer.load_state_dict(callback._scorer_state)

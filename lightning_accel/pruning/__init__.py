"""Magnitude pruning on a schedule: pure schedules and masks, and the MagnitudePruning callback."""

from lightning_accel.pruning.attention import HeadPrunedMultiheadAttention
from lightning_accel.pruning.callback import DEFAULT_END_FRACTION, MagnitudePruning
from lightning_accel.pruning.groups import ChannelGroups, channel_sparsity, group_masks
from lightning_accel.pruning.masks import (
    apply_masks_,
    channel_mask,
    compute_masks,
    mask_sparsity,
    n_m_mask,
    parse_pattern,
    tensor_sparsity,
    unstructured_masks,
)
from lightning_accel.pruning.schedule import sparsity_at
from lightning_accel.pruning.slim import export_slim, slim
from lightning_accel.pruning.trace import find_channel_groups
from lightning_accel.pruning.wanda import WandaImportance, wanda_masks

__all__ = [
    "DEFAULT_END_FRACTION",
    "ChannelGroups",
    "HeadPrunedMultiheadAttention",
    "MagnitudePruning",
    "WandaImportance",
    "apply_masks_",
    "channel_mask",
    "channel_sparsity",
    "compute_masks",
    "export_slim",
    "find_channel_groups",
    "group_masks",
    "mask_sparsity",
    "n_m_mask",
    "parse_pattern",
    "slim",
    "sparsity_at",
    "tensor_sparsity",
    "unstructured_masks",
    "wanda_masks",
]

"""First-order (Taylor) importance of channel and head groups, accumulated over training steps.

Magnitude ranks a channel by the size of its weights, which says little in a pretrained transformer: weights were
not trained to be small where they do not matter. The first-order Taylor estimate of the loss change when a weight
goes to zero is ``|w * dL/dw|`` (Molchanov et al., 2019); summed over every tensor slice of a group channel and over
the steps since the masks were last computed, it ranks channels and heads by what removing them costs the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_accel.pruning.groups import ChannelGroups, channel_sums

IMPORTANCES = ("magnitude", "taylor", "wanda")


class TaylorImportance:
    """Accumulates ``|w * grad|`` per channel of each group between mask recomputations.

    Args:
        groups: The channel and head groups being pruned.
    """

    def __init__(self, groups: ChannelGroups) -> None:
        self.groups = groups
        self.scores = [torch.zeros(group.channels, dtype=torch.float64) for group in groups.groups]
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, parameters: Mapping[str, nn.Parameter | Tensor], gradients: Mapping[str, Tensor]) -> None:
        """Add one step's ``|w * grad|`` (call after backward, on unscaled gradients, before the optimizer step).

        Args:
            parameters: The group parameters by name (full tensors).
            gradients: Their gradients by name (full tensors); names without a gradient contribute nothing.
        """
        products = {
            name: (parameters[name].detach().float() * gradient.detach().float()).abs()
            for name, gradient in gradients.items()
            if gradient is not None
        }
        if not products:
            return
        sums = [channel_sums(group, products) for group in self.groups.groups]
        if not all(bool(torch.isfinite(s).all()) for s in sums):
            return  # an fp16 step with overflowing gradients, which the optimizer skips too
        for index, step_sum in enumerate(sums):
            self.scores[index] += step_sum
        self.steps += 1

    def attach(self) -> None:
        """Nothing to hook: the callback feeds :meth:`accumulate` after backward."""

    def detach(self) -> None:
        """Nothing to unhook."""

    def take(self, model: nn.Module | None = None, batch: Any = None) -> list[Tensor] | None:
        """The accumulated scores per group (``None`` before any step), and start accumulating afresh."""
        if self.steps == 0:
            return None
        scores, self.steps = self.scores, 0
        self.scores = [torch.zeros_like(score) for score in scores]
        return scores

    def state_dict(self) -> dict[str, Any]:
        """The scores accumulated so far (float64 CPU tensors, one per group) and how many steps they hold."""
        return {"scores": [score.clone() for score in self.scores], "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore accumulated scores; scores for other groups (another model) are refused."""
        scores = list(state.get("scores") or [])
        if not scores:
            return
        if [s.numel() for s in scores] != [s.numel() for s in self.scores]:
            raise ValueError(
                "The checkpoint's Taylor importance scores belong to other channel groups: the checkpoint has "
                f"{[s.numel() for s in scores]} channels per group, this model {[s.numel() for s in self.scores]}."
            )
        self.scores = [s.to(torch.float64).clone() for s in scores]
        self.steps = int(state.get("steps", 0))

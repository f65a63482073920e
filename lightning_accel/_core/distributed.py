"""Rank-0 decide-and-broadcast helpers, so that every rank holds one truth."""

from __future__ import annotations

from typing import TypeVar

from lightning import Trainer

T = TypeVar("T")


def decide_on_rank_zero(trainer: Trainer, value: T) -> T:
    """Return rank 0's ``value`` on every rank.

    Every rank must call this at the same point (it is a collective). With one process it returns ``value``
    unchanged and communicates nothing.
    """
    if trainer.world_size == 1:
        return value
    return trainer.strategy.broadcast(value, src=0)

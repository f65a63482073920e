"""Distillation from a frozen teacher: the Distillation callback."""

from lightning_accel.distillation.callback import Distillation

__all__ = ["Distillation"]

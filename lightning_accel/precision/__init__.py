"""Mixed precision: the MixedPrecision callback (bf16/fp16 autocast, fp8 on capable GPUs) and its choice rule."""

from lightning_accel.precision.callback import MixedPrecision, NonFiniteLossError, choose_precision

__all__ = ["MixedPrecision", "NonFiniteLossError", "choose_precision"]

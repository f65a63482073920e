"""Activation ranges across steps and ranks, and the quantizers' checkpoint state (plain tensors)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant, update_many


def observed_ranges(quantizers: Mapping[str, ActivationFakeQuant]) -> Tensor:
    """Take this step's ranges as one tensor ``[-min_0, max_0, -min_1, max_1, ...]`` (for one all-reduce(max)).

    The quantizers' ``batch_range`` is cleared, so that the next step starts afresh.

    Raises:
        RuntimeError: naming the modules whose quantizers saw no data (a forward that skipped them).
    """
    missing = [name for name, q in quantizers.items() if q.batch_range is None]
    if missing:
        modules = sorted({name.rpartition(".")[0] or name for name in missing})
        raise RuntimeError(
            f"The quantized module(s) {modules[:8]}{' and more' if len(modules) > 8 else ''} did not run in this "
            "forward, so their activation ranges cannot be observed. Every quantized module must run in each "
            "training or calibration step: exclude the modules that the forward skips (`exclude=[...]`)."
        )
    if not quantizers:  # dynamic activations only: nothing is observed
        return torch.zeros(0)
    ranges = torch.stack([v for q in quantizers.values() for v in q.batch_range])
    ranges[0::2].neg_()
    for quantizer in quantizers.values():
        quantizer.batch_range = None
    return ranges


def flag_nonfinite(ranges: Tensor) -> Tensor:
    """Append a flag (1.0 if any range is NaN/inf, else 0.0) and zero the non-finite entries.

    The result can be all-reduced with ``max`` in one call: every rank then learns whether any rank saw a
    non-finite batch, and skips the update together.
    """
    finite = torch.isfinite(ranges)
    flag = (~finite.all()).to(ranges.dtype).reshape(1)
    return torch.cat([torch.where(finite, ranges, torch.zeros_like(ranges)), flag])


def update_ranges(quantizers: Sequence[ActivationFakeQuant], ranges: Tensor, averaging_constant: float | None) -> None:
    """Feed ranges made by :func:`observed_ranges` (and reduced over ranks) back into the quantizers."""
    pairs = ranges.view(-1, 2)
    update_many(list(quantizers), -pairs[:, 0], pairs[:, 1], averaging_constant)


def quantizer_state(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The fake-quant state of every quantizer, as tensors on CPU (for checkpoints)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationFakeQuant | WeightFakeQuant):
            state[name] = {key: buffer.detach().cpu().clone() for key, buffer in module.named_buffers(recurse=False)}
    return state


def load_quantizer_state_(model: nn.Module, state: dict[str, dict[str, Tensor]]) -> None:
    """Load :func:`quantizer_state` output into a prepared model; refuse another model's state."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, ActivationFakeQuant | WeightFakeQuant)}
    if set(state) != set(modules):
        raise ValueError(
            "The checkpoint's quantization state belongs to another model or selection: it has quantizers "
            f"{sorted(set(state) - set(modules))[:5]} that this model lacks, and lacks "
            f"{sorted(set(modules) - set(state))[:5]}."
        )
    for name, module in modules.items():
        for key, buffer in module.named_buffers(recurse=False):
            saved = state[name][key]
            if saved.shape != buffer.shape:
                raise ValueError(
                    f"The checkpoint's quantization state for {name}.{key} has shape {tuple(saved.shape)}, this "
                    f"model's has {tuple(buffer.shape)}"
                )
            buffer.copy_(saved)
        if isinstance(module, ActivationFakeQuant):
            module.calibrated = bool(module.initialized)


def update_ranges_over_ranks(
    quantizers: Mapping[str, ActivationFakeQuant], reduce: Callable[..., Tensor] | None
) -> bool:
    """This step's ranges, reduced over ranks with ``reduce`` (max), into the running ranges (QAT's moving average).

    Returns:
        ``False`` when some rank saw a NaN/inf activation: the batch is skipped so that it cannot poison the ranges.
    """
    ranges = flag_nonfinite(observed_ranges(quantizers))
    if reduce is not None:
        ranges = reduce(ranges, reduce_op="max")
    if ranges[-1] > 0:
        return False
    update_ranges(list(quantizers.values()), ranges[:-1], averaging_constant=0.01)
    return True

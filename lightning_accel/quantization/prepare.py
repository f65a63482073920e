"""Preparing a model for int8 fake quantization in place, without renaming or replacing any parameter.

Each selected ``nn.Linear``/``nn.Conv1d/2d/3d`` becomes its quantized subclass (same parameters, same names) with
three child modules: ``input_quant`` (uint8 activations), ``weight_quant`` (int8 per-channel weights) and
``output_quant``. A conv directly followed by a BatchNorm is trained with the BatchNorm folded into its weight, so
the int8 weights the runtime sees are the ones that were trained; the BatchNorm then carries ``output_quant``.
The model's ``forward`` is untouched, so keyword and multiple inputs keep working.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel._modules import describe_selection, select_modules
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant, update_many

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Quantized:
    """Forward of a fake-quantized Linear or Conv; mixed into a subclass of the original class."""

    input_quant: ActivationFakeQuant
    weight_quant: WeightFakeQuant
    output_quant: ActivationFakeQuant | None
    # The BatchNorm folded into this module, held outside ``_modules`` so that it is not registered twice.
    folded_bn: nn.Module | None
    _fold_check: Tensor | None

    @property
    def quantizing(self) -> bool:
        """Whether fake quantization or observation is on (otherwise the module runs as plain float)."""
        return self.weight_quant.fake_quant or self.input_quant.observe

    def folded_weight_and_factor(self) -> tuple[Tensor, Tensor | None]:
        """The weight as the runtime will see it (BatchNorm folded in), and the per-channel fold factor."""
        bn = self.folded_bn
        if bn is None:
            return self.weight, None
        # The factor is a constant for autograd: without quantization its two uses (scaling the weight, unscaling
        # the output) cancel, so gamma's gradient comes through the BatchNorm alone, as in the float model; and
        # the backward pass skips two reductions.
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        return self.weight * factor.reshape(-1, *([1] * (self.weight.dim() - 1))), factor

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizing:  # float phase: exactly the original module, at its original cost
            return super().forward(x)
        x = self.input_quant(x)
        weight, factor = self.folded_weight_and_factor()
        weight = self.weight_quant(weight)
        if factor is None:
            y = self._apply_weight(x, weight, self.bias)
            return self.output_quant(y) if self.output_quant is not None else y
        # Folded: convolve with the (quantized) folded weight, then undo the fold factor so that the BatchNorm
        # that follows sees the conv output it expects (Krishnamoorthi 2018, section 3.2).
        shape = (1, -1, *([1] * (x.dim() - 2)))
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        y = self._apply_weight(x, weight, None) / safe_factor.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        if self._fold_check is None and not getattr(self, "_fold_verified", False):
            self._fold_check = y
        return y


class QuantizedLinear(_Quantized, nn.Linear):
    """``nn.Linear`` with fake-quantized input, weight and output."""

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class QuantizedConv1d(_Quantized, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input, weight and output."""

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


class QuantizedConv2d(_Quantized, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input, weight and output."""

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


class QuantizedConv3d(_Quantized, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized input, weight and output."""

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


QUANTIZED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
}


def _quantize_bn_output(bn: nn.Module, args: Any, output: Tensor) -> Tensor:
    return bn.output_quant(output)


def _check_bn_input(bn: nn.Module, args: tuple[Tensor, ...]) -> None:
    """On the first forward, make sure the folded BatchNorm really receives its conv's output."""
    conv = bn.folded_into
    if getattr(conv, "_fold_verified", False) or not conv.quantizing:
        return
    if conv._fold_check is None or args[0] is not conv._fold_check:
        raise RuntimeError(
            f"fold_bn: the BatchNorm {bn.folded_name!r} does not directly follow the conv {conv.folded_name!r} in "
            "forward, so it cannot be folded into it. Use fold_bn=False, or exclude the conv."
        )
    conv._fold_verified = True
    conv._fold_check = None


def is_prepared(model: nn.Module) -> bool:
    """Return whether ``model`` holds fake-quantized modules."""
    return any(isinstance(m, _Quantized) for m in model.modules())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fake-quantized modules by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Quantized)}


def activation_quantizers(model: nn.Module) -> dict[str, ActivationFakeQuant]:
    """Activation fake-quantizers by name (``<module>.input_quant`` / ``<module>.output_quant``), in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationFakeQuant)}


def _conv_bn_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Convs immediately followed, in registration order, by a BatchNorm of matching width."""
    entries = list(model.named_modules())
    pairs = {}
    for (name, module), (next_name, following) in itertools.pairwise(entries):
        if (
            type(module) in _CONVS
            and isinstance(following, _BATCH_NORMS)
            and following.num_features == module.out_channels
            and following.track_running_stats
        ):
            pairs[name] = (next_name, following)
    return pairs


def prepare_qat_(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    fold_bn: bool = True,
) -> dict[str, nn.Module]:
    """Prepare ``model`` in place for int8 fake quantization (static W8A8).

    Parameters keep their identity and names; the fake-quant state lives in non-persistent buffers of new child
    modules, so ``model.state_dict()`` is unchanged. Quantization starts switched off: see :func:`set_qat_phase`.

    Args:
        model: The model to prepare.
        include: Glob patterns over module names to quantize; ``None`` selects every ``nn.Linear`` and
            ``nn.Conv1d/2d/3d``.
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold a BatchNorm that directly follows a conv into the conv's quantized weight.

    Returns:
        The prepared modules by name.

    Raises:
        ValueError: when the patterns select no module.
    """
    if is_prepared(model):
        return quantized_modules(model)
    pairs = _conv_bn_pairs(model) if fold_bn else {}
    selected = {
        name: module
        for name, module in select_modules(model, include, exclude).items()
        if type(module) in QUANTIZED_CLASSES  # subclasses keep their own forward; quantize exact types only
    }
    if not selected:
        raise ValueError(
            f"QuantizationAwareTraining selected no nn.Linear/nn.Conv module of {type(model).__name__} with "
            f"{describe_selection(include, exclude)}"
        )
    for name, module in selected.items():
        module.__class__ = QUANTIZED_CLASSES[type(module)]
        module.input_quant = ActivationFakeQuant()
        module.weight_quant = WeightFakeQuant(module.weight.shape[0])
        module.folded_name = name
        module._fold_check = None
        bn_name, bn = pairs.get(name, (None, None))
        if bn is None:
            module.output_quant = ActivationFakeQuant()
            object.__setattr__(module, "folded_bn", None)
            continue
        module.output_quant = None
        object.__setattr__(module, "folded_bn", bn)
        bn.output_quant = ActivationFakeQuant()
        bn.folded_name = bn_name
        object.__setattr__(bn, "folded_into", module)
        bn.register_forward_pre_hook(_check_bn_input)
        bn.register_forward_hook(_quantize_bn_output)
    device = next(model.parameters()).device
    model.to(device)  # the new buffers follow the parameters
    return selected


def set_qat_phase(model: nn.Module, fake_quant: bool, observe: bool) -> None:
    """Switch fake quantization and observation on or off for every quantizer in ``model``."""
    for module in model.modules():
        if isinstance(module, ActivationFakeQuant | WeightFakeQuant):
            module.fake_quant = fake_quant
            module.observe = observe


def observed_ranges(quantizers: Iterable[ActivationFakeQuant]) -> Tensor:
    """Stack the latest batch ranges as one tensor ``[-min_0, max_0, -min_1, max_1, ...]`` for one all-reduce(max)."""
    missing = [q for q in quantizers if q.batch_range is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} activation quantizer(s) saw no data this step; every quantized module must run in "
            "each training step (exclude modules that are skipped)"
        )
    ranges = torch.stack([v for q in quantizers for v in q.batch_range])
    ranges[0::2].neg_()
    return ranges


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


def iter_batch_norms(model: nn.Module) -> Iterator[nn.Module]:
    """Every BatchNorm module of ``model``."""
    return (m for m in model.modules() if isinstance(m, _BATCH_NORMS))

"""The fake-quantized layers: each selected Linear/Conv becomes a subclass of its own class with quantizer children.

Same parameters, same names; the forward fake-quantizes the input, the weight (a folded BatchNorm included) and,
where placed, the output. A layer followed by a ReLU module is quantized after the ReLU, through forward hooks on
the ReLU (and likewise after a folded BatchNorm), so ONNX Runtime absorbs the ReLU into its int8 kernel.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel._core.modules import is_transposed_linear
from lightning_accel.quantization.dynamic import DynamicActivationFakeQuant, dynamic_linear_for_export, is_dynamic
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant, quantize_bias


class _Quantized:
    """Forward of a fake-quantized Linear or Conv; mixed into a subclass of the original class."""

    input_quant: ActivationFakeQuant | DynamicActivationFakeQuant
    weight_quant: WeightFakeQuant
    output_quant: ActivationFakeQuant | None
    # The BatchNorm folded into this module, held outside ``_modules`` so that it is not registered twice.
    folded_bn: nn.Module | None
    _fold_check: Tensor | None

    @property
    def quantizing(self) -> bool:
        """Whether fake quantization or observation is on (otherwise the module runs as plain float)."""
        return self.weight_quant.fake_quant or self.input_quant.observe

    def weight_rows(self) -> Tensor:
        """The weight with output channels first (``[out, in, ...]``), as the weight quantizer scales it."""
        return self.weight

    def stored_layout(self, rows: Tensor) -> Tensor:
        """``rows`` (output channels first) in the layout this module stores its weight in."""
        return rows

    def folded_weight_and_factor(self) -> tuple[Tensor, Tensor | None]:
        """The weight as the runtime will see it (BatchNorm folded in), and the per-channel fold factor."""
        bn = self.folded_bn
        if bn is None:
            return self.weight_rows(), None
        # The factor is a constant for autograd: without quantization its two uses (scaling the weight, unscaling
        # the output) cancel, so gamma's gradient comes through the BatchNorm alone, as in the float model; and
        # the backward pass skips two reductions.
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        return self.weight * factor.reshape(-1, *([1] * (self.weight.dim() - 1))), factor

    def models_bias_rounding(self) -> bool:
        """Whether the bias is rounded to the runtime's int32 grid here (needs a calibrated input scale).

        Not in the deployable copy (``export_constants``): ``to_deployable`` stored the rounded bias already, so
        that the exported graph holds it as a plain constant.
        """
        weight_quant, input_quant = self.weight_quant, self.input_quant
        return (
            not is_dynamic(self)  # a dynamic layer adds its bias in float, after the integer product
            and weight_quant.fake_quant
            and not weight_quant.export_constants
            and input_quant.fake_quant
            and input_quant.calibrated
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizing:  # float phase: exactly the original module, at its original cost
            y = super().forward(x)
            if self.folded_bn is not None and not getattr(self, "_fold_verified", False):
                self._fold_check = y  # lets the BatchNorm check its pairing on the very first forward
            _remember_output(self, y)
            return y
        if not self.training and torch.is_autocast_enabled(x.device.type):
            # Evaluation scores the int8 model as deployed, and the deployed graph computes in float32: bf16
            # autocast here measured 99.63% agreement / 29.6 dB against ONNX Runtime, fp32 100% / 35.0 dB.
            with torch.autocast(x.device.type, enabled=False):
                return self._quantized_forward(x.float())
        return self._quantized_forward(x)

    def _quantized_forward(self, x: Tensor) -> Tensor:
        if self.weight_quant.export_constants and is_dynamic(self):
            return dynamic_linear_for_export(self, x)  # the ONNX integer ops, computing what the lines below do
        x = self.input_quant(x)
        weight, factor = self.folded_weight_and_factor()
        weight = self.weight_quant(weight)
        if factor is None:
            bias = self.bias
            if bias is not None and self.models_bias_rounding():
                bias = quantize_bias(bias, self.input_quant.scale, self.weight_quant.scale)
            y = self._apply_weight(x, weight, bias)
            _remember_output(self, y)
            return y if self.output_quant is None or _quantized_after_relu(self) else self.output_quant(y)
        # Folded: convolve with the (quantized) folded weight, then undo the fold factor so that the BatchNorm
        # that follows sees the conv output it expects (Krishnamoorthi 2018, section 3.2).
        shape = (1, -1, *([1] * (x.dim() - 2)))
        safe_factor = torch.where(factor == 0, torch.ones_like(factor), factor).reshape(shape)
        y = self._apply_weight(x, weight, None)
        bn = self.folded_bn
        if not (bn.training or bn.running_mean is None) and self.models_bias_rounding():
            # The BatchNorm normalises with its running statistics, so the deployed conv is exactly
            # ``conv(x, w_folded) + b_folded`` with the folded bias on the runtime's int32 grid. Hand the BatchNorm
            # the input that makes its output exactly that.
            beta = bn.bias if bn.bias is not None else torch.zeros_like(factor)
            folded_bias = quantize_bias(self.folded_bias(factor), self.input_quant.scale, self.weight_quant.scale)
            y = (y + (folded_bias - beta).reshape(shape)) / safe_factor + bn.running_mean.reshape(shape)
        else:
            y = y / safe_factor
            if self.bias is not None:
                y = y + self.bias.reshape(shape)
        if self._fold_check is None and not getattr(self, "_fold_verified", False):
            self._fold_check = y
        return y

    def folded_bias(self, factor: Tensor) -> Tensor:
        """The bias of the conv with its BatchNorm folded in: ``(b - mean) * factor + beta``."""
        bn = self.folded_bn
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(factor)
        return (bias - bn.running_mean) * factor + beta


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


class _QuantizedTransposedLinear(_Quantized):
    """A transposed Linear (GPT-2's ``Conv1D``: ``x @ weight + bias``, weight stored ``in x out``), fake-quantized.

    Mixed into a subclass of the module's own class. The weight is quantized per output channel like a Linear's
    (its columns here), and the layer computes ``F.linear`` with the transposed view: the same product, which the
    export writes as the int8 MatMul ONNX Runtime fuses, so every GPT-2 projection runs an int8 kernel.
    """

    def weight_rows(self) -> Tensor:
        return self.weight.t()

    def stored_layout(self, rows: Tensor) -> Tensor:
        return rows.t().contiguous()

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


QUANTIZED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
}


_QUANTIZED_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def quantizable_base(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class whose computation ``module`` performs, or ``None`` if it computes something else.

    A subclass that keeps its base's ``forward`` (a Linear subclass that only adds attributes or methods) computes
    exactly the base layer and is quantized like it; one that overrides ``forward`` is left in float, because the
    quantized forward would replace what it does.
    """
    for base in QUANTIZED_CLASSES:
        if isinstance(module, base) and type(module).forward is base.forward:
            return base
    if isinstance(module, _QuantizedTransposedLinear):
        return plain_class(module)
    if is_transposed_linear(module):  # decided from what it computes (contract 12), whatever its class
        return type(module)
    return None


def computes_linear(module: nn.Module) -> bool:
    """Whether a (prepared or plain) module computes a Linear: ``nn.Linear`` or a transposed Linear (``Conv1D``)."""
    return isinstance(module, nn.Linear | _QuantizedTransposedLinear) or (
        not isinstance(module, _Quantized) and is_transposed_linear(module)
    )


def _quantized_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The quantized class for ``cls``: ours for torch's own layers, a cached mixin for a subclass of them."""
    if cls in QUANTIZED_CLASSES:
        return QUANTIZED_CLASSES[cls]
    if cls not in _QUANTIZED_SUBCLASSES:
        torch_base = next((b for b in QUANTIZED_CLASSES if issubclass(cls, b)), None)
        # A class that is no torch layer was selected because it computes a transposed Linear.
        base = QUANTIZED_CLASSES[torch_base] if torch_base is not None else _QuantizedTransposedLinear
        _QUANTIZED_SUBCLASSES[cls] = type(f"Quantized{cls.__name__}", (base, cls), {"_plain_class": cls})
    return _QUANTIZED_SUBCLASSES[cls]


def plain_class(module: nn.Module) -> type[nn.Module]:
    """The class a fake-quantized module had before :func:`prepare_qat_`."""
    cls = type(module)
    return getattr(cls, "_plain_class", None) or next(b for b in cls.__bases__ if not issubclass(b, _Quantized))


def _quantize_bn_output(bn: nn.Module, args: Any, output: Tensor) -> Tensor:
    _remember_output(bn, output)
    return output if _quantized_after_relu(bn) else bn.output_quant(output)


def _quantized_after_relu(owner: nn.Module) -> bool:
    return getattr(owner, "relu_after", None) is not None


def _remember_output(owner: nn.Module, output: Tensor) -> None:
    if getattr(owner, "relu_after", None) is not None:
        owner._relu_check = weakref.ref(output)


def _check_relu_input(relu: nn.Module, args: tuple[Any, ...]) -> None:
    """First forward: confirm that the ReLU receives its layer's output, or give the quantizer back to the layer."""
    owner = relu.quantizes_for
    if owner is None or relu.relu_verified:
        return
    remembered = getattr(owner, "_relu_check", None)
    if remembered is None or not args or args[0] is not remembered():
        object.__setattr__(owner, "relu_after", None)  # not the layer's ReLU: quantize at the layer as before
        object.__setattr__(relu, "quantizes_for", None)
    relu.relu_verified = True


def _quantize_relu_output(relu: nn.Module, args: Any, output: Tensor) -> Tensor:
    # A ReLU module reused elsewhere in forward (one ``self.relu`` for a whole ResNet block) passes other inputs
    # through: only the call on its layer's output carries that layer's quantizer.
    owner = relu.quantizes_for
    if owner is None or not args or owner._relu_check is None or args[0] is not owner._relu_check():
        return output
    return owner.output_quant(output)


def _relu_followers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules immediately followed, in registration order, by an ``nn.ReLU`` module."""
    return {
        name: following
        for (name, _), (_, following) in itertools.pairwise(model.named_modules())
        if type(following) is nn.ReLU
    }


def _quantize_after_relu(owner: nn.Module, relu: nn.Module) -> None:
    object.__setattr__(owner, "relu_after", relu)
    owner._relu_check = None
    object.__setattr__(relu, "quantizes_for", owner)
    relu.relu_verified = False
    relu.register_forward_pre_hook(_check_relu_input)
    relu.register_forward_hook(_quantize_relu_output)


def _check_bn_input(bn: nn.Module, args: tuple[Tensor, ...]) -> None:
    """On the first forward, make sure the folded BatchNorm really receives its conv's output."""
    conv = bn.folded_into
    if getattr(conv, "_fold_verified", False):
        return
    if conv._fold_check is None or args[0] is not conv._fold_check:
        raise RuntimeError(
            f"fold_bn: the BatchNorm {bn.folded_name!r} does not directly follow the conv {conv.folded_name!r} in "
            "forward, so it cannot be folded into it. Use fold_bn=False, or exclude the conv."
        )
    conv._fold_verified = True
    conv._fold_check = None

"""Dynamic int8 activations: each Linear input is quantized with a scale computed from that input at run time.

This is the scheme ONNX Runtime's ``quantize_dynamic`` and torchao use for Linear-heavy models (transformers): no
activation range is observed or stored, so nothing is calibrated and no range can be out of date, and every Linear
output stays float. The export is standard ONNX, ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add``,
which ONNX Runtime fuses into ``DynamicQuantizeMatMul`` (or ``MatMulIntegerToFloat`` where several layers read one
input), the kernels ``quantize_dynamic`` produces.

The scale and zero point are computed exactly as ``DynamicQuantizeLinear`` specifies and ONNX Runtime implements
it: over the whole input tensor, so they depend on every sample of the batch (and on padding tokens). The PyTorch
model and the runtime compute the same integers for the same batch; the export check therefore runs the very same
batches in both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel.quantization.fake_quant import ACTIVATION_QMAX, ACTIVATION_QMIN

#: The activation schemes: ``static`` (ranges observed in training or calibration, stored in the file) or
#: ``dynamic`` (computed from each input at run time, Linear layers only).
ACTIVATIONS_CHOICES = ("static", "dynamic")
DEFAULT_ACTIVATIONS = "static"


def validate_activations(activations: object) -> None:
    """Raise ``ValueError`` naming ``activations`` unless it is ``"static"`` or ``"dynamic"``."""
    if activations not in ACTIVATIONS_CHOICES:
        raise ValueError(
            f"`activations` must be one of {list(ACTIVATIONS_CHOICES)} ('static': ranges observed in training or "
            f"calibration; 'dynamic': per-tensor uint8 scale computed from each input at run time), got {activations!r}"
        )


def dynamic_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``DynamicQuantizeLinear`` for ``x``: ``[min(x, 0), max(x, 0)]`` onto ``[0, 255]``.

    As ONNX Runtime computes them: ``scale = (max - min) / 255`` (1 when the tensor is all zeros) and
    ``zero_point = round_half_even(clamp(-min / scale, 0, 255))``, in float32.
    """
    low, high = torch.aminmax(x.detach())
    low, high = torch.clamp(low.float(), max=0.0), torch.clamp(high.float(), min=0.0)
    span = high - low
    scale = torch.where(span == 0, torch.ones_like(span), span / (ACTIVATION_QMAX - ACTIVATION_QMIN))
    zero_point = torch.round(torch.clamp(ACTIVATION_QMIN - low / scale, ACTIVATION_QMIN, ACTIVATION_QMAX))
    return scale, zero_point


class _DynamicFakeQuantize(torch.autograd.Function):
    """``(clamp(round(x / s) + zp, 0, 255) - zp) * s`` with the straight-through gradient.

    The range covers the whole tensor, so nothing is clipped and the gradient passes unchanged. Division (not a
    multiplication by the reciprocal) because that is what the runtime rounds.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        # One new tensor, the rest in place: six new activation-sized tensors cost 40x more on a CPU (page faults).
        integers = torch.div(x, scale).round_().add_(zero_point).clamp_(ACTIVATION_QMIN, ACTIVATION_QMAX)
        return integers.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class DynamicActivationFakeQuant(nn.Module):
    """Fake-quantizes its input to uint8 with a scale computed from that very input (no state, nothing observed).

    It has the switches of the static quantizer (``fake_quant``, ``observe``, ``export_constants``) so that the
    callbacks' phases apply alike; ``observe`` changes nothing here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fake_quant = False
        self.observe = False
        self.export_constants = False

    @property
    def calibrated(self) -> bool:
        """Always: a dynamic scale needs no observed range."""
        return True

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` per tensor at its own range (while fake quantization is on)."""
        if not self.fake_quant:
            return x
        source = x if x.dtype == torch.float32 else x.float()
        scale, zero_point = dynamic_qparams(source)
        quantized = _DynamicFakeQuantize.apply(source, scale, zero_point)
        return quantized if quantized.dtype == x.dtype else quantized.to(x.dtype)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        return f"dynamic, fake_quant={self.fake_quant}"


def is_dynamic(module: nn.Module) -> bool:
    """Whether a quantized layer quantizes its input dynamically."""
    return isinstance(getattr(module, "input_quant", None), DynamicActivationFakeQuant)


class _DynamicLinearExport(torch.autograd.Function):
    """The deployable dynamic Linear: computes what the fake-quant layer computes, exports as ONNX integer ops.

    ``weight_t`` holds the int8 weight transposed (``in x out``, as ``MatMulInteger`` takes it), with one scale and
    a zero zero-point per output column.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight_t: Tensor, weight_scale: Tensor, weight_zero: Tensor, bias: Tensor
    ) -> Tensor:
        # The very ops of the fake-quant layer (same values, same order), so that this copy computes bit for bit
        # what was evaluated: with dynamic scales a last-bit difference can move a tensor's maximum, and so
        # every value's rounding in the layers after it.
        scale, zero_point = dynamic_qparams(x)
        inputs = _DynamicFakeQuantize.apply(x, scale, zero_point)
        weight = (weight_t.float() * weight_scale).t()
        return F.linear(inputs, weight, bias)

    @staticmethod
    def symbolic(g: Any, x: Any, weight_t: Any, weight_scale: Any, weight_zero: Any, bias: Any) -> Any:
        # The pattern ONNX Runtime fuses (MatMulIntegerToFloat, then DynamicQuantizeMatMul); TensorRT and other
        # runtimes read the standard ops.
        x_q, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        accumulator = g.op("MatMulInteger", x_q, weight_t, x_zero, weight_zero)
        as_float = g.op("Cast", accumulator, to_i=1)  # 1: FLOAT
        product = g.op("Mul", as_float, g.op("Mul", x_scale, weight_scale))
        return g.op("Add", product, bias)


def store_dynamic_weights_(module: nn.Module) -> None:
    """Give a deployable dynamic Linear the int8 buffers its export reads (its weight is already on the grid)."""
    scale = module.weight_quant.scale.detach().float()
    integers = torch.round(module.weight_rows().detach().float() / scale[:, None]).to(torch.int8)
    module.register_buffer("weight_int8_t", integers.t().contiguous(), persistent=False)
    # Symmetric weights: one zero zero-point for every column (the per-column scales are applied after the product).
    module.register_buffer("weight_zero_int8", torch.zeros((), dtype=torch.int8), persistent=False)


def dynamic_linear_for_export(module: nn.Module, x: Tensor) -> Tensor:
    """The deployable dynamic Linear's forward (after :func:`store_dynamic_weights_`)."""
    bias = module.bias if module.bias is not None else torch.zeros_like(module.weight_quant.scale)
    return _DynamicLinearExport.apply(
        x.float(), module.weight_int8_t, module.weight_quant.scale, module.weight_zero_int8, bias.detach().float()
    )


def has_dynamic_layers(model: nn.Module) -> bool:
    """Whether any layer of ``model`` quantizes its input dynamically."""
    return any(is_dynamic(m) for m in model.modules())

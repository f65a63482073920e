"""Fake-quantization modules built on core ATen ops: per-tensor uint8 activations, per-channel int8 weights.

Their buffers are non-persistent: they never enter the model's ``state_dict``, so checkpoints keep loading into
the plain model. The QAT callback saves and restores them as its own state instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: Activations: unsigned 8-bit, per-tensor affine. Weights: signed integers, symmetric per output channel.
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
#: The int8 storage range of weights in the ONNX file (the values themselves stay within +-weight_qmax(bits)).
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
#: Default weight width. ONNX Runtime's U8S8 kernels on x86 without VNNI (AVX2, AVX-512F) add each pair of
#: neighbouring u8 x s8 products into a saturating int16: 2 * 255 * 63 = 32,130 never clips, 2 * 255 * 127 does.
#: With 7-bit weights the runtime computes exactly the integers that were trained, on every CPU.
DEFAULT_WEIGHT_BITS = 7
WEIGHT_BITS_CHOICES = (7, 8)
#: Bias is stored as int32 at scale ``input_scale * weight_scale``, as the runtime's integer kernels add it.
BIAS_QMIN, BIAS_QMAX = -(2**31), 2**31 - 1
#: Weight of the newest batch in the moving-average min/max observer (as in PyTorch's MovingAverageMinMax).
AVERAGING_CONSTANT = 0.01
_EPS = torch.finfo(torch.float32).eps


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class _CompositeFakeQuantize(torch.autograd.Function):
    """Fake quantization from elementwise ops, with the straight-through gradient (zero where clipped).

    Numerically the same as ATen's fake-quant kernels, which on CPU run about 5x slower than these few vectorised
    ops (measured here: 1.4 ms against 0.3 ms for a 64x64x8x8 activation), and that made a QAT step cost 1.8x an
    fp32 step. ATen's kernels are used on GPUs and for ONNX export.

    One new float tensor in the forward, one in the backward, everything else in place: on CPUs every new large
    tensor is fresh pages from the OS, and page faults, not arithmetic, dominated (an 8x128x3072 activation: 18.4 ms
    with a clamped copy, an equality mask and a bool-times-float gradient; 3.4 ms this way).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
        levels = torch.mul(x, torch.reciprocal(scale)).round_()  # the one new tensor
        if zero_point is not None:  # symmetric weights have none: two passes saved
            levels.add_(zero_point)
        clipped = torch.lt(levels, qmin)
        torch.logical_or(clipped, torch.gt(levels, qmax), out=clipped)
        ctx.save_for_backward(clipped)
        levels.clamp_(qmin, qmax)
        if zero_point is not None:
            levels.sub_(zero_point)
        return levels.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (clipped,) = ctx.saved_tensors
        return torch.where(clipped, 0.0, grad), None, None, None, None


class _RoundToScale(torch.autograd.Function):
    """``round(w / s) * s`` for a weight whose scale was just computed from it: nothing can clip.

    ``s = max|w| / qmax`` puts every value within ``qmax`` levels, so the clamp and the clip mask of
    :class:`_CompositeFakeQuantize` are no-ops and the straight-through gradient is the gradient itself. Observing
    weights (every QAT step until observers freeze) skips both, and a mask the size of the weight per layer.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, scale: Tensor) -> Tensor:
        return torch.mul(weight, torch.reciprocal(scale)).round_().mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Fake-quantize ``x`` per tensor (``axis=None``) or per channel along ``axis``, in float32.

    Args:
        x: The tensor.
        scale: Scale, a 0-d tensor or one value per channel.
        zero_point: Integer zero point, shaped like ``scale``.
        qmin: Smallest integer level.
        qmax: Largest integer level.
        axis: Channel axis for per-channel quantization.
    """
    x = _as_float32(x)
    if x.is_cuda:
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    symmetric = axis is not None and qmin < 0 and not zero_point.any()
    return _CompositeFakeQuantize.apply(x, scale, None if symmetric else zero_point.to(x.dtype), qmin, qmax)


def symmetric_fake_quantize(weight: Tensor, scale: Tensor, qmax: int, scale_from_weight: bool = False) -> Tensor:
    """Fake-quantize ``weight`` to ``[-qmax, qmax]`` with one scale per output channel (dimension 0), in float32.

    Weights are symmetric by construction, so unlike :func:`fake_quantize` this never asks the zero point whether
    it is zero: that question is a host sync per layer and step, and under ``torch.compile`` a graph break.

    Args:
        weight: The weight, output channels first.
        scale: One scale per output channel.
        qmax: Largest integer level.
        scale_from_weight: Whether ``scale`` is :func:`symmetric_weight_scale` of this very ``weight`` (observing):
            then nothing clips, and the clamp and its gradient mask are skipped. Same values either way.
    """
    weight = _as_float32(weight)
    if weight.is_cuda:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -qmax, qmax)
    shape = [-1] + [1] * (weight.dim() - 1)
    if scale_from_weight:
        return _RoundToScale.apply(weight, scale.reshape(shape))
    return _CompositeFakeQuantize.apply(weight, scale.reshape(shape), None, -qmax, qmax)


def affine_qparams(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[min(low, 0), max(high, 0)]`` onto ``[0, 255]``; zero is exact."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN), min=_EPS)
    zero_point = torch.clamp(ACTIVATION_QMIN - torch.round(low / scale), ACTIVATION_QMIN, ACTIVATION_QMAX)
    return scale.float(), zero_point.to(torch.int32)


def weight_qmax(bits: int) -> int:
    """Largest weight integer for ``bits``-bit symmetric weights: 63 for 7 bits, 127 for 8 bits."""
    return 2 ** (bits - 1) - 1


def symmetric_weight_scale(weight: Tensor, qmax: int = weight_qmax(DEFAULT_WEIGHT_BITS)) -> Tensor:
    """Per-output-channel scale ``max|w| / qmax`` (dimension 0 is the output channel)."""
    # max(-min, max) from one pass: |w| would be a new tensor the size of the weight, every step.
    low, high = torch.aminmax(weight.detach().flatten(1), dim=1) if weight.dim() > 1 else torch.aminmax(weight.detach())
    absmax = torch.maximum(-low, high)
    return torch.clamp(absmax.float() / qmax, min=_EPS)


def quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """Round ``bias`` to the int32 grid at scale ``input_scale * weight_scale``, as int8 runtimes store it.

    ONNX Runtime (and TensorRT) add the bias inside the integer accumulator, so a float bias becomes
    ``round(b / (s_x * s_w))`` int32 steps. Modelling that here is what makes the PyTorch model and the runtime
    agree exactly rather than to 99%. The gradient passes straight through.
    """
    scale = (input_scale.float() * weight_scale.float()).clamp_min(_EPS)
    if bias.is_cuda:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        quantized = fake_quantize(bias, scale, zero_point, BIAS_QMIN, BIAS_QMAX, axis=0 if scale.dim() else None)
    else:
        # A bias is a vector, and int32 never clips it: round and rescale, with the straight-through gradient.
        # (Three small ops; the general fake_quantize path would add a host sync per layer and step.)
        # ``exact - exact.detach()`` is exactly zero, so the value is the rounded bias bit for bit.
        exact = _as_float32(bias)
        rounded = torch.round(exact.detach() * torch.reciprocal(scale)) * scale
        quantized = rounded + (exact - exact.detach())
    return quantized if quantized.dtype == bias.dtype else quantized.to(bias.dtype)


#: Marks a tensor with the quantizer that produced it (only while observing); see ``ActivationFakeQuant.follows``.
_PRODUCED_BY = "_lightning_accel_quantized_by"
_UNDECIDED = "undecided"  # a string: copies and pickles (deepcopy, ddp_spawn) keep it equal


def followed_quantizer(quantizer: Any) -> Any:
    """The quantizer whose output ``quantizer`` always receives, or ``None``."""
    source = getattr(quantizer, "follows", None)
    return None if isinstance(source, str) else source


class _Float32State(nn.Module):
    """Keeps floating-point buffers in float32 when the model is cast (``bf16-true``, ``16-true``, ``64-true``).

    Ranges and scales in half precision would lose the resolution that quantization parameters need, and ATen's
    fake-quant kernels and the ONNX exporter expect float32 scales. Device moves still apply.
    """

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        def keep_dtype(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)


@torch.no_grad()
def update_many(
    quantizers: list[ActivationFakeQuant], batch_min: Tensor, batch_max: Tensor, averaging_constant: float | None
) -> None:
    """:meth:`ActivationFakeQuant.update` for many quantizers at once: a few vectorised ops instead of ~20 each."""
    if not quantizers:
        return
    fresh = torch.tensor([not q.calibrated for q in quantizers], device=batch_min.device)
    running_min = torch.stack([q.running_min for q in quantizers])
    running_max = torch.stack([q.running_max for q in quantizers])
    if averaging_constant is None:
        new_min, new_max = torch.minimum(running_min, batch_min), torch.maximum(running_max, batch_max)
    else:
        new_min = running_min + averaging_constant * (batch_min - running_min)
        new_max = running_max + averaging_constant * (batch_max - running_max)
    new_min, new_max = torch.where(fresh, batch_min, new_min), torch.where(fresh, batch_max, new_max)
    scale, zero_point = affine_qparams(new_min, new_max)
    for i, q in enumerate(quantizers):
        q.running_min.copy_(new_min[i])
        q.running_max.copy_(new_max[i])
        q.scale.copy_(scale[i])
        q.zero_point.copy_(zero_point[i])
        q.calibrated = True
    for q in quantizers:
        q.initialized.fill_(True)
    for q in quantizers:
        source = followed_quantizer(q)
        if source is not None and source.calibrated:  # one tensor, one scale: nothing for the runtime to requantize
            for name in ("running_min", "running_max", "scale", "zero_point"):
                getattr(q, name).copy_(getattr(source, name))


class ActivationFakeQuant(_Float32State):
    """Observes a tensor's range and fake-quantizes it to uint8, per tensor.

    Observation only records the current step's min/max (``batch_range``), over every call of the step: a layer
    that runs several times per forward (shared layers, unrolled recurrence) gets a range that covers all of its
    calls. The running range and the quantization parameters change only in :func:`update_many`, which the
    callback calls with statistics already reduced across ranks. So every rank quantizes with the same parameters
    at every step.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("running_min", "running_max", "scale"):
            self.register_buffer(name, torch.zeros(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool), persistent=False)
        self.observe = False
        self.fake_quant = False
        # Python mirror of ``initialized``: reading the buffer on every forward would sync a GPU.
        self.calibrated = False
        # For ONNX export: scale and zero point as constants, so the exporter writes plain QuantizeLinear nodes.
        self.export_constants = False
        self.batch_range: tuple[Tensor, Tensor] | None = None
        # The quantizer whose output this one always receives (a block's output quantizer feeding the next layer's
        # input quantizer), found while observing; ``update_ranges`` then gives both one scale, so the tensor is
        # quantized once and the runtime has nothing to requantize. Held outside ``_modules`` (not a child).
        object.__setattr__(self, "follows", _UNDECIDED)
        self.is_input = False  # set by prepare_qat_ for a layer's input quantizer

    def _note_source(self, x: Tensor) -> None:
        """Remember which quantizer produced ``x``; a second, different source means there is none to follow."""
        source = getattr(x, _PRODUCED_BY, None)
        if source is self:
            return
        if isinstance(self.follows, str):
            object.__setattr__(self, "follows", source)
        elif self.follows is not source:
            object.__setattr__(self, "follows", None)

    def forward(self, x: Tensor) -> Tensor:
        """Record the batch range (when observing) and fake-quantize (when on and calibrated)."""
        if not self.observe:
            return self._forward(x)
        if self.is_input:
            self._note_source(x)
            return self._forward(x)
        output = self._forward(x)
        setattr(output, _PRODUCED_BY, self)  # lets a consumer's input quantizer find this one
        return output

    def _forward(self, x: Tensor) -> Tensor:
        if self.observe:
            # This step's range over all calls; the callback reduces it over ranks and then clears it.
            low, high = torch.aminmax(x.detach())
            low, high = low.float(), high.float()
            if self.batch_range is not None:
                low, high = torch.minimum(low, self.batch_range[0]), torch.maximum(high, self.batch_range[1])
            self.batch_range = (low, high)
        if not (self.fake_quant and self.calibrated):
            return x
        if self.export_constants:
            # Constants and the ATen op: what the ONNX exporter turns into QuantizeLinear/DequantizeLinear. Casting
            # only when needed keeps stray Cast nodes out of the graph.
            quantized = torch.fake_quantize_per_tensor_affine(
                _as_float32(x), float(self.scale), int(self.zero_point), ACTIVATION_QMIN, ACTIVATION_QMAX
            )
        else:
            quantized = fake_quantize(x, self.scale, self.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)
        return quantized if quantized.dtype == x.dtype else quantized.to(x.dtype)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        return f"observe={self.observe}, fake_quant={self.fake_quant}, calibrated={self.calibrated}"


class WeightFakeQuant(_Float32State):
    """Fake-quantizes a weight to symmetric integers in ``[-qmax, qmax]``, per output channel.

    While observing, the scale follows the current weight (weights are identical on every DDP rank); frozen, it
    keeps the last scale.

    Args:
        out_channels: Number of output channels (dimension 0 of the weight).
        qmax: Largest integer: 63 for 7-bit weights (the default, exact on every CPU), 127 for 8-bit.
    """

    def __init__(self, out_channels: int, qmax: int = weight_qmax(DEFAULT_WEIGHT_BITS)) -> None:
        super().__init__()
        self.qmax = qmax
        self.register_buffer("scale", torch.ones(out_channels), persistent=False)
        self.register_buffer("zero_point", torch.zeros(out_channels, dtype=torch.int32), persistent=False)
        self.observe = True
        self.fake_quant = False
        self.export_constants = False

    def compute_scale(self, weight: Tensor) -> Tensor:
        """The scale this quantizer takes for ``weight`` while observing."""
        return symmetric_weight_scale(weight, self.qmax)

    def forward(self, weight: Tensor) -> Tensor:
        """Return the fake-quantized weight (or the weight itself while fake quantization is off)."""
        if self.observe:
            self.scale.copy_(self.compute_scale(weight))
        if not self.fake_quant:
            return weight
        if self.export_constants:
            # The ONNX exporter accepts only the full int8 range here; the deployable model's weights are already
            # on the +-qmax grid (see to_deployable), so the stored integers stay within +-qmax.
            quantized = torch.fake_quantize_per_channel_affine(
                _as_float32(weight), self.scale, self.zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
            )
        else:
            # While observing, the scale was computed from this weight just above; subclasses with their own
            # scale rule (compute_scale) take the clipping path.
            from_weight = self.observe and type(self).compute_scale is WeightFakeQuant.compute_scale
            quantized = symmetric_fake_quantize(weight, self.scale, self.qmax, scale_from_weight=from_weight)
        return quantized if quantized.dtype == weight.dtype else quantized.to(weight.dtype)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        return f"qmax={self.qmax}, observe={self.observe}, fake_quant={self.fake_quant}"

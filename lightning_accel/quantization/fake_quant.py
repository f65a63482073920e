"""Fake-quantization modules built on core ATen ops: per-tensor uint8 activations, per-channel int8 weights.

Their buffers are non-persistent: they never enter the model's ``state_dict``, so checkpoints keep loading into
the plain model. The QAT callback saves and restores them as its own state instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Activations: unsigned 8-bit, per-tensor affine. Weights: signed 8-bit, symmetric per output channel.
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127
#: Symmetric weights use +-127, so that the int8 grid is symmetric around zero and a zero weight stays zero.
WEIGHT_SYMMETRIC_MAX = 127
#: Weight of the newest batch in the moving-average min/max observer (as in PyTorch's MovingAverageMinMax).
AVERAGING_CONSTANT = 0.01
_EPS = torch.finfo(torch.float32).eps


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def affine_qparams(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[min(low, 0), max(high, 0)]`` onto ``[0, 255]``; zero is exact."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN), min=_EPS)
    zero_point = torch.clamp(ACTIVATION_QMIN - torch.round(low / scale), ACTIVATION_QMIN, ACTIVATION_QMAX)
    return scale.float(), zero_point.to(torch.int32)


def symmetric_weight_scale(weight: Tensor) -> Tensor:
    """Per-output-channel scale ``max|w| / 127`` (dimension 0 is the output channel)."""
    absmax = weight.detach().abs().flatten(1).amax(dim=1) if weight.dim() > 1 else weight.detach().abs().amax()
    return torch.clamp(absmax.float() / WEIGHT_SYMMETRIC_MAX, min=_EPS)


class ActivationFakeQuant(nn.Module):
    """Observes a tensor's range and fake-quantizes it to uint8, per tensor.

    Observation only records the current batch's min/max (``batch_min``/``batch_max``); the running range and the
    quantization parameters change only in :meth:`update`, which the callback calls with statistics already
    reduced across ranks. So every rank quantizes with the same parameters at every step.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("batch_min", "batch_max", "running_min", "running_max", "scale"):
            self.register_buffer(name, torch.zeros(()), persistent=False)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool), persistent=False)
        self.observe = False
        self.fake_quant = False
        # Python mirror of ``initialized``: reading the buffer on every forward would sync a GPU.
        self.calibrated = False
        # For ONNX export: scale and zero point as constants, so the exporter writes plain QuantizeLinear nodes.
        self.export_constants = False

    def forward(self, x: Tensor) -> Tensor:
        """Record the batch range (when observing) and fake-quantize (when on and calibrated)."""
        if self.observe:
            low, high = torch.aminmax(x.detach())
            self.batch_min.copy_(low)
            self.batch_max.copy_(high)
        if not (self.fake_quant and self.calibrated):
            return x
        if self.export_constants:
            scale, zero_point = float(self.scale), int(self.zero_point)
        else:
            scale, zero_point = self.scale, self.zero_point
        # The ATen op takes float32; casting only when needed keeps stray Cast nodes out of exported graphs.
        quantized = torch.fake_quantize_per_tensor_affine(
            _as_float32(x), scale, zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX
        )
        return quantized if quantized.dtype == x.dtype else quantized.to(x.dtype)

    @torch.no_grad()
    def update(
        self, batch_min: Tensor, batch_max: Tensor, averaging_constant: float | None = AVERAGING_CONSTANT
    ) -> None:
        """Fold a (rank-reduced) batch range into the running range and recompute scale and zero point.

        Args:
            batch_min: Smallest value seen in the batch (on all ranks).
            batch_max: Largest value seen in the batch (on all ranks).
            averaging_constant: Weight of the batch in a moving average of the range (QAT), or ``None`` to keep
                the overall min and max (calibration for post-training quantization).
        """
        if not self.calibrated:
            self.running_min.copy_(batch_min)
            self.running_max.copy_(batch_max)
        elif averaging_constant is None:
            torch.minimum(self.running_min, batch_min, out=self.running_min)
            torch.maximum(self.running_max, batch_max, out=self.running_max)
        else:
            self.running_min.add_(averaging_constant * (batch_min - self.running_min))
            self.running_max.add_(averaging_constant * (batch_max - self.running_max))
        self.initialized.fill_(True)
        self.calibrated = True
        scale, zero_point = affine_qparams(self.running_min, self.running_max)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        return f"observe={self.observe}, fake_quant={self.fake_quant}, calibrated={self.calibrated}"


class WeightFakeQuant(nn.Module):
    """Fake-quantizes a weight to int8, symmetric per output channel.

    While observing, the scale follows the current weight (weights are identical on every DDP rank); frozen, it
    keeps the last scale.
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(out_channels), persistent=False)
        self.register_buffer("zero_point", torch.zeros(out_channels, dtype=torch.int32), persistent=False)
        self.observe = True
        self.fake_quant = False

    def forward(self, weight: Tensor) -> Tensor:
        """Return the fake-quantized weight (or the weight itself while fake quantization is off)."""
        if self.observe:
            self.scale.copy_(symmetric_weight_scale(weight))
        if not self.fake_quant:
            return weight
        quantized = torch.fake_quantize_per_channel_affine(
            _as_float32(weight), self.scale, self.zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
        )
        return quantized if quantized.dtype == weight.dtype else quantized.to(weight.dtype)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        return f"observe={self.observe}, fake_quant={self.fake_quant}"

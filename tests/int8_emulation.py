"""A bit-exact emulation of ONNX Runtime's x86 U8S8 integer GEMM without VNNI (AVX2, AVX-512F), in torch.

MLAS multiplies uint8 activations by int8 weights with ``vpmaddubsw``: each pair of neighbouring products along
K is added into a *saturating* int16, and only then are the pairs summed in int32 (``vpmaddwd``). VNNI, AMX and
ARM's sdot/udot accumulate in int32 directly and never saturate. The activation zero point is subtracted
afterwards (``- zp_x * sum_k w``), so the raw uint8 values enter the products.

Convolutions are lowered as ORT's QLinearConv does on x86: channels-last im2col, so K runs over
(kernel row, kernel column, input channel) and pairs are neighbouring input channels.

Dynamic activations (``activations="dynamic"``) are quantized at the scale ``DynamicQuantizeLinear`` computes from
each input, and their bias is added in float after the integer product, as ``MatMulIntegerToFloat`` does.

``emulated(deployable, saturate=True)`` patches every quantized Linear/Conv of a deployable model (see
``lightning_accel.quantization.to_deployable``) to compute through this kernel; the result is what ONNX Runtime
computes on such a CPU, so tests can check portability on a machine that has VNNI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel.quantization import quantized_modules
from lightning_accel.quantization.dynamic import dynamic_qparams, is_dynamic
from lightning_accel.quantization.layers import computes_linear

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


def quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """ONNX QuantizeLinear to uint8: ``clamp(round_half_even(x / scale) + zp, 0, 255)``, as int32."""
    return (torch.round(x.float() / scale) + zero_point).clamp(0, 255).to(torch.int32)


def integer_weight(module: nn.Module) -> Tensor:
    """The int8 weight integers ``round(w / s)`` of a deployable quantized module, as int32."""
    rows = module.weight_rows()  # output channels first, also for a transposed Linear (GPT-2's Conv1D)
    scale = module.weight_quant.scale.reshape(-1, *([1] * (rows.dim() - 1)))
    return torch.round(rows.detach().float() / scale).to(torch.int32)


def worst_pair_sum(b: Tensor) -> int:
    """The largest ``|a_2k * b_2k + a_2k+1 * b_2k+1|`` any uint8 input can produce with int8 weights ``b`` (M x K)."""
    if b.shape[1] % 2:
        b = F.pad(b, (0, 1))
    return int(255 * (b[:, 0::2].abs() + b[:, 1::2].abs()).max())


def u8s8_gemm(a: Tensor, b: Tensor, saturate: bool, chunk: int = 128, force_pairs: bool = False) -> tuple[Tensor, int]:
    """``a @ b.T`` for uint8 ``a`` (rows x K) and int8 ``b`` (M x K) as MLAS computes it.

    When no input can make a pair sum leave int16 (``worst_pair_sum(b) <= 32767``), saturation is impossible and
    the exact product is computed by a float64 matmul (exact: every partial sum is far below 2**53). Otherwise,
    or with ``force_pairs``, every pair sum is formed and clamped.

    Returns:
        The int64 accumulator (rows x M) and how many int16 pair sums saturated.
    """
    if not saturate or (worst_pair_sum(b) <= INT16_MAX and not force_pairs):
        return (a.double() @ b.double().T).to(torch.int64), 0
    if a.shape[1] % 2:  # MLAS pads K to an even length with zeros
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    b_even, b_odd = b[:, 0::2], b[:, 1::2]
    out, saturated = [], 0
    for start in range(0, a.shape[0], chunk):
        rows = a[start : start + chunk]
        pairs = rows[:, None, 0::2] * b_even[None] + rows[:, None, 1::2] * b_odd[None]  # rows x M x K/2, int32
        clamped = pairs.clamp(INT16_MIN, INT16_MAX)
        saturated += int((clamped != pairs).sum())
        out.append(clamped.sum(dim=2, dtype=torch.int64))
    return torch.cat(out), saturated


def _im2col_channels_last(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, int]:
    """uint8 input (N, C, H, W) to rows (N * L, kh * kw * C), padded with the zero point by the caller."""
    kh, kw = conv.kernel_size
    columns = F.unfold(x.double(), (kh, kw), dilation=conv.dilation, padding=0, stride=conv.stride)
    n, _, length = columns.shape
    columns = columns.reshape(n, x.shape[1], kh * kw, length).permute(0, 3, 2, 1)  # N, L, kh*kw, C
    return columns.reshape(n * length, kh * kw * x.shape[1]).to(torch.int32), n


class KernelCounter:
    """Counts int16 pair saturations per module while emulating."""

    def __init__(self) -> None:
        self.saturated: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Saturated pair sums over all modules."""
        return sum(self.saturated.values())


def _emulated_forward(name: str, module: nn.Module, saturate: bool, counter: KernelCounter, force_pairs: bool):
    def forward(x: Tensor) -> Tensor:
        quantizer = module.input_quant
        dynamic = is_dynamic(module)
        if dynamic:  # DynamicQuantizeLinear: the scale of this very input
            s_x, zp = dynamic_qparams(x)
        else:
            s_x, zp = quantizer.scale.float(), quantizer.zero_point.float()
        w = integer_weight(module)
        s_w = module.weight_quant.scale.float()
        if computes_linear(module):
            a = quantize_activation(x.reshape(-1, x.shape[-1]), s_x, zp)
            w_flat = w
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise NotImplementedError("the emulation covers groups=1 convs with numeric zero padding")
            ph, pw = module.padding
            xq = quantize_activation(x, s_x, zp)
            xq = F.pad(xq - int(zp), (pw, pw, ph, ph)) + int(zp)  # padding represents 0.0, i.e. the zero point
            a, n = _im2col_channels_last(xq, module)
            w_flat = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (M, kh, kw, C): the same K order
        else:
            raise NotImplementedError(f"no emulation for {type(module).__name__}")
        acc, saturated = u8s8_gemm(a, w_flat, saturate, force_pairs=force_pairs)  # rows x M
        counter.saturated[name] = counter.saturated.get(name, 0) + saturated
        acc = acc - int(zp) * w_flat.sum(dim=1, dtype=torch.int64)
        if module.bias is not None and not dynamic:
            acc = acc + torch.round(module.bias.detach().float() / (s_x * s_w)).to(torch.int64)
        y = (acc.double() * (s_x * s_w).double()).float()
        if dynamic and module.bias is not None:  # MatMulIntegerToFloat adds the bias in float
            y = y + module.bias.detach().float()
        if computes_linear(module):
            y = y.reshape(*x.shape[:-1], w.shape[0])
        else:
            out_h = (xq.shape[2] - module.dilation[0] * (module.kernel_size[0] - 1) - 1) // module.stride[0] + 1
            out_w = (xq.shape[3] - module.dilation[1] * (module.kernel_size[1] - 1) - 1) // module.stride[1] + 1
            y = y.reshape(n, out_h, out_w, w.shape[0]).permute(0, 3, 1, 2)
        return module.output_quant(y) if module.output_quant is not None else y

    return forward


@contextlib.contextmanager
def emulated(deployable: nn.Module, saturate: bool = True, force_pairs: bool = False) -> Iterator[KernelCounter]:
    """Within the block, every quantized module of ``deployable`` computes through the emulated integer kernel.

    Args:
        deployable: A model from ``to_deployable``.
        saturate: Emulate the int16 pair saturation of x86 without VNNI (else: exact int32, as VNNI/AMX/ARM).
        force_pairs: Form every pair sum even where the weights make saturation impossible (slow; for tests that
            count saturations on real activations).
    """
    counter = KernelCounter()
    modules = quantized_modules(deployable)
    for name, module in modules.items():
        module.forward = _emulated_forward(name, module, saturate, counter, force_pairs)
    try:
        with torch.no_grad():
            yield counter
    finally:
        for module in modules.values():
            del module.forward

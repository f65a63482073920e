"""What QAT selected and leaves in float (each skipped layer with the reason), and its step metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import LightningModule
from torch import nn

from lightning_accel._core.modules import BATCH_NORMS, summarize_selection
from lightning_accel.quantization.embeddings import QuantizedEmbedding, quantized_embeddings
from lightning_accel.quantization.layers import QUANTIZED_CLASSES, _Quantized, quantizable_base
from lightning_accel.quantization.phases import PHASE_FLOAT, PHASE_FROZEN, PHASE_OBSERVING
from lightning_accel.quantization.prepare import attention_kernel_children, is_plain_batch_norm


def _float_reason(module: nn.Module, read_by_attention: bool) -> str | None:
    """Why a module that holds a weight matrix stays in float (``None`` for modules QAT handles or that hold none)."""
    if isinstance(module, _Quantized) or not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return None
    if read_by_attention:
        return "attention out_proj (nn.MultiheadAttention reads its weight in its own kernel)"
    if quantizable_base(module) is not None:  # a candidate: quantized, or named as left out by include/exclude
        return None
    if isinstance(module, tuple(QUANTIZED_CLASSES)):
        return "subclasses with their own forward (quantizing would replace what it computes)"
    if isinstance(module, nn.MultiheadAttention):
        return "attention Q/K/V projections (nn.MultiheadAttention runs them in its own kernel; out_proj is a Linear)"
    if isinstance(module, nn.RNNBase):
        return "recurrent layers (nn.LSTM/GRU/RNN: no int8 kernel in this export)"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions (not quantized by this export)"
    if isinstance(module, QuantizedEmbedding):
        return None
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embeddings (a table lookup; embeddings='int8' stores nn.Embedding tables in int8)"
    return "other weight-holding layers (not an nn.Linear/nn.Conv/transposed-Linear computation)"


def left_in_float(model: nn.Module, limit: int = 6) -> str:
    """Name each weight-holding layer that QAT leaves in float, and each BatchNorm it does not fold, with the reason.

    Whatever the patterns say, nothing is left out without a word (for the selection summary).
    """
    by_reason: dict[str, list[str]] = {}
    read_by_attention = attention_kernel_children(model)
    for name, module in model.named_modules():
        reason = _float_reason(module, name in read_by_attention)
        if reason is not None:
            by_reason.setdefault(reason, []).append(name or type(module).__name__)
    unfolded = [
        name
        for name, m in model.named_modules()
        if isinstance(m, BATCH_NORMS) and getattr(m, "folded_into", None) is None and not is_plain_batch_norm(m)
    ]
    if unfolded:
        by_reason[
            "BatchNorms not folded, they do more than normalise (e.g. an activation inside the norm, as "
            "timm's BatchNormAct2d); the conv output is quantized instead"
        ] = unfolded
    float_outputs = [
        f"{name} ({m.float_output_reason})"
        for name, m in model.named_modules()
        if getattr(m, "float_output_reason", None)
    ]
    if float_outputs:
        by_reason["outputs (the layer runs in int8, its output stays float for a float consumer)"] = float_outputs
    text = ""
    tables = list(quantized_embeddings(model))
    if tables:
        more = f" (+{len(tables) - limit} more)" if len(tables) > limit else ""
        text += f"; int8 embedding tables (one scale per row): {', '.join(tables[:limit])}{more}"
    for reason, names in by_reason.items():
        more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
        text += f"; left in float, {reason}: {', '.join(names[:limit])}{more}"
    return text


def selection_summary(model: nn.Module) -> str:
    """What QAT quantized, of which candidates, and what it left in float with the reasons (setup's log line)."""
    quantized = [name for name, m in model.named_modules() if hasattr(m, "weight_quant")]
    skipped = attention_kernel_children(model)
    candidates = [
        name for name, m in model.named_modules() if name and quantizable_base(m) is not None and name not in skipped
    ]
    return summarize_selection(quantized, candidates) + left_in_float(model)


def log_qat_metrics(pl_module: LightningModule, phase: int, skipped: int, quantizers: Mapping[str, Any]) -> None:
    """QAT's step metrics: the phase (one-hot and as a number), skipped batches and each activation scale."""
    for name, value in (("float", PHASE_FLOAT), ("observing", PHASE_OBSERVING), ("frozen", PHASE_FROZEN)):
        pl_module.log(f"qat/phase_{name}", float(phase == value), on_step=True, on_epoch=False)
    pl_module.log("qat/phase", float(phase), on_step=True, on_epoch=False)
    pl_module.log("qat/skipped_ranges", float(skipped), on_step=True, on_epoch=False)
    if phase != PHASE_FLOAT:
        for name, quantizer in quantizers.items():
            pl_module.log(f"qat/scale/{name}", quantizer.scale, on_step=True, on_epoch=False)

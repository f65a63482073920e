"""Int8 embedding tables: one symmetric scale per row, looked up in int8 and dequantized after the lookup.

A transformer's word embedding is often its largest weight (MiniLM: 30522 x 384, 45% of the fp32 file). Stored in
int8 it is a quarter of that. A lookup does no arithmetic, so 8 bits cost nothing in speed and saturate nothing;
one scale per row keeps each token's vector at full relative resolution. The fake-quantized table is what training
and evaluation use, so the file computes what was evaluated (contract 9): the export is ``Gather`` on the int8
table, ``Gather`` on the row scales, and one ``Mul``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accel.quantization.fake_quant import WeightFakeQuant, weight_qmax

#: What happens to ``nn.Embedding`` tables: kept in ``float``, or stored in ``int8`` (per row).
EMBEDDINGS_CHOICES = ("float", "int8")
DEFAULT_EMBEDDINGS = "float"
#: A lookup has no dot product to saturate: the full symmetric int8 range.
EMBEDDING_BITS = 8


#: Row scales are stored in float16 (a 30522-row table saves 61 KB); the smallest normal float16 bounds them below,
#: which only rows whose largest value is under 127 x 6.1e-5 = 0.0078 feel (their integers then stay below 127).
_ROW_SCALE_MIN = torch.finfo(torch.float16).tiny


class RowScaleFakeQuant(WeightFakeQuant):
    """Per-row symmetric 8-bit table quantization with float16 scales, so the file stores what was trained."""

    def compute_scale(self, weight: Tensor) -> Tensor:  # noqa: D102 - float16-representable per-row scales
        scale = super().compute_scale(weight).clamp_min(_ROW_SCALE_MIN)
        return scale.to(torch.float16).float()


def validate_embeddings(embeddings: object) -> None:
    """Raise ``ValueError`` naming ``embeddings`` unless it is ``"float"`` or ``"int8"``."""
    if embeddings not in EMBEDDINGS_CHOICES:
        raise ValueError(
            f"`embeddings` must be one of {list(EMBEDDINGS_CHOICES)} ('int8': tables stored in int8 with one scale "
            f"per row), got {embeddings!r}"
        )


class QuantizedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table is fake-quantized per row while fake quantization is on (same parameter)."""

    weight_quant: RowScaleFakeQuant

    def forward(self, ids: Tensor) -> Tensor:  # noqa: D102 - nn.Embedding's forward on the quantized table
        quantizer = self.weight_quant
        if not (quantizer.fake_quant or quantizer.observe):
            return super().forward(ids)
        table = quantizer(self.weight)  # while observing, this also sets the row scales (calibration)
        return F.embedding(
            ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


def is_quantizable_embedding(module: nn.Module) -> bool:
    """A plain ``nn.Embedding`` (its own forward, no ``max_norm``, which would rewrite the table in place)."""
    return (
        isinstance(module, nn.Embedding)
        and not isinstance(module, QuantizedEmbedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
    )


def prepare_embedding_(module: nn.Embedding) -> None:
    """Turn ``module`` into a :class:`QuantizedEmbedding` in place (parameters and names unchanged)."""
    module.__class__ = QuantizedEmbedding
    module.weight_quant = RowScaleFakeQuant(module.num_embeddings, weight_qmax(EMBEDDING_BITS))


def quantized_embeddings(model: nn.Module) -> dict[str, QuantizedEmbedding]:
    """The int8 embedding tables of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}


class Int8Embedding(nn.Module):
    """The deployable lookup: int8 rows and their scales, which trace to ``Gather``/``Gather``/``Mul`` in ONNX."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        scale = embedding.weight_quant.scale.detach().float()
        integers = torch.round(embedding.weight.detach().float() / scale[:, None])
        self.register_buffer("weight_int8", integers.clamp(-127, 127).to(torch.int8))
        self.register_buffer("row_scale", scale.to(torch.float16).unsqueeze(1))  # exact: the scales are float16

    def forward(self, ids: Tensor) -> Tensor:  # noqa: D102 - the table lookup, dequantized after it
        return self.weight_int8[ids].float() * self.row_scale[ids].float()

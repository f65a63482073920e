"""Where the 7-bit dynamic default loses its 0.001 of cosine on the pretrained MiniLM, layer by layer.

``python -m benchmarks minilm_bits --output benchmarks/minilm_bits``. The same texts as ``bench_minilm`` (standard
library docstrings: half calibrate, half are scored by the cosine of the mean-pooled embeddings to fp32). For
dynamic activations with 7-bit and with 8-bit weights, every Linear is quantized alone (:func:`int8_sensitivity`,
one calibration each) and the cosine it costs is measured; the difference per layer says where 7 bits cost more.

Why 7 bits: ONNX Runtime's x86 kernels without VNNI add each pair of neighbouring uint8 x int8 products into a
saturating int16, so an 8-bit layer is exact there only if no input can push a pair past 32767, i.e. when every
pair of neighbouring weights along the input satisfies ``|w_2k| + |w_2k+1| <= 128`` (255 x 128 = 32640). The table
gives, per layer, the share of its 8-bit rows that break that bound: a layer with none could take 8 bits and stay
exact on every CPU. The last rows measure the whole model with 8 bits on such layers only.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Section
from lightning_accel import calibrate_, export_onnx
from lightning_accel.export.check import ort_session
from lightning_accel.quantization import as_evaluated
from lightning_accel.quantization.fake_quant import WeightFakeQuant
from lightning_accel.quantization.prepare import quantized_modules
from lightning_accel.quantization.sensitivity import int8_sensitivity

SEQUENCE = 128
#: The largest |w_2k| + |w_2k+1| of int8 weights that no uint8 input can saturate in int16 (255 x 128 = 32640).
SAFE_PAIR_SUM = 128


def unsafe_row_share(levels: torch.Tensor) -> float:
    """The share of rows (output channels) of int8 weight levels ``[out, in]`` with a neighbour pair over the bound."""
    if levels.shape[1] % 2:
        levels = torch.nn.functional.pad(levels, (0, 1))
    pairs = levels[:, 0::2].abs() + levels[:, 1::2].abs()
    return float((pairs.amax(dim=1) > SAFE_PAIR_SUM).float().mean())


class PairSafeScale(WeightFakeQuant):
    """8-bit levels whose scale keeps every neighbouring pair within 128: exact without VNNI, finer than 7 bits.

    The scale is ``max(|w_k| + |w_k+1|) / 127`` over all neighbours along the input (not only the aligned pairs
    the kernel forms, to be safe whatever the packing), so rounding leaves every pair at most 128 levels: never
    saturating. It is at least as fine as 7 bits' ``max|w| / 63`` and reaches 8 bits' resolution where a row's
    largest weight has small neighbours. An experiment of this benchmark, not yet a ``weight_bits`` option.
    """

    def compute_scale(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = weight.detach().abs().float()
        pairs = (magnitude[:, :-1] + magnitude[:, 1:]).amax(dim=1)
        return torch.clamp(torch.maximum(pairs, magnitude.amax(dim=1)) / 127, min=1e-12)


def pair_safe_(model: torch.nn.Module) -> int:
    """Give every quantized Linear of ``model`` pair-safe 8-bit scales; return the largest neighbour pair sum."""
    worst = 0
    for module in quantized_modules(model).values():
        module.weight_quant.__class__ = PairSafeScale
        module.weight_quant.qmax = 127
        rows = module.weight_rows().detach()
        module.weight_quant.scale.copy_(module.weight_quant.compute_scale(rows))
        levels = _levels(module).abs()
        worst = max(worst, int((levels[:, :-1] + levels[:, 1:]).max()))
    return worst


def _levels(module: torch.nn.Module) -> torch.Tensor:
    rows = module.weight_rows().detach().float()
    scale = module.weight_quant.compute_scale(rows).reshape(-1, 1)
    return torch.round(rows / scale).clamp(-127, 127)


def _cosine(encoder, model, scored) -> float:
    with torch.no_grad():
        reference, got = encoder(**scored), as_evaluated(model)(**scored)
    return torch.nn.functional.cosine_similarity(reference, got, dim=1).mean().item()


def run(quick: bool) -> list[Section]:
    if quick:
        return [
            Section("MiniLM: 7 against 8 bits", "Skipped in --quick: run `python -m benchmarks minilm_bits`.\n", {})
        ]
    from transformers import AutoTokenizer

    from examples.minilm import SentenceEncoder
    from examples.minilm.data import minilm_path, validation_texts

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoder = SentenceEncoder().eval()
    corpus = validation_texts()
    encoded = tokenizer(corpus, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="pt")
    half = len(corpus) // 2
    calibration = {k: encoded[k][:half] for k in ("input_ids", "attention_mask")}
    scored = {k: encoded[k][half:] for k in ("input_ids", "attention_mask")}
    pick = lambda batch: batch  # noqa: E731 - the batches are the keyword inputs
    data: dict = {"layers": {}}
    costs, seconds = {}, {}
    for bits in (7, 8):
        sensitivity, _, _ = int8_sensitivity(
            encoder, [calibration], [scored], pick, 1, progress=False, activations="dynamic", weight_bits=bits
        )
        costs[bits], seconds[bits] = sensitivity.by_name(), sensitivity.seconds
    eight = calibrate_(copy.deepcopy(encoder), [calibration], 1, model_input=pick, activations="dynamic", weight_bits=8)
    unsafe = {name: unsafe_row_share(_levels(m)) for name, m in quantized_modules(eight).items()}
    rows = []
    for name in sorted(costs[7], key=lambda n: costs[8][n].cost - costs[7][n].cost):
        seven, full = costs[7][name].cost, costs[8][name].cost
        data["layers"][name] = {"cost_7bit": seven, "cost_8bit": full, "unsafe_8bit_rows": unsafe[name]}
        rows.append(f"| {name} | {seven:.5f} | {full:.5f} | {seven - full:+.5f} | {unsafe[name]:.1%} |")
    whole = {}
    for label, bits in (("7-bit everywhere (default)", 7), ("8-bit everywhere", 8)):
        model = calibrate_(
            copy.deepcopy(encoder), [calibration], 1, model_input=pick, activations="dynamic", weight_bits=bits
        )
        whole[label] = _cosine(encoder, model, scored)
    safe = [name for name, share in unsafe.items() if share == 0.0]
    mixed = calibrate_(copy.deepcopy(encoder), [calibration], 1, model_input=pick, activations="dynamic", weight_bits=7)
    for name, module in quantized_modules(mixed).items():
        if name in safe:  # 8 bits where no neighbour pair can saturate: still exact without VNNI
            module.weight_quant.qmax = 127
            module.weight_quant.scale.copy_(module.weight_quant.compute_scale(module.weight_rows().detach()))
    whole["8-bit on the layers with no unsafe pair, 7-bit elsewhere"] = _cosine(encoder, mixed, scored)
    paired = calibrate_(copy.deepcopy(encoder), [calibration], 1, model_input=pick, activations="dynamic")
    worst_pair = pair_safe_(paired)
    whole["8-bit levels with pair-safe scales (experiment; largest neighbour pair below)"] = _cosine(
        encoder, paired, scored
    )
    data["pair_safe_largest_pair"] = worst_pair
    with tempfile.TemporaryDirectory() as directory:  # the file computes it too: the same texts in ONNX Runtime
        path = export_onnx(paired, Path(directory) / "paired.onnx", {k: v[:1] for k, v in scored.items()})
        got = ort_session(path, 2).run(None, {k: v.numpy() for k, v in scored.items()})[0]
    reference = encoder(**scored).detach().numpy()
    whole["the same, in ONNX Runtime"] = float(
        ((got * reference).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1))).mean()
    )
    data["whole_model_cosine"] = whole
    data["safe_8bit_layers"] = safe
    data["sensitivity_seconds"] = seconds
    lines = [
        f"{len(corpus) - half} scored texts, {half} calibration texts, sequence {SEQUENCE}; dynamic activations. Cost: "
        "1 - mean cosine to fp32 with only that Linear quantized (PyTorch, the evaluated model; ORT equals it, "
        f"see `benchmarks/minilm`). Sensitivity took {seconds[7]:.1f} s (7-bit) and {seconds[8]:.1f} s (8-bit) here.",
        "",
        "| layer | cost, 7-bit | cost, 8-bit | 7-bit extra | 8-bit rows with a pair over 128 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "| whole model | mean cosine to fp32 |",
        "| --- | --- |",
        *(f"| {label} | {value:.5f} |" for label, value in whole.items()),
        "",
        f"- layers whose 8-bit weights have no neighbour pair over {SAFE_PAIR_SUM} (exact without VNNI): {len(safe)} "
        f"of {len(unsafe)}",
        f"- pair-safe scales (`PairSafeScale`: the scale is the row's largest neighbouring pair sum / 127): largest "
        f"neighbour pair of levels {worst_pair} (<= {SAFE_PAIR_SUM}: no input can saturate int16 without VNNI)",
    ]
    return [
        Section("MiniLM: where 7-bit weights lose against 8-bit (dynamic activations)", "\n".join(lines) + "\n", data)
    ]

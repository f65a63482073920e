"""The pretrained all-MiniLM-L6-v2 sentence encoder (offline weights package), real text: int8 quality and speed.

``python -m benchmarks minilm --output benchmarks/minilm``. The texts are the first paragraphs of Python standard
library docstrings: half calibrate, the other half are scored by the cosine of their mean-pooled embeddings to the
fp32 model's. Latency is ONNX Runtime at sequence 128, batch 1 and batch 32, sessions interleaved. ``--quick``
(the test suite's smoke run) skips this benchmark: loading and exporting a 22M-parameter model three times takes
longer than the whole quick run.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import minilm_recipes
from benchmarks.common import THREADS, Section, goal
from examples.minilm import SentenceEncoder
from examples.minilm.data import minilm_path, validation_texts
from lightning_accel import calibrate_, export_onnx
from lightning_accel.export.check import ort_session
from lightning_accel.quantization import as_evaluated
from lightning_accel.report.measure import median_latencies

SEQUENCE = 128
STATIC_DEFAULT = "ours PTQ static, outputs='graph' (default), 7-bit"
DYNAMIC_DEFAULT = "ours PTQ activations='dynamic', 7-bit"
DYNAMIC_SMALLEST = "ours PTQ activations='dynamic', embeddings='int8', 7-bit"
DYNAMIC_SMALLEST_8BIT = "ours PTQ activations='dynamic', embeddings='int8', 8-bit"
#: Our configurations: (label, calibrate_ settings, exported and timed in ONNX Runtime).
OURS = [
    (STATIC_DEFAULT, {"outputs": "graph", "weight_bits": 7}, True),
    ("ours PTQ static, 8-bit", {"outputs": "graph", "weight_bits": 8}, False),
    ("ours PTQ static, outputs='auto' (the type rule before), 7-bit", {"outputs": "auto", "weight_bits": 7}, False),
    (DYNAMIC_DEFAULT, {"activations": "dynamic", "weight_bits": 7}, True),
    ("ours PTQ activations='dynamic', 8-bit", {"activations": "dynamic", "weight_bits": 8}, True),
    (DYNAMIC_SMALLEST, {"activations": "dynamic", "embeddings": "int8", "weight_bits": 7}, True),
    (DYNAMIC_SMALLEST_8BIT, {"activations": "dynamic", "embeddings": "int8", "weight_bits": 8}, True),
]
#: The fraction of every FFN's hidden units and of every attention's heads that the slimming recipes remove.
SLIM_SPARSITY = minilm_recipes.SLIM_SPARSITY
#: The recipes that train (benchmarks/minilm_recipes.py): row label -> (recipe, settings).
RECIPES = {
    "ours QAT + Distillation, dynamic, int8 embeddings, 7-bit": ("qat", {}),
    **{
        f"ours heads + FFN slimming {SLIM_SPARSITY:.0%} (importance='{importance}') + Distillation, then QAT "
        "(dynamic, int8 embeddings, 7-bit)": ("slim", {**minilm_recipes.SLIM_SETTINGS, "importance": importance})
        for importance in ("magnitude", "taylor")
    },
}
#: ONNX Runtime's one-call dynamic quantization, as users run it.
ORT_DYNAMIC = {
    "ORT quantize_dynamic(per_channel=True)": {"per_channel": True},
    "ORT quantize_dynamic(per_channel=True, reduce_range=True)": {"per_channel": True, "reduce_range": True},
    "ORT quantize_dynamic": {"per_channel": False},
    "ORT quantize_dynamic(reduce_range=True)": {"per_channel": False, "reduce_range": True},
}


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    cos = (reference * candidate).sum(-1) / (np.linalg.norm(candidate, axis=-1) * np.linalg.norm(reference, axis=-1))
    return float(cos.mean()), float(cos.min())


def time_files(files: dict[str, Path], reference: np.ndarray, feed: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """Each file in ONNX Runtime: cosine to ``reference`` on ``feed``, batch 1 and 32 latency (interleaved), bytes."""
    sessions = {name: ort_session(file, THREADS) for name, file in files.items()}
    cosine = {name: _cosine(reference, session.run(None, feed)[0]) for name, session in sessions.items()}
    latency = {}
    for batch in (1, 32):
        inputs = {k: np.repeat(v, -(-batch // len(v)), axis=0)[:batch] for k, v in feed.items()}
        runners = {name: (lambda s=s, i=inputs: s.run(None, i)) for name, s in sessions.items()}
        latency[batch] = median_latencies(runners, repeats=10 if batch == 1 else 2, rounds=5)
    return cosine, latency, {name: Path(file).stat().st_size for name, file in files.items()}


def run(quick: bool) -> list[Section]:
    if quick:
        return [Section("MiniLM (pretrained)", "Skipped in --quick: run `python -m benchmarks minilm`.\n", {})]
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoder = SentenceEncoder().eval()  # the example's module: MiniLM with mean pooling, normalised
    corpus = validation_texts()
    encoded = tokenizer(corpus, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="pt")
    half = len(corpus) // 2
    calibration = {k: encoded[k][:half] for k in ("input_ids", "attention_mask")}
    scored = {k: encoded[k][half:] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = encoder(**scored).numpy()
    example = {k: v[:1] for k, v in scored.items()}

    rows, data, files = [], {}, {}
    with tempfile.TemporaryDirectory() as directory:
        files["fp32 ORT"] = export_onnx(encoder, Path(directory) / "fp32.onnx", example)
        for index, (label, kwargs, exported) in enumerate(OURS):
            model = calibrate_(copy.deepcopy(encoder), [calibration], num_batches=1, model_input=lambda b: b, **kwargs)
            with torch.no_grad():
                torch_cos = _cosine(reference, as_evaluated(model)(**scored).numpy())
            data[label] = {"pytorch_cosine_mean": torch_cos[0], "pytorch_cosine_min": torch_cos[1]}
            if exported:
                target = Path(directory) / f"ours_{index}.onnx"
                files[label] = export_onnx(
                    model, target, example, check_inputs=[scored], on_mismatch="raise", classification=False
                )
            rows.append((label, torch_cos))
        recipes = {}
        for label, (name, settings) in RECIPES.items():
            trained, files[label], recipes[label] = minilm_recipes.train_recipe(name, Path(directory), **settings)
            with torch.no_grad():
                torch_cos = _cosine(reference, as_evaluated(trained)(**scored).numpy())
            # Slimming removes exactly the zeroed channel slices: the nonzero count is the slim model's size.
            recipes[label]["nonzero_parameters"] = sum(int(p.count_nonzero()) for p in trained.parameters())
            data[label] = {"pytorch_cosine_mean": torch_cos[0], "pytorch_cosine_min": torch_cos[1], **recipes[label]}
            rows.append((label, torch_cos))
        for label, options in ORT_DYNAMIC.items():
            target = Path(directory) / f"ort_{len(files)}.onnx"
            quantize_dynamic(str(files["fp32 ORT"]), str(target), weight_type=QuantType.QInt8, **options)
            files[label] = target
        ort_cos, latency, sizes = time_files(files, reference, {k: v.numpy() for k, v in scored.items()})

    lines = [
        f"{len(corpus) - half} scored texts, {half} calibration texts, sequence {SEQUENCE}, {THREADS} threads. "
        "Dynamic scales span the whole input tensor: the 19 scored texts run as one batch, in PyTorch and in ORT.",
        "",
        "| model | cosine to fp32 (PyTorch) mean / min | cosine in ONNX Runtime mean / min | ORT batch 1 ms | "
        "ORT batch 32 ms | file MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, (mean, low) in rows:
        ort_cells = "{:.4f} / {:.4f}".format(*ort_cos[label]) if label in ort_cos else "(not exported)"
        timing = (
            f"{latency[1][label] * 1e3:.2f} | {latency[32][label] * 1e3:.1f} | {sizes[label] / 1e6:.1f}"
            if label in files
            else "| |"
        )
        lines.append(f"| {label} | {mean:.4f} / {low:.4f} | {ort_cells} | {timing} |")
    for label in ("fp32 ORT", *ORT_DYNAMIC):
        lines.append(
            f"| {label} | | {ort_cos[label][0]:.4f} / {ort_cos[label][1]:.4f} | {latency[1][label] * 1e3:.2f} | "
            f"{latency[32][label] * 1e3:.1f} | {sizes[label] / 1e6:.1f} |"
        )
    anchor = "ORT quantize_dynamic(per_channel=True)"
    lines += [
        "",
        f"Goals, against `{anchor}` ({latency[32][anchor] * 1e3:.1f} ms at batch 32, cosine "
        f"{ort_cos[anchor][0]:.4f}, {sizes[anchor] / 1e6:.1f} MB):",
    ]
    for label in (STATIC_DEFAULT, DYNAMIC_DEFAULT, DYNAMIC_SMALLEST, DYNAMIC_SMALLEST_8BIT):
        speed = latency[32]["fp32 ORT"] / latency[32][label]
        lines.append(
            f"- {label}: cosine {ort_cos[label][0]:.4f} ({goal(ort_cos[label][0], 0.99, 'higher')} >= 0.99; "
            f"{goal(ort_cos[label][0], ort_cos[anchor][0], 'higher')} against the anchor), batch 32 "
            f"{latency[32][label] * 1e3:.1f} ms ({goal(latency[32][label], latency[32][anchor], 'lower')}; "
            f"{speed:.2f}x fp32 ORT), file {sizes[label] / 1e6:.1f} MB "
            f"({goal(sizes[label], sizes[anchor], 'lower')} smaller)"
        )
    first = next(iter(recipes.values()))
    lines += [
        "",
        f"Training recipes (`examples/minilm`: {first['train_texts']} other docstring paragraphs, "
        f"batch {minilm_recipes.BATCH}, {minilm_recipes.EPOCHS} epochs, AdamW {minilm_recipes.LR:g}, "
        "`Distillation(loss='cosine')` from the pretrained model, QAT with dynamic activations and int8 embeddings; "
        f"slimming removes {SLIM_SPARSITY:.0%} of every FFN's hidden units and of every attention's heads until half "
        f"of the steps, at AdamW {minilm_recipes.SLIM_SETTINGS['lr']:g} with every encoder layer's output distilled "
        "too (MSE), then QAT from 60% of the steps):",
    ]
    for label, figures in recipes.items():
        start, end = figures["int8_at_start"] or {}, figures["int8_at_end"] or {}
        lines.append(
            f"- {label}: int8 cosine (PyTorch, QAT's own probe) {start.get('value', float('nan')):.4f} when QAT "
            f"started, {end.get('value', float('nan')):.4f} at the end; {figures['nonzero_parameters']:,} nonzero "
            "parameters"
        )
    for label, (name, settings) in RECIPES.items():
        if name != "slim":
            continue
        speed = latency[32]["fp32 ORT"] / latency[32][label]
        lines.append(
            f"- slim + int8 with distillation >= 2.5x fp32 ORT at batch 32 with cosine >= 0.95, importance "
            f"'{settings['importance']}': {speed:.2f}x ({goal(speed, 2.5, 'higher')}), cosine "
            f"{ort_cos[label][0]:.4f} ({goal(ort_cos[label][0], 0.95, 'higher')})"
        )
    data.update(
        {
            "ort_cosine": {k: list(v) for k, v in ort_cos.items()},
            "latency_ms": {str(b): {k: v * 1e3 for k, v in row.items()} for b, row in latency.items()},
            "bytes": sizes,
        }
    )
    return [Section("MiniLM (pretrained all-MiniLM-L6-v2): int8 quality and speed", "\n".join(lines) + "\n", data)]

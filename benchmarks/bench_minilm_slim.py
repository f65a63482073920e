"""The MiniLM slim recipe that aims to hold quality: speed-up against cosine at several targets (issue 29).

``python -m benchmarks minilm_slim --output benchmarks/minilm_slim``. Each row is ``minilm_recipes.SlimRecipe``
trained at one target: heads and FFN units removed gradually with per-layer fractions from each layer's measured
sensitivity, every encoder layer distilled from the pretrained model, on every standard-library docstring paragraph,
then QAT (dynamic activations, int8 embeddings) and the slim int8 export. Quality is the cosine of the 19 scored
texts' embeddings (the ``minilm`` benchmark's) to the fp32 model's, in ONNX Runtime; speed is ONNX Runtime at
sequence 128, batch 1 and 32, every file timed in this run, interleaved with fp32.

Training takes about 20 minutes per target on 2 cores. With ``MINILM_SLIM_WORK=DIR`` the int8 files and training
figures are kept in ``DIR`` and reused by a later run with the same settings (only the training is skipped: every
timing and cosine is measured anew). ``--quick`` skips this benchmark.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_minilm import time_files
from benchmarks.common import THREADS, Section, goal
from benchmarks.minilm_recipes import SlimRecipe, train_slim
from examples.minilm import SentenceEncoder
from examples.minilm.data import minilm_path, validation_texts
from lightning_accel import export_onnx

SEQUENCE = 128
#: The curve: the same recipe at each target (the share of all heads and FFN units removed).
TARGETS = (0.2, 0.3, 0.4)
#: The ablation: the same recipe at 30% with the same share removed from every layer.
UNIFORM = SlimRecipe(sparsity=0.3, channel_fractions="uniform")
#: The goal of issue 29: at least this speed-up over fp32 ORT at batch 32 with at least this cosine.
SPEED_GOAL, COSINE_GOAL = 2.5, 0.95


def _label(recipe: SlimRecipe) -> str:
    return f"{recipe.sparsity:.0%} of heads + FFN units, fractions '{recipe.channel_fractions}'"


def run(quick: bool) -> list[Section]:
    if quick:
        return [Section("MiniLM slim recipe", "Skipped in --quick: run `python -m benchmarks minilm_slim`.\n", {})]
    from transformers import AutoTokenizer

    recipes = [*(SlimRecipe(sparsity=target) for target in TARGETS), UNIFORM]
    work = os.environ.get("MINILM_SLIM_WORK")
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(work or scratch)
        directory.mkdir(parents=True, exist_ok=True)
        trained = {_label(r): train_slim(r, directory) for r in recipes}
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        corpus = validation_texts()
        encoded = tokenizer(corpus, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="np")
        scored = {k: encoded[k][len(corpus) // 2 :] for k in ("input_ids", "attention_mask")}
        encoder = SentenceEncoder().eval()
        with torch.no_grad():
            reference = encoder(**{k: torch.from_numpy(v) for k, v in scored.items()}).numpy()
        example = {k: torch.from_numpy(v[:1]) for k, v in scored.items()}
        files = {"fp32 ORT": export_onnx(encoder, Path(scratch) / "fp32.onnx", example)}
        files.update({label: path for label, (path, _) in trained.items()})
        cosine, latency, sizes = time_files(files, reference, scored)
    return [_section(recipes, trained, cosine, latency, sizes, len(corpus) - len(corpus) // 2)]


def _section(recipes, trained, cosine, latency, sizes, scored_texts: int) -> Section:
    first = recipes[0]
    settings = next(iter(trained.values()))[1]
    lines = [
        f"Recipe (`benchmarks/minilm_recipes.py` `SlimRecipe`): {settings['train_texts']} docstring paragraphs "
        f"(corpus '{first.corpus}'), batch {first.batch}, {first.epochs} epochs ({settings['steps']} steps), AdamW "
        f"{first.lr:g}; heads and FFN units removed gradually (Taylor importance, every 8 steps) until "
        f"{first.prune_until:.0%} of the steps with per-layer fractions '{first.channel_fractions}'; "
        "`Distillation(loss='cosine')` from the pretrained model on the sentence embedding and every encoder "
        f"layer's output; QAT (dynamic activations, int8 embeddings, 7-bit) from {first.qat_from:.0%} of the steps; "
        f"the slim int8 file QAT exports. Scored: {scored_texts} texts at sequence {SEQUENCE}, {THREADS} threads. "
        "Training minutes are the wall time of each training run (a run reused from `MINILM_SLIM_WORK` keeps its "
        "figure; other work on the machine lengthens it).",
        "",
        "| model | cosine in ONNX Runtime mean / min | ORT batch 1 ms | ORT batch 32 ms | speed-up batch 32 | "
        "file MB | nonzero parameters | training minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reference = latency[32]["fp32 ORT"]
    for label in latency[32]:
        figures = trained[label][1] if label in trained else {}
        minutes = f"{figures['train_minutes']:.0f}" if "train_minutes" in figures else ""
        parameters = f"{figures['nonzero_parameters']:,}" if "nonzero_parameters" in figures else ""
        lines.append(
            f"| {label} | {cosine[label][0]:.4f} / {cosine[label][1]:.4f} | {latency[1][label] * 1e3:.2f} | "
            f"{latency[32][label] * 1e3:.1f} | {reference / latency[32][label]:.2f}x | {sizes[label] / 1e6:.1f} | "
            f"{parameters} | {minutes} |"
        )
    lines += ["", f"Goal: >= {SPEED_GOAL}x fp32 ORT at batch 32 with cosine >= {COSINE_GOAL} (int8 included):"]
    for label, (_, figures) in trained.items():
        speed = reference / latency[32][label]
        lines.append(
            f"- {label}: {speed:.2f}x ({goal(speed, SPEED_GOAL, 'higher')}), cosine {cosine[label][0]:.4f} "
            f"({goal(cosine[label][0], COSINE_GOAL, 'higher')}); QAT's own int8 probe "
            f"{(figures['int8_at_start'] or {}).get('value', float('nan')):.4f} at its start, "
            f"{(figures['int8_at_end'] or {}).get('value', float('nan')):.4f} at the end"
        )
    lines += ["", "Per-layer fractions (multipliers of the target, from each group's measured cost):", ""]
    for label, (_, figures) in trained.items():
        shown = ", ".join(f"{k.removeprefix('model.encoder.')} {v}x" for k, v in (figures["fractions"] or {}).items())
        lines.append(f"- {label}: {shown or 'uniform'}")
    data = {
        "recipes": {label: {**figures, "file": None} for label, (_, figures) in trained.items()},
        "ort_cosine": {k: list(v) for k, v in cosine.items()},
        "latency_ms": {str(b): {k: v * 1e3 for k, v in row.items()} for b, row in latency.items()},
        "bytes": sizes,
    }
    return Section("MiniLM slim recipe: speed-up against cosine", "\n".join(lines) + "\n", data)

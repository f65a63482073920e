"""Wanda against magnitude pruning on the benchmark's language model: one-shot, then after the same fine-tuning.

Every Linear but the LM head is pruned to 50% (unstructured, per layer) or 2:4 on the trained model; Wanda's input
norms come from the calibration windows. Each pruned model is then fine-tuned for the same steps on the same
training windows (AdamW, next-token loss, the masks re-applied after every step as ``MagnitudePruning`` does), and
held-out perplexity is measured in PyTorch before and after.
"""

from __future__ import annotations

import torch

from benchmarks.common import Section, goal
from benchmarks.llm_model import perplexity
from examples.llm.data import stdlib_text, token_windows
from lightning_accel._core.modules import module_copy
from lightning_accel.pruning.masks import apply_masks_, compute_masks
from lightning_accel.pruning.wanda import WandaImportance, wanda_masks

#: Fine-tuning steps after one-shot pruning (8 windows of 256 bytes each), the same for every row.
FINE_TUNE_STEPS = 40


def fine_tune_pruned(model: torch.nn.Module, weights: dict, masks: dict, quick: bool) -> None:
    """Train ``model`` for the fixed steps on training windows, keeping the pruned weights at zero."""
    train, _, _ = stdlib_text()
    steps, batch, length = (2, 4, 64) if quick else (FINE_TUNE_STEPS, 8, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()
    for step in range(steps):
        tokens = token_windows(train, length, batch, seed=7000 + step)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            apply_masks_(weights, masks)
    model.eval()


def wanda_section(model: torch.nn.Module, held_out, calibration, quick: bool) -> Section:
    """One-shot Wanda against magnitude at 50% unstructured and 2:4, by held-out perplexity, then fine-tuned."""
    hf = model.model
    names = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    dense = perplexity(hf, held_out)
    rows, data = [f"| dense | {dense:.3f} | - |"], {"dense": dense}
    scorer = WandaImportance(hf, [f"{n}.weight" for n in names])
    scorer.gather(hf, calibration)
    norms = scorer.take()
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda"):
            pruned = module_copy(hf).eval()
            weights = {f"{n}.weight": pruned.get_submodule(n).weight for n in names}
            detached = {k: w.detach() for k, w in weights.items()}
            if method == "wanda":
                masks = wanda_masks(detached, norms.norms, 0.5, pattern)
            else:  # per layer, as Wanda compares within layers too
                masks = compute_masks(detached, 0.5, pattern, scope="layer")
            apply_masks_(weights, masks)
            one_shot = perplexity(pruned, held_out)
            fine_tune_pruned(pruned, weights, masks, quick)
            tuned = perplexity(pruned, held_out)
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            data[f"{method} {pattern}"] = one_shot
            data[f"{method} {pattern} fine-tuned"] = tuned
            data[f"{method} {pattern} kept"] = kept
            rows.append(f"| {method}, 50% {pattern} | {one_shot:.3f} | {tuned:.3f} |")
    steps = 2 if quick else FINE_TUNE_STEPS
    lines = [
        "Every Linear but the LM head at 50% (per layer); Wanda's input norms from the calibration windows. "
        f"Fine-tuned: {steps} steps of the same training windows for every row (AdamW 1e-4, next-token loss, masks "
        "re-applied after each step).",
        "",
        "| pruning | held-out perplexity, one-shot | after fine-tuning |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]
    for pattern in ("unstructured", "2:4"):
        for suffix, when in (("", "one-shot"), (" fine-tuned", "fine-tuned")):
            wanda, magnitude = data[f"wanda {pattern}{suffix}"], data[f"magnitude {pattern}{suffix}"]
            lines.append(
                f"- {pattern}, {when}: Wanda {wanda:.3f} <= magnitude {magnitude:.3f}: {goal(wanda, magnitude)}"
            )
    return Section("Language model: Wanda against magnitude pruning", "\n".join(lines) + "\n", data)

"""Cost of pruning's mask recompute and per-step hooks at 1M, 10M and 50M parameters (an MLP).

Each size runs in a fresh process, so that its peak resident memory can be read on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import Section, goal

PROBE = r"""
import json, sys, time
import torch
from lightning_accel import apply_masks_, compute_masks
torch.set_num_threads(2)
millions = int(sys.argv[1])
width = 1024
layers = max(1, round(millions * 1_000_000 / (width * width)))
torch.manual_seed(0)
params = {f"{i}.weight": torch.nn.Parameter(torch.randn(width, width)) for i in range(layers)}
parameter_bytes = sum(p.numel() * p.element_size() for p in params.values())
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)
with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM) to the current resident set
    refs.write("5")
before = status("VmRSS")
start = time.perf_counter()
masks = compute_masks(params, 0.9, "unstructured", "global")
recompute = time.perf_counter() - start
peak = status("VmHWM") - before
multipliers = {n: m.to(torch.float32) for n, m in masks.items()}
with torch.no_grad():
    start = time.perf_counter()
    for _ in range(5):
        for name, multiplier in multipliers.items():
            params[name].mul_(multiplier)
    step_hook = (time.perf_counter() - start) / 5
print(json.dumps({"parameters": sum(p.numel() for p in params.values()), "recompute_s": recompute,
                  "hook_s": step_hook, "peak_extra_bytes": peak, "parameter_bytes": parameter_bytes}))
"""


def probe(millions: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(millions)], capture_output=True, text=True, check=True, timeout=900
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[Section]:
    """One row per size; time per million parameters shows whether the cost grows linearly."""
    sizes = (1,) if quick else (1, 10, 50)
    rows = {size: probe(size) for size in sizes}
    lines = [
        "Global unstructured masks at 90% over square 1024x1024 Linear weights; the per-step hook is the multiply "
        "that keeps pruned weights at zero after every optimizer step. Peak memory is the growth of the process's "
        "peak resident set during the recompute, the masks it returns included (Linux VmHWM, reset just before; goal: "
        "within 1.5x the parameters' own size).",
        "",
        "| parameters | mask recompute | per 1M params | per-step hook | per 1M params "
        "| recompute peak memory / parameters |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows.values():
        millions = row["parameters"] / 1e6
        memory = row["peak_extra_bytes"] / row["parameter_bytes"]
        lines.append(
            f"| {millions:.1f}M | {row['recompute_s'] * 1e3:.1f} ms | {row['recompute_s'] * 1e3 / millions:.2f} ms | "
            f"{row['hook_s'] * 1e3:.2f} ms | {row['hook_s'] * 1e3 / millions:.3f} ms | {memory:.2f}x "
            f"({goal(memory, 1.5)}) |"
        )
    return [
        Section(
            "Pruning at scale: mask recompute and per-step hooks",
            "\n".join(lines) + "\n",
            {str(k): v for k, v in rows.items()},
        )
    ]

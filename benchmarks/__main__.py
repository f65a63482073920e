"""``make bench``: run the benchmarks and write ``benchmarks/RESULTS.md`` and ``benchmarks/RESULTS.json``.

Usage: ``python -m benchmarks [--quick] [--output DIR] [NAME ...]``, e.g. ``python -m benchmarks --quick pruning``.
Every figure is a ratio measured side by side in this one run; the results name the machine, the CPU's int8
instruction sets, the threads used, the library versions and the date. ``--quick`` runs every benchmark with
fewer steps and sizes (``make bench-quick``, under 3 minutes): it keeps the scripts working, its figures are
rougher.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import warnings
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.common import THREADS, Section
from lightning_accel.report.measure import cpu_description, describe_cpu

ORDER = (
    "pruning",
    "scopes",
    "slimming",
    "quantization",
    "compile",
    "qat_step",
    "llm",
    "precision",
    "together",
    "scaling",
    "minilm",
    "minilm_bits",
    "minilm_slim",
)
HERE = Path(__file__).parent


def machine() -> dict:
    """What the figures were measured on."""
    versions = {}
    for package in ("torch", "lightning", "onnxruntime", "onnx", "torch-pruning"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = cpu_description()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu["model"],
        "int8_instructions": cpu["int8_instructions"],
        "cores": os.cpu_count(),
        "threads": THREADS,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": versions,
    }


def to_markdown(info: dict, sections: list[Section], quick: bool) -> str:
    """RESULTS.md: the machine, then one table per benchmark."""
    cpu = {"model": info["cpu"], "int8_instructions": info["int8_instructions"], "threads": info["threads"]}
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench{'-quick' if quick else ''}` on {info['date']}. Every ratio was measured side by "
        "side in this one run (contender and reference alternating, medians).",
        "",
        f"- CPU: {describe_cpu(cpu)}",
        f"- cores: {info['cores']}; GPU: {info['gpu'] or 'none (GPU rows are not measured)'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
    return "\n".join(lines)


def main() -> None:
    """Run the named benchmarks (or all), print each table and write the results files."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {list(ORDER)})")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes (the smoke run)")
    parser.add_argument("--output", default=str(HERE), help="where RESULTS.md and RESULTS.json go")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(ORDER))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {list(ORDER)}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    info = machine()
    sections: list[Section] = []
    for name in args.names or ORDER:
        print(f"== {name} ==", flush=True)
        for section in importlib.import_module(f"benchmarks.bench_{name}").run(args.quick):
            print(f"\n{section.title}\n\n{section.markdown}", flush=True)
            sections.append(section)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "RESULTS.md").write_text(to_markdown(info, sections, args.quick))
    payload = {"machine": info, "quick": args.quick, "sections": [s.as_json() for s in sections]}
    (output / "RESULTS.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {output / 'RESULTS.md'} and {output / 'RESULTS.json'}")


if __name__ == "__main__":
    main()

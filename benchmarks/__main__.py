"""Run every ``benchmarks/bench_*.py`` module (or those named on the command line) and print its table.

Usage: ``python -m benchmarks [NAME ...]``, e.g. ``python -m benchmarks pruning``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(names: list[str]) -> None:
    """Run the named benchmarks, or all of them."""
    available = sorted(path.stem.removeprefix("bench_") for path in Path(__file__).parent.glob("bench_*.py"))
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {available}")
    for name in names or available:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main()
    if not available:
        print("no benchmarks yet")


if __name__ == "__main__":
    main(sys.argv[1:])

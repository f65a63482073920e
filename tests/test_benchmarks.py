"""Smoke test of `make bench-quick`: every benchmark script runs and writes its results files (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_benchmarks_run_and_write_results(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "RESULTS.json").read_text())
    titles = [section["title"] for section in results["sections"]]
    for expected in (
        "Pruning: per-step overhead",
        "Pruning: global, LAMP and per-layer ranking",
        "Channel pruning: ResNet-18-shaped CNN",
        "Channel pruning on digits against torch-pruning's MetaPruner",
        "Int8: PTQ against ONNX Runtime's quantize_static",
        "Mixed precision: throughput against fp32",
        "All together on digits",
        "Pruning at scale",
    ):
        assert any(title.startswith(expected) for title in titles), titles
    assert results["machine"]["cpu"] and "int8_instructions" in results["machine"]
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "int8 instructions" in markdown
    assert "not measured" in markdown or results["machine"]["gpu"]  # GPU rows say so without a GPU

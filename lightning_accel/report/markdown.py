"""The report as files and figures: Markdown tables, ``report.json``, and the scalars logged to TensorBoard."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_accel._core.files import atomic_write_bytes
from lightning_accel.report.generation import generation_metrics, generation_table
from lightning_accel.report.measure import LatencySpread, describe_cpu


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables (the same content as report.json)."""
    lines = ["# Acceleration report", "", f"Measured on {describe_cpu(report['cpu'])}.", ""]
    for table in (
        _model_table,
        _size_table,
        _latency_table,
        generation_table,
        _quality_table,
        _budget_table,
        _fractions_table,
    ):
        lines += table(report)
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def _model_table(report: Mapping[str, Any]) -> list[str]:
    model = report["model"]
    rows = [
        "| model | value |",
        "| --- | --- |",
        f"| parameters | {model['parameters']:,} |",
        f"| {model.get('sparsity_of', 'Linear/Conv weights')} | {model['prunable_weights']:,} |",
        f"| sparsity of those weights | {model['sparsity']:.2%} |",
    ]
    if model.get("other_weights"):
        rows.append(
            f"| other weights (not pruned) | {model['other_weights']:,}, {model['other_weights_sparsity']:.2%} zeros |"
        )
    if "macs" in model:
        rows.append(f"| MACs per example (Linear/Conv) | {model['macs']:,} |")
    if "slim_macs" in model:
        rows += [
            f"| after slimming: parameters | {model['slim_parameters']:,} |",
            f"| after slimming: MACs per example | {model['slim_macs']:,} "
            f"({model['macs'] / max(model['slim_macs'], 1):.2f}x fewer) |",
        ]
    return [*rows, f"| training precision | {report.get('precision', 'fp32')} |", ""]


def _size_table(report: Mapping[str, Any]) -> list[str]:
    sizes = report.get("sizes", {})
    if not sizes:
        return []
    base = sizes.get("fp32 state dict", {}).get("bytes")
    rows = ["| artifact | bytes | vs fp32 state dict |", "| --- | --- | --- |"]
    for name, entry in sizes.items():
        ratio = size_ratio(base, entry["bytes"]) if name != "fp32 state dict" else "1x"
        rows.append(f"| {name} (`{Path(entry['path']).name}`) | {entry['bytes']:,} | {ratio} |")
    return [*rows, ""]


def _latency_table(report: Mapping[str, Any]) -> list[str]:
    latency = report.get("latency_ms", {})
    if not latency:
        return []
    columns = sorted({c for row in latency.values() for c in row}, key=list(next(iter(latency.values()))).index)
    rows = ["| latency (median ms) | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for batch, row in latency.items():
        cells = []
        noisy = set(report.get("latency_noisy", {}).get(batch, ()))
        for column in columns:
            value, base = row.get(column), row.get(columns[0])
            cell = f"{value:.3f} ({base / value:.2f}x)" if value and base else "n/a"
            cells.append(cell + (" noisy" if column in noisy or columns[0] in noisy else ""))
        rows.append(f"| {batch} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def _quality_table(report: Mapping[str, Any]) -> list[str]:
    quality = report.get("quality", {})
    if not quality:
        return []
    reference = report.get("quality_reference", "float weights")
    rows = [
        f"| quality on validation data | accuracy | agreement with {reference} | SNR vs {reference} (dB) |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in quality.items():
        accuracy = f"{entry['accuracy']:.4f}" if "accuracy" in entry else "n/a"
        if "agreement" in entry:
            agreement = f"{entry['agreement']:.2%}"
        elif "cosine" in entry:
            agreement = f"cosine {entry['cosine']:.4f}"
        else:
            agreement = "(reference)" if name == report.get("quality_reference") else ""
        snr = f"{entry['snr_db']:.1f}" if "snr_db" in entry else ""
        rows.append(f"| {name} | {accuracy} | {agreement} | {snr} |")
    return [*rows, ""]


def _budget_table(report: Mapping[str, Any]) -> list[str]:
    """What a quality budget measured: the figures, and each layer's cost alone with where it was held back to."""
    lines: list[str] = []
    for owner, budget in report.get("quality_budget", {}).items():
        verdict = "met" if budget["met"] else "**missed**"
        lines += [
            f"{owner}: quality budget {budget['budget']:g} ({budget['metric']}) {verdict}: float "
            f"{budget['float']:.4f}, deployed {budget['final']:.4f} (loss {budget['loss']:+.4f}); each layer "
            f"quantized alone, measured in {budget['sensitivity_seconds']:.1f} s:",
            "",
            f"| layer | {budget['metric']} cost, quantized alone | held back to |",
            "| --- | --- | --- |",
            *(f"| {layer['name']} | {layer['cost']:+.4f} | {_held_back(layer)} |" for layer in budget["layers"]),
            "",
        ]
    return lines


def _fractions_table(report: Mapping[str, Any]) -> list[str]:
    """Channel pruning's measured sensitivity: each group's cost removed alone, and its share of the target."""
    lines: list[str] = []
    for owner, measured in report.get("channel_sensitivity", {}).items():
        lines += [
            f"{owner}: each channel group's removal at {measured['sparsity']:.0%} alone, scored by "
            f"{measured['metric']} in {measured['seconds']:.1f} s, and the multiplier of the target it was given:",
            "",
            f"| group | kind | {measured['metric']} cost, removed alone | fraction of the target |",
            "| --- | --- | --- | --- |",
            *(
                f"| {row['group']} | {row['kind']} | {row['cost']:+.4f} | {row['fraction']:.2f}x |"
                for row in measured["groups"]
            ),
            "",
        ]
    return lines


def _held_back(layer: Mapping[str, Any]) -> str:
    if layer["kept_float"]:
        return "float"
    return "int8 groups" if layer.get("kept_8bit") else ""


def size_ratio(base: int | None, size: int) -> str:
    """``"3.6x smaller"``, ``"1.4x larger"`` or ``"about the same"`` (within 5%) against ``base`` bytes."""
    if not base or not size:
        return "n/a"
    if 0.95 <= size / base <= 1.05:
        return "about the same"
    if size < base:
        return f"{base / size:.1f}x smaller"
    if size > base:
        return f"{size / base:.1f}x larger"
    return "1x"


def write_report(report: Mapping[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory`` (atomically) and return both paths."""
    directory = Path(directory)
    json_path = atomic_write_bytes(directory / "report.json", json.dumps(report, indent=2, default=_plain).encode())
    markdown_path = atomic_write_bytes(directory / "report.md", to_markdown(report).encode())
    return json_path, markdown_path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


#: Every metric :func:`headline` can give: declared to TensorBoard's HParams plugin when fit starts, because the
#: plugin lists only the metrics named in a run's first hyperparameter summary.
HEADLINE_METRICS = (
    "report/sparsity",
    "report/int8_onnx_size_ratio",
    "report/int4_onnx_size_ratio",
    "report/sparse_size_ratio",
    "report/int8_speedup_batch1",
    "report/int8_speedup_validation_batch",
    "report/int4_decode_speedup_batch1",
    "report/accuracy/dense start",
    "report/accuracy/float weights",
    "report/accuracy/fake-quant (PyTorch)",
    "report/accuracy/ORT int8",
    "report/accuracy/ORT int4",
    "report/accuracy/sparse artifact (reloaded)",
)


def speedup_spreads(report: Mapping[str, Any]) -> dict[str, LatencySpread]:
    """Each int8 speed-up (ORT fp32 / ORT int8) with the bounds its timed rounds allow, by headline key.

    The bounds pair the extremes: fp32's fastest round over int8's slowest, and the reverse. Two runs of one
    config gave 7.71x and 1.71x at batch 1 on a busy machine; the bounds show such a figure for what it is.
    """
    spreads = {}
    ranges = report.get("latency_range_ms", {})
    for batch, row in report.get("latency_ms", {}).items():
        if "ORT fp32" not in row or "ORT int8" not in row:
            continue
        key = "report/int8_speedup_batch1" if batch == "batch 1" else "report/int8_speedup_validation_batch"
        fp32 = ranges.get(batch, {}).get("ORT fp32", [row["ORT fp32"]] * 2)
        int8 = ranges.get(batch, {}).get("ORT int8", [row["ORT int8"]] * 2)
        spreads[key] = LatencySpread(fp32[0] / int8[1], row["ORT fp32"] / row["ORT int8"], fp32[1] / int8[0])
    return spreads


def latency_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Every latency with its spread, as scalars: min/median/max per runner, and each speed-up with a noise flag.

    Logged beside :func:`headline`, under their own tags, so that the HParams table (which reads the headline tags)
    never shows a ratio without its spread nearby.
    """
    metrics: dict[str, float] = {}
    ranges = report.get("latency_range_ms", {})
    for batch, row in report.get("latency_ms", {}).items():
        for name, median in row.items():
            low, high = ranges.get(batch, {}).get(name, [median, median])
            tag = f"report/latency_ms/{batch}/{name}"
            metrics.update({f"{tag}/min": low, f"{tag}/median": median, f"{tag}/max": high})
    for key, spread in speedup_spreads(report).items():
        tag = key.replace("report/", "report/latency_ms/", 1)
        metrics.update({f"{tag}/min": spread.minimum, f"{tag}/median": spread.median, f"{tag}/max": spread.maximum})
        metrics[f"{tag}/noisy"] = float(spread.noisy)
    return metrics | generation_metrics(report)


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """The figures worth comparing across runs (TensorBoard HParams metrics).

    A speed-up whose timed rounds allow figures more than :data:`NOISY_SPREAD` apart is left out (it stays NaN in
    the HParams table); :func:`latency_metrics` logs it with its bounds and a noise flag.
    """
    figures: dict[str, float] = {"report/sparsity": report["model"]["sparsity"]}
    sizes = report.get("sizes", {})
    base = sizes.get("fp32 state dict", {}).get("bytes")
    for name, key in (
        ("int8 ONNX", "report/int8_onnx_size_ratio"),
        ("int4 ONNX", "report/int4_onnx_size_ratio"),
        ("sparse int8", "report/sparse_size_ratio"),
    ):
        if base and name in sizes:
            figures[key] = base / sizes[name]["bytes"]
    for key, spread in speedup_spreads(report).items():
        if not spread.noisy:
            figures[key] = spread.median
    decode = generation_metrics(report).get("report/generation/batch 1/ORT int4/decode_speedup")
    if decode is not None:
        figures["report/int4_decode_speedup_batch1"] = decode
    for name, entry in report.get("quality", {}).items():
        if "accuracy" in entry:
            figures[f"report/accuracy/{name}"] = entry["accuracy"]
    return figures

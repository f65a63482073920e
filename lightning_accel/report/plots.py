"""The report's plots (matplotlib, the optional ``report`` extra), drawn off-screen and saved as PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_accel._core.files import atomic_target


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: draw into files
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: Mapping[str, Any], history: Mapping[str, Any], directory: str | Path) -> dict[str, Any]:
    """Draw the report's figures and save each as ``<directory>/<name>.png``.

    Returns:
        Figures by name (still open, so the caller can also log them to TensorBoard; close them afterwards).
    """
    plt = _pyplot()
    directory = Path(directory)
    figures: dict[str, Any] = {}

    steps = history.get("steps", [])
    if steps and history.get("sparsity_target"):
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(steps, history["sparsity_target"], label="schedule (target)")
        axis.plot(steps, history["sparsity_actual"], "--", label="measured zeros")
        axis.set(xlabel="optimizer step", ylabel="sparsity", title="Sparsity over training", ylim=(0, 1))
        axis.legend()
        figures["sparsity_schedule"] = figure

    per_layer = report["model"]["per_layer_sparsity"]
    if per_layer:
        figure, axis = plt.subplots(figsize=(6, 0.4 * len(per_layer) + 1.5))
        axis.barh(list(per_layer), list(per_layer.values()))
        axis.set(xlabel="fraction of zero weights", title="Sparsity per layer", xlim=(0, 1))
        axis.invert_yaxis()
        figures["sparsity_per_layer"] = figure

    panels = [
        ("size (bytes)", {name: entry["bytes"] for name, entry in report.get("sizes", {}).items()}),
        ("latency, batch 1 (ms)", next(iter(report.get("latency_ms", {}).values()), {})),
        ("accuracy", {n: e["accuracy"] for n, e in report.get("quality", {}).items() if "accuracy" in e}),
    ]
    panels = [(title, values) for title, values in panels if values]
    if panels:
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for axis, (title, values) in zip(axes[0], panels, strict=True):
            axis.barh(list(values), list(values.values()))
            axis.set_title(title)
            axis.invert_yaxis()
        figure.tight_layout()
        figures["artifacts"] = figure

    scales = history.get("activation_scales", {})
    if steps and scales:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for name, values in list(scales.items())[:12]:
            axis.plot(steps[-len(values) :], values, label=name)
        axis.set(xlabel="optimizer step", ylabel="scale (range / 255)", title="Activation ranges", yscale="log")
        axis.legend(fontsize="x-small")
        figures["activation_ranges"] = figure

    for name, figure in figures.items():
        with atomic_target(directory / f"{name}.png") as temporary:
            figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    return figures


def close(figures: Mapping[str, Any]) -> None:
    """Release the figures' memory."""
    plt = _pyplot()
    for figure in figures.values():
        plt.close(figure)

"""Building the report: every artifact measured (sizes, latency, quality) from what the deploy stage built."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_accel._core.inputs import batch_picker, run_model
from lightning_accel._core.lightning import validation_loader
from lightning_accel._core.logging import add_hyperparameters, log_text
from lightning_accel._core.stage import Contribution
from lightning_accel.deploy.stage import build_artifacts, contributions_of
from lightning_accel.export.check import onnx_feed, onnx_outputs, ort_session
from lightning_accel.export.sparse import load_sparse_
from lightning_accel.quantization.calibration import batch_size
from lightning_accel.report.generation import measure_generation
from lightning_accel.report.markdown import (
    headline,
    latency_metrics,
    to_markdown,
)
from lightning_accel.report.measure import (
    NOISY_SPREAD,
    count_macs,
    cpu_description,
    describe_cpu,
    evaluate,
    latency_spreads,
    weight_sparsity,
)


def predictor(model: torch.nn.Module) -> Any:
    """A function that runs ``model`` on a batch input without gradients (for latency and quality)."""

    @torch.no_grad()
    def predict(inputs: Any) -> torch.Tensor:
        return run_model(model, inputs)

    return predict


def example_and_batch(pl_module: LightningModule, loader: Any, picker: Any = None) -> tuple[Any, Any]:
    """(an input at batch 1, a validation-batch input): from ``example_input_array`` and the first batch.

    ``picker`` takes the input out of a batch (``batch_picker``): a dict batch gives the keys the forward takes.
    """
    picker = picker or batch_picker(None, pl_module)
    batch_input = None
    if loader is not None:
        try:
            batch_input = picker(next(iter(loader)))
        except StopIteration:
            batch_input = None
    example = pl_module.example_input_array
    if example is None and isinstance(batch_input, torch.Tensor):
        example = batch_input[:1]
    elif (
        example is None
        and isinstance(batch_input, dict)
        and all(isinstance(v, torch.Tensor) for v in batch_input.values())
    ):
        example = {k: v[:1] for k, v in batch_input.items()}  # keyword inputs, one sample (T5, BERT)
    return example, batch_input


def build_report(
    trainer: Trainer | None,
    pl_module: LightningModule,
    directory: str | Path,
    latency: bool = True,
    max_batches: int = 20,
    dense_start: dict[str, float] | None = None,
    loader: Any = None,
    contributions: Sequence[Any] | None = None,
    deployment: Any = None,
    model_input: str | int | list[str] | None = None,
    generation: bool | None = None,
) -> dict[str, Any]:
    """Measure every artifact of ``pl_module``: sizes, latency and quality. The deploy stage builds them.

    Args:
        trainer: The trainer (for its validation data and callbacks), or ``None``.
        pl_module: The trained model (plain, or prepared by QAT/PTQ).
        directory: Where the artifacts nobody else placed go.
        latency: Measure latency.
        max_batches: Validation batches to score on.
        dense_start: The scores recorded before training started, if any.
        loader: Validation batches; by default the trainer's validation dataloader.
        contributions: What the techniques contribute (``lightning_accel.deploy.Contribution``); by default, asked
            of the trainer's callbacks.
        deployment: Artifacts already built for this fit (the deploy stage's records); then nothing is built here.
        model_input: Which part of a batch is the model's input (see :class:`AccelerationReport`).
        generation: Time greedy generation of a causal LM (``None``: when ``latency`` is on).
    """
    loader = loader if loader is not None else (validation_loader(trainer) if trainer is not None else None)
    picker = batch_picker(model_input, pl_module)
    example, batch_input = example_and_batch(pl_module, loader, picker)
    if deployment is None:
        if contributions is None:
            asked = contributions_of(trainer.callbacks, trainer, pl_module) if trainer is not None else []
            contributions = [c for c in asked if c.report_directory is None]
        report_part = Contribution(owner="AccelerationReport", report_directory=Path(directory), example=example)
        precision = str(trainer.precision) if trainer is not None else "32-true"
        deployment = build_artifacts(pl_module, [*contributions, report_part], example, precision=precision)
    generation = latency if generation is None else generation
    report = measure(deployment, loader, batch_input, latency, max_batches, dense_start, picker, generation)
    callbacks = trainer.callbacks if trainer is not None else []
    budgets = [c for c in callbacks if getattr(c, "budget", None)]
    if budgets:  # what a quality budget (max_quality_loss) measured and kept float while the artifacts were built
        report["quality_budget"] = {type(c).__name__: c.budget.as_dict() for c in budgets}
    measured = [c for c in callbacks if getattr(c, "channel_sensitivity", None)]
    if measured:  # what each channel group's removal alone cost, and the share of the target it was given
        report["channel_sensitivity"] = {type(c).__name__: c.channel_sensitivity for c in measured}
    return report


def measure(
    deployment: Any,
    loader: Any,
    batch_input: Any,
    latency: bool = True,
    max_batches: int = 20,
    dense_start: dict[str, float] | None = None,
    pick_input: Any = None,
    generation: bool = False,
) -> dict[str, Any]:
    """The report of a deployment: every artifact listed once, with its size, latency and quality."""
    float_model = deployment.float_model
    notes = list(deployment.notes)
    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "precision": deployment.precision,
        "model": weight_sparsity(float_model, deployment.pruned_parameters),
        "sizes": {},
        "latency_ms": {},
        "quality": {},
        "notes": notes,
    }
    artifacts = deployment.artifacts
    for kind, artifact in artifacts.items():
        report["sizes"][kind] = {
            "path": str(artifact.path),
            "bytes": artifact.bytes,
            "requested_by": list(artifact.requested_by),
            "checked_against": artifact.checked_against,
        }
    example = deployment.example
    if example is not None:
        report["model"]["macs"] = count_macs(float_model, example)
        if deployment.slim_model is not None:
            report["model"]["slim_macs"] = count_macs(deployment.slim_model, example)
            report["model"]["slim_parameters"] = sum(p.numel() for p in deployment.slim_model.parameters())
    sessions: dict[str, Any] = {}
    for kind, runtime in QUANTIZED_RUNTIMES:
        if kind in artifacts:
            sessions[runtime] = ort_session(artifacts[kind].path)

    if latency and example is not None:
        _measure_latency(report, float_model, sessions, example, batch_input)
    if generation:
        _measure_generation(report, deployment, batch_input)

    if loader is None:
        notes.append("No validation dataloader: quality not measured.")
    else:
        predictors = {"float weights": predictor(float_model)}
        if deployment.evaluated_int8 is not None:
            predictors["fake-quant (PyTorch)"] = predictor(deployment.evaluated_int8)
        for runtime in ("ORT int8", "ORT int4"):
            if runtime in sessions:
                predictors[runtime] = lambda inputs, session=sessions[runtime]: onnx_outputs(session, inputs)[0]
        if "sparse int8" in artifacts:
            sparse_model = load_sparse_(copy.deepcopy(float_model), artifacts["sparse int8"].path).eval()
            predictors["sparse artifact (reloaded)"] = predictor(sparse_model)
        try:
            scores = evaluate(predictors, loader, max_batches, "float weights", pick_input)
        except Exception as error:  # the batch holds other inputs than the forward takes (T5 without decoder ids)
            notes.append(_input_note("Quality not measured", error))
            return report
        report["quality"] = ({"dense start": dense_start} if dense_start else {}) | scores
        report["quality_reference"] = "float weights"
    return report


#: The ONNX artifacts the report runs, by kind, and the runtime column each one gets.
QUANTIZED_RUNTIMES = (
    ("fp32 ONNX", "ORT fp32"),
    ("slim fp32 ONNX", "ORT slim fp32"),
    ("int8 ONNX", "ORT int8"),
    ("int4 ONNX", "ORT int4"),
)


def _measure_generation(report: dict[str, Any], deployment: Any, batch_input: Any) -> None:
    """For a causal LM: greedy generation speed of its decoders (``report["generation"]``), or a note why not."""
    try:
        generation = measure_generation(deployment, batch_input)
    except Exception as error:  # a decoder that does not export is a finding for the notes, not a lost report
        report["notes"].append(f"Generation speed not measured: {type(error).__name__}: {error}")
        return
    if generation is not None:
        report["generation"] = generation
        report["notes"].append(
            "Generation: greedy decoding with the KV cache in ONNX Runtime (one graph, past keys/values in and out); "
            "prefill is the first call over the prompt, tokens/s counts every sequence of the batch; medians of "
            "alternating rounds."
        )


def _input_note(what: str, error: Exception) -> str:
    return (
        f"{what}: the model does not run on the input picked from a validation batch ({type(error).__name__}: "
        f"{error}). `AccelerationReport(model_input=...)` names the batch keys (or index) the model takes; the "
        "example input (`example_input_array`, a dict for keyword inputs) is used for everything else."
    )


def _measure_latency(
    report: dict[str, Any], float_model: torch.nn.Module, sessions: dict[str, Any], example: Any, batch_input: Any
) -> None:

    batches = {"batch 1": example}
    predict = predictor(float_model)
    if batch_size(batch_input) > 1:
        try:
            predict(batch_input)
            batches[f"batch {batch_size(batch_input)}"] = batch_input
        except Exception as error:
            report["notes"].append(_input_note("Latency at the validation batch size not measured", error))
    for label, inputs in batches.items():
        runners = {"PyTorch eager fp32": lambda inputs=inputs: predict(inputs)}
        for name, session in sessions.items():
            feed = onnx_feed(session, inputs)
            runners[name] = lambda session=session, feed=feed: session.run(None, feed)
        repeats = 50 if label == "batch 1" else 10
        spreads = latency_spreads(runners, repeats=repeats, rounds=5)
        report["latency_ms"][label] = {name: spread.median * 1e3 for name, spread in spreads.items()}
        report.setdefault("latency_range_ms", {})[label] = {
            name: [spread.minimum * 1e3, spread.maximum * 1e3] for name, spread in spreads.items()
        }
        noisy = [name for name, spread in spreads.items() if spread.noisy]
        if noisy:
            report.setdefault("latency_noisy", {})[label] = noisy
            ranges = "; ".join(
                f"{name} min/median/max {spreads[name].minimum * 1e3:.3f}/{spreads[name].median * 1e3:.3f}/"
                f"{spreads[name].maximum * 1e3:.3f} ms"
                for name in noisy
            )
            report["notes"].append(
                f"Noisy latency at {label}: the timed rounds kept disagreeing by more than "
                f"{NOISY_SPREAD:.0%} ({ranges}); the machine was busy, so read these ratios with care."
            )
    report["notes"].append(
        f"Latency: median of at least 5 interleaved rounds after warm-up (more while the rounds disagree), on "
        f"{describe_cpu(report['cpu'])}. int8 speed depends on the CPU's int8 instructions (VNNI/AMX); the size "
        "gain holds on every CPU."
    )


def print_table(report: dict[str, Any]) -> None:
    """Print the report's Markdown to the console (rich when installed)."""
    try:
        from rich.console import Console
        from rich.markdown import Markdown
    except ImportError:
        print(to_markdown(report))
        return
    Console().print(Markdown(to_markdown(report)))


def log_to_loggers(
    trainer: Trainer, pl_module: LightningModule, report: dict[str, Any], figures: dict[str, Any]
) -> None:
    """Text, scalars, images and HParams metrics for every logger that takes them."""
    figures_logged = False
    metrics = headline(report)
    log_text(trainer, "acceleration_report", to_markdown(report))
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, **latency_metrics(report)}, step=trainer.global_step)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            for name, figure in figures.items():
                experiment.add_figure(f"acceleration_report/{name}", figure, trainer.global_step, close=False)
                figures_logged = True
    add_hyperparameters(trainer, pl_module, {}, metrics)
    if figures and not figures_logged and trainer.loggers:
        rank_zero_info("AccelerationReport: the loggers take no images; the plots are PNG files in the report folder")

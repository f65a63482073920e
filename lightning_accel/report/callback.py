"""The AccelerationReport callback: at the end of fit, what every technique gained and cost, in one place."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.logging import add_hyperparameters, log_text
from lightning_accel._core.stage import Contribution, DeployingCallback, built_deployment
from lightning_accel._core.validation import validate_bool, validate_int
from lightning_accel.deploy.stage import build_artifacts, contributions_of
from lightning_accel.export.check import onnx_feed, onnx_outputs
from lightning_accel.export.sparse import load_sparse_
from lightning_accel.pruning import MagnitudePruning, tensor_sparsity
from lightning_accel.quantization.calibration import batch_picker, batch_size, run_model
from lightning_accel.quantization.prepare import activation_quantizers, float_copy, is_prepared
from lightning_accel.quantization.settings import check_model_input
from lightning_accel.report.measure import (
    HEADLINE_METRICS,
    NOISY_SPREAD,
    count_macs,
    cpu_description,
    describe_cpu,
    evaluate,
    headline,
    latency_metrics,
    latency_spreads,
    ort_session,
    to_markdown,
    weight_sparsity,
    write_report,
)
from lightning_accel.report.plots import close, plot_report


class AccelerationReport(DeployingCallback):
    """Measure the trained model and its artifacts at the end of fit, and report size, speed and quality together.

    On rank 0 it writes, into ``directory``: the fp32 state dict, a half-precision state dict, the fp32 ONNX model,
    the int8 ONNX model (when QAT or PTQ prepared the model), and the compressed sparse int8 artifact; then
    ``report.json`` and ``report.md`` with:

    - parameters, the zero fraction of the Linear/Conv weights (global and per layer), the training precision;
    - the size on disk of each artifact (and of files the other callbacks wrote);
    - CPU latency of PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 at batch 1 and at the validation
      batch size: medians of interleaved timed runs after warm-up, with the CPU and its int8 instructions named;
    - quality on the validation data of the model before training started (the dense starting point), the float
      weights, the fake-quant model, the ONNX Runtime int8 model and the sparse artifact reloaded: accuracy for
      (input, class) batches, and agreement and SNR against the float weights.

    The same table is printed to the console, logged to TensorBoard as text, scalars (``report/*``) and plot
    images, and its headline figures become HParams metrics, so runs can be compared.

    Args:
        directory: Where to write; relative paths are under the run's log directory (default ``"report"``).
        latency: Measure latency (needs the ``onnx`` extra for the ONNX Runtime rows).
        max_batches: Validation batches to score quality on.
        plots: Draw the plots (needs the ``report`` extra: matplotlib).
        model_input: Which part of a validation batch is the model's input, as QAT and PTQ take it: ``None`` (the
            first element of a tuple/list batch; for a dict batch, the keys the module's ``forward`` takes, so
            ``labels`` stay out), a dict key, a list of dict keys or a tuple index.

    Example:
        >>> callbacks = [MagnitudePruning(0.9), QuantizationAwareTraining(), AccelerationReport()]
        >>> trainer = Trainer(callbacks=callbacks)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike = "report",
        latency: bool = True,
        max_batches: int = 20,
        plots: bool = True,
        model_input: str | int | list[str] | None = None,
    ) -> None:
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise TypeError(f"`directory` must be a path (str or os.PathLike), got {directory!r}")
        self.directory = os.fspath(directory)
        self.latency = validate_bool("latency", latency)
        self.max_batches = validate_int("max_batches", max_batches, 1)
        self.plots = validate_bool("plots", plots)
        check_model_input(model_input)
        self.model_input = model_input
        self.report: dict[str, Any] | None = None
        self.history: dict[str, Any] = {}
        self._dense_start: dict[str, float] | None = None
        self._resolved: Path | None = None

    @property
    def declared_metrics(self) -> tuple[str, ...]:
        """The metrics the report logs at the end of fit (named to the HParams plugin at fit start)."""
        return HEADLINE_METRICS

    # --- hooks --------------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the directory on every rank (the log directory is agreed between ranks)."""
        self._resolved = resolve_artifact_path(trainer, self.directory)
        if stage == "fit":
            probe_writable("AccelerationReport", "directory", self._resolved, directory=True)

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """What the report asks of the deploy stage: every artifact, those nobody else placed in its folder."""
        picker = batch_picker(self.model_input, pl_module)
        example = (
            _example(pl_module, _validation_loader(trainer), picker)[0]
            if pl_module.example_input_array is None
            else None
        )
        return Contribution(owner="AccelerationReport", report_directory=self._resolved, example=example)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the model as training starts: the dense starting point that the report compares against."""
        super().on_fit_start(trainer, pl_module)  # the deploy stage: a new fit
        add_hyperparameters(trainer, pl_module, {})  # names the report's metrics for TensorBoard's HParams tab
        self.history = {"steps": [], "sparsity_target": [], "sparsity_actual": [], "activation_scales": {}}
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        loader = _validation_loader(trainer)
        if loader is None:
            return
        model = float_copy(pl_module).eval().float()  # bf16-true trains in bf16; inputs arrive in fp32
        picker = batch_picker(self.model_input, pl_module)
        scores = evaluate({"dense start": _predictor(model)}, loader, self.max_batches, "dense start", picker)
        self._dense_start = scores.get("dense start")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the sparsity schedule, the measured sparsity and the activation ranges at the log interval."""
        if not trainer.is_global_zero or trainer.global_step % trainer.log_every_n_steps:
            return
        pruning = next((c for c in trainer.callbacks if isinstance(c, MagnitudePruning)), None)
        if pruning is not None and pruning.masks:
            self.history["steps"].append(trainer.global_step)
            self.history["sparsity_target"].append(pruning.sparsity_at(trainer.global_step))
            params = dict(pl_module.named_parameters())
            self.history["sparsity_actual"].append(tensor_sparsity({n: params[n] for n in pruning.masks}))
        elif is_prepared(pl_module):
            self.history["steps"].append(trainer.global_step)
        for name, quantizer in activation_quantizers(pl_module).items():
            if quantizer.calibrated:
                self.history["activation_scales"].setdefault(name, []).append(float(quantizer.scale))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build, write, print and log the report (rank 0), from the artifacts the deploy stage built."""
        super().on_fit_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        if trainer.fast_dev_run:
            rank_zero_warn("AccelerationReport: fast_dev_run, so no report is written")
            return
        try:
            deployment = built_deployment(trainer)
            self.report = build_report(
                trainer,
                pl_module,
                self._resolved,
                self.latency,
                self.max_batches,
                self._dense_start,
                deployment=deployment,
                model_input=self.model_input,
            )
        except Exception as error:  # the trained model and its checkpoints are safe: never lose a run to the report
            rank_zero_warn(
                f"AccelerationReport: the report could not be built ({type(error).__name__}: {error}); the trained "
                "model and checkpoints are unaffected. `lightning-accel export --ckpt_path ...` can retry it."
            )
            return
        json_path, markdown_path = write_report(self.report, self._resolved)
        _print_table(self.report)
        figures = self._plot()
        _log_to_loggers(trainer, pl_module, self.report, figures)
        if figures:
            close(figures)
        rank_zero_info(f"AccelerationReport: wrote {markdown_path} and {json_path.name}")

    def _plot(self) -> dict[str, Any]:
        if not self.plots:
            return {}
        try:
            return plot_report(self.report, self.history, self._resolved / "plots")
        except ImportError:
            self.report.setdefault("notes", []).append("No plots: matplotlib is not installed (extra `report`).")
            return {}


# --- building the report -----------------------------------------------------------------------------------------


def _validation_loader(trainer: Trainer) -> Any:
    """The first validation dataloader; before the validation loop has loaded it, the data module's."""
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        try:
            loaders = trainer.datamodule.val_dataloader()
        except (NotImplementedError, AttributeError):  # a data module without validation data
            loaders = None
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    return loaders


def _predictor(model: torch.nn.Module) -> Any:
    @torch.no_grad()
    def predict(inputs: Any) -> torch.Tensor:
        return run_model(model, inputs)

    return predict


def _example(pl_module: LightningModule, loader: Any, picker: Any = None) -> tuple[Any, Any]:
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
        deployment: Artifacts already built for this fit (``deploy_for_trainer``); then nothing is built here.
        model_input: Which part of a batch is the model's input (see :class:`AccelerationReport`).
    """
    loader = loader if loader is not None else (_validation_loader(trainer) if trainer is not None else None)
    picker = batch_picker(model_input, pl_module)
    example, batch_input = _example(pl_module, loader, picker)
    if deployment is None:
        if contributions is None:
            asked = contributions_of(trainer.callbacks, trainer, pl_module) if trainer is not None else []
            contributions = [c for c in asked if c.report_directory is None]
        report_part = Contribution(owner="AccelerationReport", report_directory=Path(directory), example=example)
        precision = str(trainer.precision) if trainer is not None else "32-true"
        deployment = build_artifacts(pl_module, [*contributions, report_part], example, precision=precision)
    return measure(deployment, loader, batch_input, latency, max_batches, dense_start, picker)


def measure(
    deployment: Any,
    loader: Any,
    batch_input: Any,
    latency: bool = True,
    max_batches: int = 20,
    dense_start: dict[str, float] | None = None,
    pick_input: Any = None,
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
    for kind, runtime in (("fp32 ONNX", "ORT fp32"), ("slim fp32 ONNX", "ORT slim fp32"), ("int8 ONNX", "ORT int8")):
        if kind in artifacts:
            sessions[runtime] = ort_session(artifacts[kind].path)

    if latency and example is not None:
        _measure_latency(report, float_model, sessions, example, batch_input)

    if loader is None:
        notes.append("No validation dataloader: quality not measured.")
    else:

        predictors = {"float weights": _predictor(float_model)}
        if deployment.evaluated_int8 is not None:
            predictors["fake-quant (PyTorch)"] = _predictor(deployment.evaluated_int8)
        if "ORT int8" in sessions:
            session = sessions["ORT int8"]
            predictors["ORT int8"] = lambda inputs: onnx_outputs(session, inputs)[0]
        if "sparse int8" in artifacts:
            sparse_model = load_sparse_(copy.deepcopy(float_model), artifacts["sparse int8"].path).eval()
            predictors["sparse artifact (reloaded)"] = _predictor(sparse_model)
        try:
            scores = evaluate(predictors, loader, max_batches, "float weights", pick_input)
        except Exception as error:  # the batch holds other inputs than the forward takes (T5 without decoder ids)
            notes.append(_input_note("Quality not measured", error))
            return report
        report["quality"] = ({"dense start": dense_start} if dense_start else {}) | scores
        report["quality_reference"] = "float weights"
    return report


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
    predict = _predictor(float_model)
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


def _print_table(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.markdown import Markdown
    except ImportError:
        print(to_markdown(report))
        return
    Console().print(Markdown(to_markdown(report)))


def _log_to_loggers(
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

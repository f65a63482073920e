"""The AccelerationReport callback: at the end of fit, what every technique gained and cost, in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.inputs import batch_picker
from lightning_accel._core.lightning import validation_loader
from lightning_accel._core.logging import add_hyperparameters
from lightning_accel._core.stage import Contribution, DeployingCallback, built_deployment
from lightning_accel._core.validation import validate_bool, validate_int
from lightning_accel.pruning import MagnitudePruning, tensor_sparsity
from lightning_accel.quantization.prepare import activation_quantizers, float_copy, is_prepared
from lightning_accel.quantization.settings import check_model_input
from lightning_accel.report.build import (
    build_report,
    example_and_batch,
    log_to_loggers,
    predictor,
    print_table,
)
from lightning_accel.report.markdown import (
    HEADLINE_METRICS,
    write_report,
)
from lightning_accel.report.measure import (
    evaluate,
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
        generation: For a model holding a Hugging Face causal LM, time greedy generation with the KV cache in ONNX
            Runtime (fp32 and the int4 decoder, batch 1 and 8: prefill ms, decode tokens/s). ``None`` (default):
            whenever ``latency`` is on.
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
        generation: bool | None = None,
    ) -> None:
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise TypeError(f"`directory` must be a path (str or os.PathLike), got {directory!r}")
        self.directory = os.fspath(directory)
        self.latency = validate_bool("latency", latency)
        self.generation = self.latency if generation is None else validate_bool("generation", generation)
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
            example_and_batch(pl_module, validation_loader(trainer), picker)[0]
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
        loader = validation_loader(trainer)
        if loader is None:
            return
        model = float_copy(pl_module).eval().float()  # bf16-true trains in bf16; inputs arrive in fp32
        picker = batch_picker(self.model_input, pl_module)
        scores = evaluate({"dense start": predictor(model)}, loader, self.max_batches, "dense start", picker)
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
                generation=self.generation,
            )
        except Exception as error:  # the trained model and its checkpoints are safe: never lose a run to the report
            rank_zero_warn(
                f"AccelerationReport: the report could not be built ({type(error).__name__}: {error}); the trained "
                "model and checkpoints are unaffected. `lightning-accel export --ckpt_path ...` can retry it."
            )
            return
        json_path, markdown_path = write_report(self.report, self._resolved)
        print_table(self.report)
        figures = self._plot()
        log_to_loggers(trainer, pl_module, self.report, figures)
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

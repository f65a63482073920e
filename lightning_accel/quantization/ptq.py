"""The PostTrainingQuantization callback: calibrate an int8 copy at the end of fit; the deploy stage exports it."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.inputs import batch_picker, example_input, run_model
from lightning_accel._core.lightning import configure_model_early, validation_loader
from lightning_accel._core.modules import module_copy
from lightning_accel._core.stage import Contribution, DeployingCallback
from lightning_accel._core.validation import validate_int
from lightning_accel.quantization.budget import BudgetResult, quantize_within_budget, validate_budget
from lightning_accel.quantization.budget_int4 import BudgetData, weight_only_within_budget
from lightning_accel.quantization.calibration import (
    calibrate_,
    check_batches,
    classification_batches,
)
from lightning_accel.quantization.fake_quant import DEFAULT_WEIGHT_BITS
from lightning_accel.quantization.settings import (
    FULL_RANGE_NOTE,
    Int8Settings,
    check_export_path,
    check_model_input,
    check_on_mismatch,
    dry_run_export,
    int8_probe,
    require_example_input,
)
from lightning_accel.quantization.weight_only import dry_run_weight_only, weight_only_settings


class PostTrainingQuantization(DeployingCallback):
    """At the end of fit, calibrate an int8 copy of the trained model on training batches and export it to ONNX.

    The trained model is not changed. Use it without ``QuantizationAwareTraining`` when quantizing after the fact
    is accurate enough; it gives the same kind of int8 ONNX model. Everything the export needs is tried at setup and
    on the first training batch, so a problem shows before training, not after it.

    Args:
        export_path: Where rank 0 writes the int8 ONNX model (needs the module's ``example_input_array``).
        calibration_batches: How many training batches calibrate the activation ranges.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
        model_input: Which part of a batch is the model's input: ``None`` (the first element of a tuple/list
            batch; for a dict batch, the keys the module's ``forward`` takes, so ``labels`` stay out), a dict key,
            a list of dict keys (passed as keywords) or a tuple index.
        weight_bits: 7 (default, exact in ONNX Runtime on every CPU) or 8 (VNNI/AMX, ARM, TensorRT targets),
            per output channel; or 4: weight-only group-wise int4 for language models (see ``group_size``,
            ``method``), exported as ONNX Runtime ``MatMulNBits`` with float activations (W4A16).
        on_mismatch: What to do when the exported file does not reproduce the PyTorch model: ``"warn"``,
            ``"raise"`` or ``"ignore"``.
        outputs: Where layer outputs are quantized: ``"graph"`` (default: decided by what consumes each Linear
            output, traced on the first calibration batch), ``"auto"`` (the type rule) or ``"all"``.
        activations: ``None`` (default): ``"float"`` with ``weight_bits=4``, else ``"static"``. ``"float"``: weights
            only, in groups (``MatMulNBits``, 4 or 8 bits), activations and every other layer stay float; the
            runtime's fp32-accuracy kernel computes exactly what PyTorch evaluates. With ``weight_bits=4``,
            ``"dynamic"`` rounds each token's inputs to int8 per group inside the kernel (8da4w, ``accuracy_level=4``,
            modelled exactly). ``"static"``: per-tensor uint8 ranges, observed and stored.
            ``"dynamic"``: every Linear quantizes its input at that input's own range at run time (ONNX
            ``DynamicQuantizeLinear``, the scheme of ONNX Runtime's ``quantize_dynamic``; fused by ONNX Runtime into
            ``DynamicQuantizeMatMul``),
            and its output stays float. The scale spans the whole input tensor, so it depends on the batch; the
            export check runs the same batches in PyTorch and ONNX Runtime. Convs keep static activations.
        embeddings: ``"float"`` (default) or ``"int8"``: every ``nn.Embedding`` not excluded is stored in int8
            with one scale per row (a 30522 x 384 word table: 46.9 MB fp32, 11.7 MB int8), fake-quantized alike.
        group_size: Weight-only groups: values per scale along each row's inputs (16, 32, 64, 128, 256).
        method: Weight-only rounding: ``"rtn"`` (round to nearest) or ``"gptq"`` (data-aware: each layer's error
            on ``calibration_batches`` training batches is compensated column by column, GPTQ).
        symmetric: Weight-only groups without a stored zero point (``True``) or with one per group.
        max_quality_loss: A quality budget, int8 or int4 (``None``: quantize every selected layer). What the model
            may lose on validation batches: accuracy as a fraction (0.01 = one point) where batches carry labels,
            perplexity for a causal LM, else one minus the cosine to the float model's outputs. Each layer's
            quantization is scored alone (one calibration), and the most sensitive layers stay float until the
            whole model, measured again, is within the budget; the final figure and every layer kept float, with
            its cost, are logged and put in the report's notes, and a budget missed is a warning.

    Example (a decoder to int4 with GPTQ, in YAML: ``ptq: {export_path: lm.int4.onnx, weight_bits: 4, method: gptq}``):
        >>> PostTrainingQuantization("lm.int4.onnx", weight_bits=4, group_size=32, method="gptq")  # doctest: +SKIP
    """

    def __init__(
        self,
        export_path: str | os.PathLike,
        calibration_batches: int = 32,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fold_bn: bool = True,
        model_input: str | int | list[str] | None = None,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        on_mismatch: str = "warn",
        outputs: Literal["graph", "auto", "all"] = "graph",
        activations: Literal["static", "dynamic", "float"] | None = None,
        embeddings: Literal["float", "int8"] = "float",
        group_size: int = 32,
        method: Literal["rtn", "gptq"] = "rtn",
        symmetric: bool = True,
        max_quality_loss: float | None = None,
    ) -> None:
        if export_path is None:
            raise ValueError("`export_path` must be a path ending in '.onnx', got None")
        self.export_path = check_export_path(export_path)
        calibration_batches = validate_int("calibration_batches", calibration_batches, 1)
        #: Weight-only group-wise settings (``weight_bits=4`` or ``activations="float"``), else ``None``.
        self.weight_only = weight_only_settings(
            weight_bits, activations, embeddings, group_size, method, symmetric, include, exclude
        )
        #: The int8 preparation settings, validated once and taken whole by prepare, calibrate and the dry runs.
        self.settings = Int8Settings(
            include,
            exclude,
            fold_bn,
            DEFAULT_WEIGHT_BITS if self.weight_only else weight_bits,
            outputs,
            "static" if self.weight_only or activations is None else activations,
            embeddings,
        )
        check_model_input(model_input)
        self.model_input = model_input
        self.on_mismatch = check_on_mismatch(on_mismatch)
        self.calibration_batches = calibration_batches
        self.max_quality_loss = validate_budget(max_quality_loss)
        #: What the budget decided and measured at the end of fit (``None`` without a budget).
        self.budget: BudgetResult | None = None
        self._budget_notes: list[str] = []  # filled when the copy is built, read by the report
        #: Where the export goes: ``export_path``, under the run's log directory when relative (set at setup).
        self.resolved_export_path: str | None = None
        self._input_checked = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail early: the example input, the export path and a dry-run export of a calibrated copy."""
        require_example_input(pl_module, type(self).__name__)
        if stage != "fit":
            return
        configure_model_early(trainer, pl_module)  # the dry run copies the model: build lazy layers first
        if self.settings.weight_bits == 8:
            rank_zero_warn(f"PostTrainingQuantization: {FULL_RANGE_NOTE}")
        self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
        probe_writable("PostTrainingQuantization", "export_path", self.resolved_export_path)
        if self.weight_only is not None:
            dry_run_weight_only(pl_module, self.weight_only, example_input(pl_module), type(self).__name__)
        else:
            dry_run_export(pl_module, type(self).__name__, **self.settings.prepare_arguments())
        self._input_checked = False

    def dry_run_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """A copy calibrated on the example input, for the deploy stage to prove the combined exports at fit start."""
        if self.weight_only is not None:
            if self.export_path is None or trainer.fast_dev_run:
                return None
            return Contribution(owner=type(self).__name__, int8_model=lambda: self.weight_only.quantize(pl_module))
        return int8_probe(trainer, pl_module, self)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """On the first batch, check that ``model_input`` picks an input the model runs on, as calibration will."""
        if self._input_checked:
            return
        try:
            inputs = batch_picker(self.model_input, pl_module)(batch)
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                run_model(pl_module, inputs)
            pl_module.train(was_training)
        except Exception as error:
            raise RuntimeError(
                f"PostTrainingQuantization: calibration at the end of fit would fail on this data: the model "
                f"cannot run on the input that `model_input`={self.model_input!r} picks from a "
                f"{type(batch).__name__} batch ({type(error).__name__}: {error}). Set `model_input` to the batch key "
                "or index of the model's input."
            ) from error
        self._input_checked = True

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """What PTQ hands to the deploy stage: a copy calibrated on training batches, and where it goes."""
        if trainer.fast_dev_run:
            rank_zero_warn(
                f"PostTrainingQuantization: fast_dev_run, so the int8 export to {self.resolved_export_path} is skipped"
            )
            return None

        def calibrated_copy() -> nn.Module:
            if self.max_quality_loss is not None:
                return self._within_budget(trainer, pl_module)
            if self.weight_only is not None:
                return self.weight_only.quantize(
                    pl_module,
                    calibration=trainer.train_dataloader,
                    calibration_batches=self.calibration_batches,
                    model_input=self.model_input,
                )
            return calibrate_(
                module_copy(pl_module),
                trainer.train_dataloader,
                self.calibration_batches,
                model_input=self.model_input,
                **self.settings.prepare_arguments(),
            )

        return Contribution(
            owner="PostTrainingQuantization",
            notes=self._budget_notes,
            int8_model=calibrated_copy,
            int8_path=self.resolved_export_path,
            check_inputs=check_batches(trainer, pl_module, batch_picker(self.model_input, pl_module)),
            classification=classification_batches(trainer),
            on_mismatch=self.on_mismatch,
        )

    def _within_budget(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The calibrated copy whose measured loss meets ``max_quality_loss`` (scored on validation batches)."""
        validation = validation_loader(trainer)
        note = ""
        if validation is None:  # scored on training batches instead: said in the notes, not hidden
            validation, note = trainer.train_dataloader, " (no validation data: scored on training batches)"
        options = {"model_input": self.model_input, "calibration_batches": self.calibration_batches}
        if self.weight_only is not None:  # int4 groups: the most sensitive layers stay float
            data = BudgetData(trainer.train_dataloader, validation, **options)
            model, self.budget = weight_only_within_budget(pl_module, self.weight_only, data, self.max_quality_loss)
        else:
            model, self.budget = quantize_within_budget(
                pl_module,
                trainer.train_dataloader,
                validation,
                self.max_quality_loss,
                **options,
                **self.settings.prepare_arguments(),
            )
        self._budget_notes.append(f"PTQ: {self.budget.describe()}{note}.")
        return model

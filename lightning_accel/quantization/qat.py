"""The QuantizationAwareTraining callback: it decides *when*; prepare.py and the deploy stage do the work."""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Literal

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.inputs import batch_picker, example_input
from lightning_accel._core.lightning import TrainingSteps, configure_model_early, refuse_weight_averaging
from lightning_accel._core.logging import add_hyperparameters, log_text, selection_tag
from lightning_accel._core.stage import Contribution, DeployingCallback
from lightning_accel._core.validation import check_state_version, validate_bool
from lightning_accel.quantization.budget import BudgetResult, trained_within_budget, validate_budget
from lightning_accel.quantization.calibration import check_batches, classification_batches
from lightning_accel.quantization.convert import as_evaluated
from lightning_accel.quantization.coverage import log_qat_metrics, selection_summary
from lightning_accel.quantization.fake_quant import DEFAULT_WEIGHT_BITS, ActivationFakeQuant
from lightning_accel.quantization.groupwise_callback import hands_over_to_weight_only, weight_only_driver
from lightning_accel.quantization.phases import (
    PHASE_FLOAT,
    PHASE_OBSERVING,
    known_steps,
    phase_at,
    phase_from_restored_state,
    resolve_qat_steps,
    validate_qat_steps,
)
from lightning_accel.quantization.prepare import activation_quantizers, iter_batch_norms, prepare_qat_, set_qat_phase
from lightning_accel.quantization.progress import CALIBRATION_BATCHES, end_probe, int8_ptq, start_probe
from lightning_accel.quantization.ranges import load_quantizer_state_, quantizer_state, update_ranges_over_ranks
from lightning_accel.quantization.settings import (
    FULL_RANGE_NOTE,
    QAT_STATE_VERSION,
    Int8Settings,
    check_export_path,
    check_model_input,
    check_on_mismatch,
    dry_run_export,
    int8_model_exists,
    int8_probe,
    require_example_input,
    warn_when_starting_from_chance,
)


class QuantizationAwareTraining(DeployingCallback):
    """Train with int8 fake quantization, so that the deployed int8 model keeps the float model's accuracy.

    Static int8: weights symmetric per output channel (7-bit by default, exact in ONNX Runtime on every CPU),
    activations per-tensor affine uint8, observed at the input and output of every selected ``nn.Conv1d/2d/3d`` and
    ``nn.Linear``; biases are rounded to the runtime's int32 grid. Modules are prepared in ``setup`` (before
    checkpoint restore, DDP and optimizers); parameters keep their names and identity and the model's ``forward``
    is untouched. Activation ranges are reduced over DDP ranks every step, so all ranks quantize alike, and
    batches with NaN/inf activations never enter them. Fit never converts the model: with ``export_path`` a
    converted copy is exported at the end of fit and checked in ONNX Runtime. ``validate``/``test``/``predict``
    score the model as deployed: in fit by the step's phase, otherwise by the restored quantizer state. QAT
    fine-tunes: start it from a trained float model (a checkpoint, or a ``start_step`` after float training).

    Args:
        include: Glob patterns over module names to quantize; ``None`` selects every Linear, transposed Linear
            (GPT-2's ``Conv1D``) and ``nn.Conv1d/2d/3d`` (a subclass with its own forward is skipped).
        exclude: Glob patterns over module names to keep in float.
        start_step: Where fake quantization starts; before it the model trains in float. An optimizer step (int) or
            a fraction of the fit's training steps (float in (0, 1], e.g. 0.6), as Lightning's
            ``val_check_interval``.
        freeze_observers_step: Step or fraction from which ranges and weight scales stay fixed (``None``: never).
        freeze_bn_step: Step or fraction from which BatchNorms keep their running statistics (``None``: never).
        fold_bn: Train and export a conv that is directly followed by a BatchNorm with the BatchNorm folded into its
            weight, so that the int8 weights the runtime sees are the ones that were trained.
        export_path: Where rank 0 writes the int8 ONNX model at the end of fit (needs the module's
            ``example_input_array``). ``None``: no export.
        log_ranges: Log each activation quantizer's scale as ``qat/scale/<name>``.
        weight_bits: 7 (default): weights in [-63, 63], computed exactly by ONNX Runtime on every CPU. 8: the full
            range, for targets whose int8 dot products accumulate in int32 (VNNI/AMX, ARM, TensorRT). 4: int4
            weight-only groups (W4A16, ``MatMulNBits``) for language models: every Linear and transposed Linear
            trains with its weight rounded per ``group_size`` inputs from ``start_step``; activations, other layers
            and the int8-only options stay out (with ``Distillation``, the float teacher is the model before QAT).
        model_input: Which part of a batch is the model's input, for checking the export on validation batches:
            ``None`` (the first element of a tuple/list batch; for a dict batch, the keys the module's ``forward``
            takes), a dict key, a list of dict keys (passed as keywords) or a tuple index.
        on_mismatch: What to do when the exported file does not reproduce the PyTorch model (agreement < 99% or
            SNR < 30 dB): ``"warn"``, ``"raise"`` or ``"ignore"``.
        outputs: Where layer outputs are quantized: ``"graph"`` (default: a Linear output stays float where
            softmax, GELU, an add, LayerNorm or attention consume it, decided by tracing ``example_input_array``;
            ONNX Runtime still runs its int8 kernel), ``"auto"`` (the type rule: float outputs for the Linear layers
            of torch's transformer blocks) or ``"all"``. See :func:`~lightning_accel.quantization.prepare.prepare_qat_`.
        activations: ``None`` (default): ``"static"``, or ``"float"`` with ``weight_bits=4``. ``"static"``: per-tensor
            uint8 ranges, observed and stored. ``"dynamic"``: every Linear quantizes its input at its own range at
            run time (``DynamicQuantizeLinear``, as ORT's ``quantize_dynamic``), its output stays float; convs keep
            static ranges. With ``weight_bits=4``, ``"dynamic"`` rounds each token's inputs to int8 per group (8da4w,
            ``MatMulNBits`` ``accuracy_level=4``).
        embeddings: ``"float"`` (default) or ``"int8"``: every ``nn.Embedding`` not excluded is stored in int8
            with one scale per row (a 30522 x 384 word table: 46.9 MB fp32, 11.7 MB int8), fake-quantized alike.
        group_size: With ``weight_bits=4``: inputs per scale (16, 32, 64, 128, 256).
        symmetric: With ``weight_bits=4``: no stored zero point (``True``) or one per group.
        max_quality_loss: A quality budget, as ``PostTrainingQuantization``'s: at the end of fit the most sensitive
            trained layers go back to float (int4: first to 8-bit groups) until the measured loss is within it.

    Example:
        >>> trainer = Trainer(callbacks=[QuantizationAwareTraining(export_path="model.int8.onnx")])  # doctest: +SKIP
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        start_step: int | float = 0,
        freeze_observers_step: int | float | None = None,
        freeze_bn_step: int | float | None = None,
        fold_bn: bool = True,
        export_path: str | os.PathLike | None = None,
        log_ranges: bool = True,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        model_input: str | int | list[str] | None = None,
        on_mismatch: str = "warn",
        outputs: Literal["graph", "auto", "all"] = "graph",
        activations: Literal["static", "dynamic", "float"] | None = None,
        embeddings: Literal["float", "int8"] = "float",
        group_size: int = 32,
        symmetric: bool = True,
        max_quality_loss: float | None = None,
    ) -> None:
        steps = validate_qat_steps(start_step, freeze_observers_step, freeze_bn_step)
        self.start_step, self.freeze_observers_step, self.freeze_bn_step = steps
        self.log_ranges = validate_bool("log_ranges", log_ranges)
        check_model_input(model_input)
        self.model_input = model_input
        self.on_mismatch = check_on_mismatch(on_mismatch)
        self.export_path = check_export_path(export_path)
        self.max_quality_loss = validate_budget(max_quality_loss)
        self._budget: BudgetResult | None = None
        #: With ``weight_bits=4``, the driver every hook hands over to (:mod:`groupwise_callback`), else ``None``.
        self.weight_only = weight_only_driver(
            weight_bits, activations, embeddings, group_size, symmetric, include, exclude
        )
        if self.weight_only:
            self.weight_only.configure(steps[0], self.export_path, model_input, self.on_mismatch, self.max_quality_loss)
        #: The int8 preparation settings, validated once and taken whole by prepare, calibrate and the dry runs.
        bits = DEFAULT_WEIGHT_BITS if self.weight_only else weight_bits
        activations = "static" if self.weight_only or activations is None else activations
        self.settings = Int8Settings(include, exclude, fold_bn, bits, outputs, activations, embeddings)
        self.skipped_ranges = 0
        #: Where the export goes: ``export_path``, under the run's log directory when relative (set at setup).
        self.resolved_export_path: str | None = None
        self._log_selection = True  # once per callback: setup runs again for test after fit
        self._selection_summary = ""
        self._model: nn.Module | None = None
        self._quantizers: dict[str, ActivationFakeQuant] = {}
        self._pending_state: dict[str, Any] | None = None
        self._state_restored = False
        self._saved_quantized = False
        #: The int8 score when fake quantization started (PTQ of those weights) and at the end of fit.
        self.int8_at_start: dict[str, Any] | None = None
        self.int8_at_end: dict[str, Any] | None = None
        self._probe: Any = None
        self._recent_batches: deque[Any] = deque(maxlen=CALIBRATION_BATCHES)
        self._batch_norms: list[nn.Module] = []
        self._phase = PHASE_FLOAT
        self._training_steps = TrainingSteps()
        self._applied: tuple[bool, bool] | None = None  # (fake_quant, observe) last set on the model
        # (start, freeze observers, freeze BatchNorm) as optimizer steps, once fractions are resolved at fit start.
        self._steps = known_steps(steps)

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        settings = self.settings.as_state()
        return self._generate_state_key(include=settings["include"], exclude=settings["exclude"])

    @property
    def budget(self) -> BudgetResult | None:
        """What the quality budget held back, with the measured figures (``None`` without one, or before deploy)."""
        return self.weight_only.budget if self.weight_only else self._budget

    def phase_at(self, step: int) -> int:
        """The phase at optimizer step ``step``: float, observing (fake-quant on) or frozen.

        Fractional steps are resolved at fit start; before that this raises ``RuntimeError``.
        """
        if self._steps is None:
            raise RuntimeError("QuantizationAwareTraining: fractional steps are resolved when fit starts")
        return phase_at(self._steps, step)

    def _resolve_steps(self, trainer: Trainer) -> None:
        """Turn fractional steps into optimizer steps of this fit, and check their order."""
        self._steps = resolve_qat_steps(
            trainer.estimated_stepping_batches, self.start_step, self.freeze_observers_step, self.freeze_bn_step
        )

    # --- hooks --------------------------------------------------------------------------------------------------

    @hands_over_to_weight_only
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Prepare the fake-quant modules (once), and before fitting dry-run everything the export will need."""
        fitting = stage == "fit"
        if self.export_path is not None and fitting:
            require_example_input(pl_module, type(self).__name__)
            self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
            probe_writable("QuantizationAwareTraining", "export_path", self.resolved_export_path)
        if self.settings.weight_bits == 8:
            rank_zero_warn(f"QuantizationAwareTraining: {FULL_RANGE_NOTE}")
        refuse_weight_averaging(trainer, "QuantizationAwareTraining", "the quantizer ranges and BatchNorm freeze")
        configure_model_early(trainer, pl_module)  # layers built in configure_model are quantized too
        prepare_qat_(pl_module, **self.settings.prepare_arguments(), example_input=example_input(pl_module))
        self._model = pl_module
        self._batch_norms = list(iter_batch_norms(pl_module))
        self._applied = None
        self._quantizers = activation_quantizers(pl_module)
        if self._pending_state is not None:
            self._load_into_model(self._pending_state)
        if self.export_path is not None and fitting:
            dry_run_export(pl_module, type(self).__name__, **self.settings.prepare_arguments())
        step = self._training_steps.current(trainer, pl_module)
        self._set_phase(self.phase_at(step) if self._steps else PHASE_FLOAT, training=False)
        if self._log_selection:
            self._selection_summary = selection_summary(pl_module)
            rank_zero_info(f"QuantizationAwareTraining ({getattr(stage, 'value', stage)}): {self._selection_summary}")
            self._log_selection = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve fractional steps against this fit's length (before the sanity check validates)."""
        super().on_fit_start(trainer, pl_module)  # the deploy stage: a new fit, combined exports proved
        if self.weight_only:
            return self.weight_only.on_fit_start(trainer, pl_module)
        self._resolve_steps(trainer)
        if self._selection_summary:
            tag = selection_tag(type(self).__name__, self.settings.include, self.settings.exclude)
            log_text(trainer, tag, self._selection_summary)
        self._set_phase(self.phase_at(self._training_steps.current(trainer, pl_module)), training=False)
        add_hyperparameters(
            trainer, pl_module, {"qat/start_step": self._steps[0], "qat/weight_bits": self.settings.weight_bits}
        )
        current = self._training_steps.current(trainer, pl_module)
        if self._steps[0] <= current and trainer.is_global_zero:
            warn_when_starting_from_chance(trainer, pl_module, self.model_input)

    @hands_over_to_weight_only
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Switch the phase for this step, and keep BatchNorms frozen once their step has come."""
        step = self._training_steps.current(trainer, pl_module)
        if self.int8_at_start is None:
            self._recent_batches.append(batch)  # what PTQ at QAT start calibrates on (never the loader itself)
        if self.phase_at(step) != PHASE_FLOAT and self.int8_at_start is None:
            if trainer.is_global_zero:
                self._probe_start(trainer, pl_module)
            self._recent_batches.clear()
            # Every rank keeps rank 0's figures: the callback's state must not differ between ranks.
            self.int8_at_start = trainer.strategy.broadcast(self.int8_at_start, src=0)
        self._set_phase(self.phase_at(step), training=True)
        freeze_bn_step = self._steps[2]
        if freeze_bn_step is not None and step >= freeze_bn_step:
            for bn in self._batch_norms:  # again every step: Lightning's model.train() after validation undoes it
                bn.eval()

    @hands_over_to_weight_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Reduce this batch's activation ranges over ranks, update the running ranges, and log."""
        self._training_steps.batch_done(pl_module)
        if self._phase == PHASE_OBSERVING and self._quantizers:  # dynamic activations observe nothing
            reduce = trainer.strategy.reduce if trainer.world_size > 1 else None
            if not update_ranges_over_ranks(self._quantizers, reduce):
                self.skipped_ranges += 1
                rank_zero_warn(
                    f"QuantizationAwareTraining: step {trainer.global_step} produced non-finite activations; its "
                    f"ranges were skipped ({self.skipped_ranges} batch(es) so far, logged as qat/skipped_ranges)"
                )
        if not trainer.global_step % trainer.log_every_n_steps:
            ranges = self._quantizers if self.log_ranges else {}
            log_qat_metrics(pl_module, self._phase, self.skipped_ranges, ranges)

    @hands_over_to_weight_only
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate as deployed, without observing: see :meth:`evaluation_phase`."""
        self._set_phase(self.evaluation_phase(trainer), training=False)

    on_test_start = on_validation_start
    on_predict_start = on_validation_start

    def evaluation_phase(self, trainer: Trainer) -> int:
        """The phase that ``validate``/``test``/``predict`` evaluate in.

        During fit, the current step's phase. Outside fit (``trainer.test(ckpt_path=...)`` in any process) the
        restored quantizer state decides, not ``trainer.global_step``, which Lightning does not restore there:
        quantized if the quantizers hold observed ranges, float (with a warning) if they hold none.
        """
        if trainer.state.fn == "fit":
            return self.phase_at(self._training_steps.current(trainer, trainer.lightning_module))
        restored = self._state_restored and self._saved_quantized
        return phase_from_restored_state(self._quantizers, restored, str(trainer.state.fn))

    @hands_over_to_weight_only
    def before_deploy(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the int8 model at the end of fit, against QAT's start (the stage calls this before any build)."""
        if trainer.is_global_zero:
            self._probe_end(pl_module)

    @hands_over_to_weight_only
    def dry_run_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Contribution | None:
        """A copy calibrated on the example input, for the deploy stage to prove the combined exports at fit start."""
        return int8_probe(trainer, pl_module, self)

    def _probe_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score PTQ of the weights QAT starts from (QAT must not end below it), leaving every RNG as it was."""
        recipe = int8_ptq(self.model_input, self.settings.prepare_arguments())
        self._probe = start_probe(trainer, pl_module, self.model_input, recipe, list(self._recent_batches))
        self.int8_at_start = {"metric": self._probe.metric, "value": self._probe.start} if self._probe else {}

    def _probe_end(self, pl_module: LightningModule) -> None:
        if self._probe is not None and all(q.calibrated for q in self._quantizers.values()):
            # (A range never observed, or QAT never started: there is no int8 model to score.)
            self.int8_at_end = end_probe(self._probe, as_evaluated(pl_module)) or self.int8_at_end

    @hands_over_to_weight_only
    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """What QAT hands to the deploy stage: the trained int8 model, where to write it, and what to check it on.

        ``None`` when there is no int8 model (training stopped before ``start_step``: warned when an export was
        asked for).
        """
        path = self.resolved_export_path if self.export_path is not None else None
        if path is not None and trainer.fast_dev_run:
            rank_zero_warn(f"QuantizationAwareTraining: fast_dev_run, so the int8 export to {path} is skipped")
            path = None
        if self._model is None:
            return None
        steps = None if self._steps is None else (self._steps[0], self._training_steps.current(trainer, pl_module))
        restored = self._state_restored and self._saved_quantized
        if not int8_model_exists(self._quantizers, steps, restored, path, self.skipped_ranges):
            return None
        notes = [f"QAT: {self._probe.describe()}."] if self._probe is not None and self._probe.end is not None else []
        return Contribution(
            owner="QuantizationAwareTraining",
            notes=notes,
            int8_model=lambda: self._within_budget(trainer, pl_module, notes),
            int8_path=path,
            check_inputs=check_batches(trainer, pl_module, batch_picker(self.model_input, pl_module)),
            classification=classification_batches(trainer),
            on_mismatch=self.on_mismatch,
        )

    @hands_over_to_weight_only
    def state_dict(self) -> dict[str, Any]:
        """Every quantizer's buffers (tensors on CPU), the weight width and the count of skipped batches."""
        quantizers = quantizer_state(self._model) if self._model is not None else {}
        return {
            "version": QAT_STATE_VERSION,
            "quantizers": quantizers,
            "settings": self.settings.as_state(),  # how the quantizers were prepared, whole (load_quantized)
            "skipped_ranges": self.skipped_ranges,
            "quantized": self._phase != PHASE_FLOAT,  # what tells a dynamic-only model's state from a float one
            # A resumed fit keeps the start's score instead of scoring its own later weights as the start.
            "int8_at_start": self.int8_at_start,
            "training_batches": self._training_steps.batches,
        }

    @hands_over_to_weight_only
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the quantizers (now if the model is prepared, else at ``setup``)."""
        check_state_version("QuantizationAwareTraining", state_dict, QAT_STATE_VERSION)
        state = state_dict.get("quantizers") or None
        if state is not None:
            self.settings.check_same_as(Int8Settings.from_state(state_dict["settings"]))
        self._saved_quantized = bool(state_dict.get("quantized", True))
        if state_dict.get("int8_at_start") is not None:
            self.int8_at_start = state_dict["int8_at_start"]
        self.skipped_ranges = int(state_dict.get("skipped_ranges", 0))
        self._training_steps.batches = int(state_dict.get("training_batches", 0))
        if state is None:
            return
        if self._model is not None:
            self._load_into_model(state)
        else:
            self._pending_state = state

    # --- helpers ------------------------------------------------------------------------------------------------

    def _within_budget(self, trainer: Trainer, pl_module: LightningModule, notes: list[str]) -> nn.Module:
        model, self._budget = trained_within_budget(pl_module, trainer, self.max_quality_loss, self.model_input, notes)
        return model

    def _load_into_model(self, state: dict[str, Any]) -> None:
        load_quantizer_state_(self._model, state)
        self._pending_state = None
        self._state_restored = True  # dynamic activations alone have no range that would say so

    def _set_phase(self, phase: int, training: bool) -> None:
        self._phase = phase
        wanted = (phase != PHASE_FLOAT, training and phase == PHASE_OBSERVING)
        if wanted != self._applied:  # walking every module each step would cost large models real time
            set_qat_phase(self._model, fake_quant=wanted[0], observe=wanted[1])
            self._applied = wanted

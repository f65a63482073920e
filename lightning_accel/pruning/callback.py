"""The MagnitudePruning callback: decides *when* to recompute and apply masks; the math lives in masks.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_accel._core.distributed import decide_on_rank_zero
from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.inputs import example_input
from lightning_accel._core.lightning import TrainingSteps, configure_model_early, refuse_weight_averaging
from lightning_accel._core.logging import add_hyperparameters, log_text, selection_tag
from lightning_accel._core.stage import Contribution, DeployingCallback
from lightning_accel._core.validation import (
    validate_bool,
    validate_int,
    validate_patterns,
    validate_step,
)
from lightning_accel.pruning.export import validate_slim_export_path
from lightning_accel.pruning.fractions import measured_fractions, validate_channel_fractions
from lightning_accel.pruning.groups import ChannelGroups
from lightning_accel.pruning.importance import TaylorImportance
from lightning_accel.pruning.masks import apply_masks_, full_tensor, local_part, local_tensor
from lightning_accel.pruning.quality import PruningBudget
from lightning_accel.pruning.schedule import resolve_schedule_steps, sparsity_at, validate_schedule
from lightning_accel.pruning.selection import (
    best_checkpoint_below_target,
    check_importance,
    check_masks_fit,
    check_n_m_fits,
    check_pattern_options,
    next_masks,
    plan_channel_groups,
    report_final_sparsity,
    select_weight_parameters,
    sparsity_metrics,
    warn_when_restored_above_target,
)
from lightning_accel.pruning.slim import dry_run_slim_export
from lightning_accel.pruning.state import pruning_state, restore_pruning_state
from lightning_accel.pruning.wanda import WandaImportance

#: Without ``end_step``, the schedule reaches its target at this fraction of the fit's optimizer steps, leaving
#: the rest for fine-tuning at the final sparsity.
DEFAULT_END_FRACTION = 0.75

_STATE_VERSION = 1


class MagnitudePruning(DeployingCallback):
    """Prune the smallest-magnitude weights on a schedule until an exact fraction of them is zero.

    The sparsity at each step is absolute (never compounding), masks are recomputed every ``every_n_steps`` steps,
    and pruned weights are zeroed after every optimizer step (a post-step hook), so they stay exactly zero whatever
    momentum, Adam or a skipped GradScaler step would do. Parameters keep their names; masks and schedule position
    are saved in checkpoints (a resumed run continues the schedule); under DDP rank 0 computes and broadcasts.

    Args:
        target_sparsity: Final fraction of zeros among the selected weights, in [0, 1). For an ``"N:M"`` pattern it
            must equal ``1 - N/M`` (0.5 for ``"2:4"``).
        schedule: ``"cubic"`` (Zhu & Gupta 2017: fast early, slow near the target), ``"linear"`` or ``"one_shot"``
            (the target at ``start_step`` at once).
        initial_sparsity: Sparsity at ``start_step`` for the gradual schedules.
        start_step: Where pruning starts: an optimizer step (int), or a fraction of the fit's training steps
            (float in (0, 1], as Lightning's ``val_check_interval``).
        end_step: Where the target is reached: a step (int) or a fraction (float). The default 0.75 leaves the last
            quarter of training for fine-tuning at the final sparsity. ``None`` means the same.
        every_n_steps: Recompute the masks every this many optimizer steps between ``start_step`` and ``end_step``.
        pattern: ``"unstructured"`` (single elements), ``"channels"`` (whole coupled channel groups, see below), or
            ``"N:M"`` such as ``"2:4"`` (N nonzeros in every M consecutive input weights, for sparse tensor cores).
            ``"channels"`` traces the model once at setup (on ``example_input_array``) for the channels that go
            together (a conv's BatchNorm, the next layers' inputs, residual and concat branches, depthwise convs);
            attention heads (a head's Q/K/V rows and the output projection's columns) are groups too. Each
            group loses ``target_sparsity`` of its channels (at most all but one; see ``channel_fractions``), the
            least important first, every slice of a pruned channel zeroed, so :func:`~lightning_accel.pruning.slim`
            can remove them. The output layer and groups touching other layers stay dense (the setup log says why).
        scope: For unstructured pruning, ``"lamp"`` (default) ranks all selected weights together by a scale-aware
            score (LAMP), so layers whose weights are small by initialisation are not emptied first; ``"global"``
            by magnitude alone (Lightning's ``ModelPruning``); ``"layer"`` the same fraction of each.
        include: Patterns naming modules whose Linear/Conv weights are pruned (``"encoder.*"``), or parameters
            (``"*.in_proj_weight"``). ``None``: every Linear and Conv weight, no bias or normalisation parameter.
        exclude: Patterns naming modules or parameters to leave dense (e.g. ``["classifier"]``).
        log_per_layer: Also log ``sparsity/layer/<name>`` for each selected parameter.
        export_path: With ``pattern="channels"``: at the end of fit rank 0 writes the physically smaller model there
            (``.onnx``: fp32 ONNX, ``.pt2``: ``torch.export``; relative: under the log directory). Int8 exports of
            QAT/PTQ in the same Trainer are slimmed too.
        importance: With ``pattern="channels"``, how channels and heads are ranked: ``"taylor"`` (the default,
            ``None``, for channels): first-order Taylor, ``|w * dL/dw|`` summed over the group's slices and the
            steps since the last masks (before any step: magnitude); or ``"magnitude"``: summed squared weights of
            the group's slices. Other patterns rank by magnitude, or by ``"wanda"``: ``|w| x ||x||``
            per output row or N:M group, input norms from the batches since the last masks (Linear weights only).
        channel_fractions: With ``pattern="channels"``: ``"uniform"`` (default) or ``"sensitivity"``: each group's
            removal is scored alone on validation batches when the first masks are due, and costly groups lose
            less, cheap ones more, the same channels overall (saved in checkpoints, identical on every rank).
        max_quality_loss: What pruning may cost (accuracy as a fraction, perplexity, or 1 - cosine to the dense
            outputs), measured on validation batches at the first masks and at the end; a loss above it warns.

    Example:
        >>> from lightning import Trainer
        >>> trainer = Trainer(callbacks=[MagnitudePruning(target_sparsity=0.9)])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float,
        schedule: Literal["one_shot", "linear", "cubic"] = "cubic",
        initial_sparsity: float = 0.0,
        start_step: int | float = 0,
        end_step: int | float | None = DEFAULT_END_FRACTION,
        every_n_steps: int = 10,
        pattern: str = "unstructured",
        scope: Literal["global", "layer", "lamp"] = "lamp",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_per_layer: bool = False,
        export_path: str | None = None,
        importance: Literal["magnitude", "taylor", "wanda"] | None = None,
        channel_fractions: Literal["uniform", "sensitivity"] = "uniform",
        max_quality_loss: float | None = None,
    ) -> None:
        validate_schedule(schedule, target_sparsity, initial_sparsity, start_step, end_step, allow_fractions=True)
        self.pattern = check_pattern_options(pattern, scope, target_sparsity)
        self.target_sparsity = float(target_sparsity)
        self.schedule = schedule
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = validate_step("start_step", start_step)
        self.end_step = validate_step("end_step", end_step, allow_none=True)
        self.every_n_steps = validate_int("every_n_steps", every_n_steps, 1)
        self.scope = scope
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.log_per_layer = validate_bool("log_per_layer", log_per_layer)
        self.export_path = validate_slim_export_path(export_path, self.pattern.kind)
        self.importance = check_importance(importance, self.pattern.kind, pattern)
        self.channel_fractions = validate_channel_fractions(channel_fractions, self.pattern.kind)
        #: With ``channel_fractions="sensitivity"``: each group's measured cost and fraction (measured once).
        self.channel_sensitivity: dict[str, Any] | None = None
        self.quality = PruningBudget(max_quality_loss)  #: the dense and the pruned score against the budget
        self._scorer: TaylorImportance | WandaImportance | None = None  # Taylor or Wanda sums between masks
        self._scorer_state: dict[str, Any] | None = None  # restored before setup made the groups
        self.resolved_export_path: str | None = None
        self._groups: ChannelGroups | None = None

        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, Tensor] | None = None  # keep-masks (True = kept), on the parameters' devices
        # The masks as 0/1 in each parameter's dtype: multiplying by them is ~10x faster than masked_fill_ on CPU,
        # which matters because it runs after every optimizer step.
        self._multipliers: dict[str, Tensor] = {}
        self._mask_sparsity = 0.0  # the sparsity the current masks were computed for
        self._last_step = -1
        # Steps once resolved against the fit's length (fractions become steps at fit start).
        self._resolved_start_step: int | None = start_step if isinstance(start_step, int) else None
        self._resolved_end_step: int | None = end_step if isinstance(end_step, int) else None
        self.best_checkpoint_below_target: str | None = None
        self._hook_handles: list[Any] = []
        self._training_steps = TrainingSteps()
        self._metrics: dict[str, float] = {}
        self._selection_summary = ""

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints; instances pruning different parameters can coexist."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # --- the schedule -------------------------------------------------------------------------------------------

    def sparsity_at(self, step: int) -> float:
        """Return the sparsity this callback's schedule asks for at optimizer step ``step``."""
        start_step = self._resolved_start_step or 0
        end_step = self._resolved_end_step if self._resolved_end_step is not None else start_step + 1
        return sparsity_at(step, self.target_sparsity, self.schedule, self.initial_sparsity, start_step, end_step)

    def _resolve_schedule(self, trainer: Trainer) -> None:
        """Turn fractional ``start_step``/``end_step`` into optimizer steps of this fit."""
        end_step = DEFAULT_END_FRACTION if self.end_step is None else self.end_step
        steps = resolve_schedule_steps(trainer.estimated_stepping_batches, self.start_step, end_step)
        self._resolved_start_step, self._resolved_end_step = steps

    def _is_due(self, step: int, target: float) -> bool:
        if target == self._mask_sparsity:
            return False
        on_grid = (step - self._resolved_start_step) % self.every_n_steps == 0
        return on_grid or step >= self._resolved_end_step or self.schedule == "one_shot"

    # --- Lightning hooks ----------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Select the parameters to prune (layers built in ``configure_model`` included) and check the pattern."""
        refuse_weight_averaging(trainer, "MagnitudePruning", "the masks (pruned weights come back non-zero)")
        configure_model_early(trainer, pl_module)
        if self.pattern.kind == "channels":
            self._setup_channel_groups(trainer, pl_module, stage)
            return
        unstructured = self.pattern.kind == "unstructured"
        self._params, self._selection_summary = select_weight_parameters(
            pl_module, unstructured, self.include, self.exclude
        )
        rank_zero_info(f"MagnitudePruning ({getattr(stage, 'value', stage)}): {self._selection_summary}")
        if self.pattern.kind == "N:M":
            check_n_m_fits(self._params, self.pattern.n, self.pattern.m)
        if self.importance == "wanda":
            self._set_scorer(WandaImportance(pl_module, self._params))
        if self._masks is not None:
            check_masks_fit(self._masks, self._params)

    def _setup_channel_groups(self, trainer: Trainer, pl_module: LightningModule, stage: Any) -> None:
        """Trace the coupled channel groups; the masks then cover every parameter slice the groups own."""
        self._groups, self._params = plan_channel_groups(pl_module, self.include, self.exclude)
        self._selection_summary = self._groups.summary() + (
            ", ranked by Taylor importance" if self.importance == "taylor" else ""
        )
        if self.importance == "taylor":
            self._set_scorer(TaylorImportance(self._groups))
        rank_zero_info(f"MagnitudePruning ({getattr(stage, 'value', stage)}): {self._selection_summary}")
        if self._masks is not None:
            check_masks_fit(self._masks, self._params)
        if self.export_path is not None:
            self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_path))
            probe_writable("MagnitudePruning", "export_path", self.resolved_export_path)
            if trainer.is_global_zero:
                dry_run_slim_export(pl_module, example_input(pl_module), self._groups, self.export_path)

    @property
    def _fractions(self) -> list[float] | None:
        """Each group's multiplier of the target, in the order of the groups (``None``: uniform, or not measured)."""
        return [row["fraction"] for row in self.channel_sensitivity["groups"]] if self.channel_sensitivity else None

    @property
    def channel_groups(self) -> ChannelGroups | None:
        """The coupled channel groups that ``pattern="channels"`` prunes (``None`` for other patterns)."""
        return self._groups

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the pruning settings to the logged hyperparameters, and the selection summary as text."""
        super().on_fit_start(trainer, pl_module)  # the deploy stage: a new fit
        log_text(trainer, selection_tag("MagnitudePruning", self.include, self.exclude), self._selection_summary)
        add_hyperparameters(
            trainer,
            pl_module,
            {
                "pruning/target_sparsity": self.target_sparsity,
                "pruning/pattern": self.pattern_string,
                "pruning/schedule": self.schedule,
            },
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the schedule, re-apply restored masks, and zero pruned weights after every optimizer step."""
        self._resolve_schedule(trainer)
        # Strategies that shard (FSDP2's fully_shard) replace parameters with sharded ones after setup, under the
        # same names: look them up again so that masks and zeroing act on the parameters the optimizer steps.
        current = dict(pl_module.named_parameters())
        self._params = {name: current.get(name, parameter) for name, parameter in self._params.items()}
        if self._masks is None:
            self._set_masks({name: torch.ones(p.shape, dtype=torch.bool) for name, p in self._params.items()}, 0.0)
        else:
            self._set_masks(self._masks, self._mask_sparsity)
            warn_when_restored_above_target(self._mask_sparsity, self.target_sparsity)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self._scorer is not None:
            self._scorer.attach()
        rank_zero_info(
            f"MagnitudePruning: {len(self._params)} parameters, {self.schedule} schedule to "
            f"{self.target_sparsity:.2%} {self.pattern.kind} sparsity between steps {self._resolved_start_step} and "
            f"{self._resolved_end_step}"
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Recompute the masks when the schedule is due (rank 0 decides, every rank applies)."""
        step = self._training_steps.current(trainer, pl_module)
        if step == self._last_step:  # later micro-batches of one accumulated step
            return
        self._last_step = step
        target = self.sparsity_at(step)
        if not self._is_due(step, target):
            return
        masks = None
        # Sharded parameters (FSDP) are ranked over their full tensors: every rank takes part in gathering them.
        weights = {name: full_tensor(p) for name, p in self._params.items()}
        scores = self._scorer.take(pl_module, batch) if self._scorer is not None else None  # every rank restarts
        self.quality.start(trainer, pl_module, batch)  # with a budget: the dense model's score, before any mask
        if self.channel_fractions == "sensitivity" and self.channel_sensitivity is None:  # measured once, by rank 0
            self.channel_sensitivity = decide_on_rank_zero(trainer, measured_fractions(self, trainer, pl_module, batch))
        if trainer.is_global_zero:
            groups = self._groups if self._groups is None else replace(self._groups, fractions=self._fractions)
            masks = next_masks(weights, target, groups, self.pattern_string, self.scope, self._masks, scores)
            if trainer.world_size > 1:  # broadcast pickles the masks: send them from host memory
                masks = {name: mask.cpu() for name, mask in masks.items()}
        self._set_masks(decide_on_rank_zero(trainer, masks), target)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """With Taylor importance: add this step's ``|w * grad|`` (Lightning has unscaled AMP gradients by now)."""
        if not isinstance(self._scorer, TaylorImportance):
            return
        gradients = {name: full_tensor(p.grad) for name, p in self._params.items() if p.grad is not None}
        self._scorer.accumulate({name: full_tensor(p) for name, p in self._params.items()}, gradients)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the scheduled and the measured sparsity on the steps the trainer writes logs."""
        self._training_steps.batch_done(pl_module)
        # ``self.log`` costs far more than the masking itself, so skip the steps whose values would be dropped.
        if trainer.global_step % trainer.log_every_n_steps:
            return
        for name, value in self._metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop zeroing, and say so if training ended before the target was reached."""
        self._remove_hooks()
        reached = self._metrics.get("sparsity/actual", 0.0)
        steps = self._training_steps.current(trainer, pl_module)
        report_final_sparsity(reached, self._mask_sparsity, self.target_sparsity, steps, self._resolved_end_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the artifacts (the deploy stage, once); warn when the "best" checkpoint is below the target."""
        super().on_fit_end(trainer, pl_module)
        self.best_checkpoint_below_target = best_checkpoint_below_target(trainer, self.state_key, self.target_sparsity)

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """What pruning hands to the deploy stage: the channel groups (exports are slimmed) and the slim path."""
        path = self.resolved_export_path
        if path is not None and trainer.fast_dev_run:
            rank_zero_warn(f"MagnitudePruning: fast_dev_run, so the slim export to {path} is skipped")
            path = None
        return Contribution(
            owner="MagnitudePruning",
            notes=self.quality.notes,
            channel_groups=self._groups,
            slim_path=path,
            pruned_parameters=tuple(self._params),
        )

    def before_deploy(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``max_quality_loss``: score the pruned model against the dense one (before any artifact)."""
        self.quality.end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Remove the optimizer hooks so that a later fit starts clean."""
        self._remove_hooks()

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors on CPU), the sparsity they were computed for, and the schedule position."""
        return pruning_state(self, _STATE_VERSION)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the masks and schedule position; refuse masks from another pattern, model or format."""
        restore_pruning_state(self, state_dict, _STATE_VERSION)

    @property
    def pattern_string(self) -> str:
        """The pattern as given: ``"unstructured"``, ``"channels"`` or ``"N:M"``."""
        return f"{self.pattern.n}:{self.pattern.m}" if self.pattern.kind == "N:M" else self.pattern.kind

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current keep-masks by parameter name (``True`` keeps the element); empty before training."""
        return dict(self._masks or {})

    def _set_masks(self, masks: dict[str, Tensor], sparsity: float) -> None:
        self._masks = {name: masks[name].to(device=p.device, dtype=torch.bool) for name, p in self._params.items()}
        # Zeroing acts on each rank's own shard of a sharded parameter: keep only that part of the mask.
        params = self._params
        self._multipliers = {n: local_part(m, params[n]).to(params[n].dtype) for n, m in self._masks.items()}
        self._mask_sparsity = sparsity
        apply_masks_(self._params, self._masks)
        self._metrics = sparsity_metrics(self._params, self._groups, sparsity, self.log_per_layer)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Sequence[Any], kwargs: Any) -> None:
        with torch.no_grad():
            for name, multiplier in self._multipliers.items():
                local_tensor(self._params[name]).mul_(multiplier)

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self._scorer is not None:
            self._scorer.detach()

    def _set_scorer(self, scorer: TaylorImportance | WandaImportance) -> None:
        self._scorer = scorer
        if self._scorer_state is not None:
            scorer.load_state_dict(self._scorer_state)

"""The MixedPrecision callback: installs Lightning's own AMP plugin from a callback list, and watches it.

Autocast and the GradScaler stay Lightning's (``lightning.pytorch.plugins.precision.MixedPrecision``); this
callback chooses the precision for the hardware, makes fp16 trouble visible, and exports a half-size model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision as LightningMixedPrecision
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._core.files import probe_writable, resolve_artifact_path
from lightning_accel._core.graph import tensors_in
from lightning_accel._core.logging import add_hyperparameters
from lightning_accel._core.stage import Contribution, DeployingCallback
from lightning_accel._core.validation import validate_bool, validate_int

PrecisionChoice = Literal["auto", "bf16-mixed", "16-mixed", "fp8"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)
NONFINITE_ACTIONS: tuple[str, ...] = ("raise", "warn")
FULL_PRECISION = "32-true"
# fp8 compute needs Ada (sm_89) or Hopper (sm_90) tensor cores.
FP8_MIN_CAPABILITY = (8, 9)


class NonFiniteLossError(RuntimeError):
    """Raised by ``MixedPrecision(nonfinite="raise")`` after ``patience`` consecutive non-finite steps."""


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Return whether this CPU computes bf16 natively (AVX512-BF16 or AMX); ``False`` where that is unknown."""
    try:
        flags = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def choose_precision(
    device_type: str, cuda_capability: tuple[int, int] | None, native_cpu_bf16: bool
) -> tuple[str, str]:
    """Pick the fastest precision the hardware runs, and say why.

    Returns:
        ``(precision, reason)``: ``"bf16-mixed"``, ``"16-mixed"`` or ``"32-true"``, and a sentence for the log.
    """
    if device_type == "cuda":
        if cuda_capability is not None and cuda_capability >= (8, 0):
            return "bf16-mixed", f"CUDA compute capability {cuda_capability} has bf16 tensor cores"
        return "16-mixed", f"CUDA compute capability {cuda_capability} has fp16 but no bf16 tensor cores"
    if device_type == "cpu" and native_cpu_bf16:
        return "bf16-mixed", "this CPU has native bf16 (AVX512-BF16 or AMX)"
    return (
        FULL_PRECISION,
        f"the {device_type} device has no native bf16 (no AVX512-BF16/AMX), where autocast is slower than fp32",
    )


class MixedPrecision(DeployingCallback):
    """Train under AMP (bf16 or fp16 autocast) chosen from a callback list, with loss-scale health and a half export.

    In ``setup`` the callback installs Lightning's own precision plugin on ``trainer.strategy`` (the strategy's own
    class under FSDP), so autocast and the GradScaler are Lightning's, checkpointed and restored as usual.

    Args:
        precision: ``"auto"`` picks what the hardware runs fast: bf16-mixed on CUDA with compute capability >= 8.0,
            16-mixed on older CUDA devices, bf16-mixed on CPUs with AVX512-BF16 or AMX, and full fp32 elsewhere (an
            info line says why). ``"bf16-mixed"`` and ``"16-mixed"`` force that autocast dtype, on CPU too (real fp16,
            never silently bf16). ``"fp8"`` converts ``nn.Linear`` layers to torchao's float8 training (CUDA compute
            capability >= 8.9) under bf16 autocast.
        channels_last: Convert 4-D conv weights, and 4-D input tensors, to channels-last memory format (the layout
            tensor cores want).
        nonfinite: After ``patience`` consecutive steps with a non-finite loss (or, without a GradScaler, non-finite
            gradients): ``"raise"`` stops training with an error naming the step, the loss and the first parameter
            with a non-finite gradient; ``"warn"`` only warns. fp16 overflow steps that the GradScaler skips are
            counted in ``amp/skipped_steps`` instead.
        patience: Consecutive non-finite steps tolerated before ``nonfinite`` acts.
        export_half: Path where, at the end of fit, rank 0 writes the model's state dict in half precision (bf16,
            or fp16 for ``"16-mixed"``): half the size, and ``model.load_state_dict`` casts it back to fp32.

    Example:
        >>> from lightning import Trainer
        >>> trainer = Trainer(callbacks=[MixedPrecision("bf16-mixed")])  # doctest: +SKIP
    """

    def __init__(
        self,
        precision: PrecisionChoice = "auto",
        channels_last: bool = False,
        nonfinite: Literal["raise", "warn"] = "raise",
        patience: int = 1,
        export_half: str | os.PathLike | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {list(PRECISIONS)}, got {precision!r}")
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"`nonfinite` must be one of {list(NONFINITE_ACTIONS)}, got {nonfinite!r}")
        patience = validate_int("patience", patience, 1)
        channels_last = validate_bool("channels_last", channels_last)
        if export_half is not None and (not isinstance(export_half, str | os.PathLike) or not os.fspath(export_half)):
            raise TypeError(f"`export_half` must be a file path (str or os.PathLike) or None, got {export_half!r}")
        export_half = os.fspath(export_half) if export_half is not None else None
        self.precision = precision
        self.channels_last = channels_last
        self.nonfinite = nonfinite
        self.patience = patience
        self.export_half = export_half
        #: Where the half export goes: ``export_half``, under the run's log directory when relative (set at setup).
        self.resolved_export_path: str | None = None

        self.resolved_precision: str | None = None
        self._installed_plugin: Precision | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._scale_before_step: float | None = None
        self._skipped_steps = 0
        self._nonfinite_streak = 0
        self._nonfinite_grad: str | None = None
        self._batch_step = 0  # global_step during the current batch, before the optimizer step increments it

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(precision=self.precision)

    # --- setup: choose and install the plugin -------------------------------------------------------------------

    def _resolve(self, trainer: Trainer) -> tuple[str, str]:
        device = trainer.strategy.root_device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if self.precision == "auto":
            return choose_precision(device.type, capability, cpu_has_native_bf16())
        if self.precision == "fp8":
            if device.type != "cuda" or capability < FP8_MIN_CAPABILITY:
                raise ValueError(
                    f"`precision` 'fp8' needs a CUDA device with compute capability >= {FP8_MIN_CAPABILITY} "
                    f"(Ada or Hopper), got device {device.type!r} with capability {capability}; "
                    "use 'bf16-mixed' or 'auto' instead"
                )
            return "bf16-mixed", "fp8 matmuls (torchao float8 training) under bf16 autocast"
        return self.precision, "set explicitly"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Choose the precision and install Lightning's plugin for it (before the strategy sets up)."""
        if self.export_half is not None and stage == "fit":
            self.resolved_export_path = str(resolve_artifact_path(trainer, self.export_half))
            probe_writable("MixedPrecision", "export_half", self.resolved_export_path)
        current = trainer.strategy.precision_plugin
        already_set = current is self._installed_plugin or (
            self.resolved_precision == FULL_PRECISION and current.precision == FULL_PRECISION
        )
        if already_set:  # a later stage (validate/test after fit) of the same Trainer
            return
        chosen, reason = self._resolve(trainer)
        if current.precision != FULL_PRECISION:
            if self.precision == "auto" or current.precision == chosen:
                chosen, reason = current.precision, f"Trainer(precision={current.precision!r}) set it"
            else:
                raise ValueError(
                    f"MixedPrecision(precision={self.precision!r}) conflicts with "
                    f"Trainer(precision={current.precision!r}); set the precision in one place only"
                )
        elif chosen != FULL_PRECISION:
            self._installed_plugin = self._plugin_for(trainer, chosen)
            trainer.strategy.precision_plugin = self._installed_plugin
        if self.precision == "fp8" and stage == "fit":
            self._convert_to_float8(pl_module)
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        self.resolved_precision = chosen
        self._scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        rank_zero_info(f"MixedPrecision: using {chosen} ({reason})")

    @staticmethod
    def _plugin_for(trainer: Trainer, precision: str) -> Precision:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            from lightning.pytorch.plugins.precision import FSDPPrecision

            return FSDPPrecision(precision)
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            from lightning.pytorch.plugins.precision import DeepSpeedPrecision

            return DeepSpeedPrecision(precision)
        return LightningMixedPrecision(precision, device=trainer.strategy.root_device.type)

    @staticmethod
    def _convert_to_float8(pl_module: LightningModule) -> None:
        # Importing torchao logs "Failed to load ... .so" warnings on builds without its C++ extensions; they do not
        # concern float8 training, so keep them off the user's console.
        torchao_logger = logging.getLogger("torchao")
        previous_level = torchao_logger.level
        torchao_logger.setLevel(logging.ERROR)
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError as err:
            raise ImportError("`precision` 'fp8' needs torchao: pip install 'lightning-accel[fp8]'") from err
        finally:
            torchao_logger.setLevel(previous_level)

        # torchao's kernels need both matmul dimensions divisible by 16; leave other layers in bf16.
        def fits(module: torch.nn.Module, name: str) -> bool:
            return (
                isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            )

        convert_to_float8_training(pl_module, module_filter_fn=fits)

    # --- training: visibility and health ------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the precision in use as a hyperparameter of every logger."""
        super().on_fit_start(trainer, pl_module)  # the deploy stage: a new fit
        add_hyperparameters(
            trainer, pl_module, {"precision": self.resolved_precision, "precision_requested": self.precision}
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Note the step (reported on failure), and convert 4-D float inputs to channels-last in place."""
        self._batch_step = trainer.global_step
        if self.channels_last:
            for tensor in tensors_in(batch):
                if tensor.dim() == 4 and tensor.is_floating_point():
                    tensor.data = tensor.contiguous(memory_format=torch.channels_last)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Note the loss scale (fp16), or check the gradients (no GradScaler to catch them)."""
        if self._scaler is not None:
            self._scale_before_step = self._scaler.get_scale()
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._nonfinite_grad = None
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self._nonfinite_grad = _first_nonfinite_grad(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count skipped fp16 steps, log the loss scale, and act on non-finite steps."""
        if self._scaler is not None and self._scale_before_step is not None:
            scale = self._scaler.get_scale()
            if scale < self._scale_before_step:  # the GradScaler backs off exactly when it skips a step
                self._skipped_steps += 1
            self._scale_before_step = None
            pl_module.log("amp/loss_scale", scale, on_step=True, on_epoch=False)
            pl_module.log("amp/skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=False)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_is_finite = not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all())
        if loss_is_finite and self._nonfinite_grad is None:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        if self._nonfinite_streak < self.patience:
            return
        culprit = self._nonfinite_grad or _first_nonfinite_grad(pl_module)
        loss_value = loss.item() if isinstance(loss, torch.Tensor) else loss
        message = (
            f"MixedPrecision: non-finite training for {self._nonfinite_streak} consecutive step(s), at step "
            f"{self._batch_step}: loss = {loss_value}, first parameter with a non-finite gradient: "
            f"{culprit or 'none'} (precision {self.resolved_precision}). Lower the learning rate, check the data "
            "and the loss, or try bf16-mixed instead of 16-mixed."
        )
        if self.nonfinite == "raise":
            raise NonFiniteLossError(message)
        rank_zero_warn(message)

    def deploy_contribution(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """What mixed precision hands to the deploy stage: the precision trained in, and the half export's path."""
        precision = self.resolved_precision or str(trainer.precision)
        return Contribution(owner="MixedPrecision", precision=precision, half_path=self.resolved_export_path)

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters only; the GradScaler's own state is saved by Lightning's plugin."""
        return {"skipped_steps": self._skipped_steps, "precision": self.resolved_precision or self.precision}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the skipped-step count."""
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))


def _first_nonfinite_grad(module: torch.nn.Module) -> str | None:
    for name, p in module.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None

"""The Distillation callback: the model learns from a frozen teacher, without any change to ``training_step``.

Pruning and quantization-aware training change a model that was good; distilling from the model as it was is how
they keep it good (Hugging Face's block movement pruning, torchao's QAT recipes). The teacher is, by default, a frozen
copy of the model taken in ``setup`` (before pruning zeroes anything or fake quantization starts, and before a
resumed checkpoint is loaded, so a resumed fit rebuilds the same teacher from the same start and the checkpoint does
not store it twice). The callback wraps the module's ``training_step``: the student's forward output (and named
intermediate outputs) are captured by hooks, the teacher runs on the very same inputs without gradients, and
``weight x`` the distillation loss is added to the loss ``training_step`` returns, which Lightning then scales for
AMP and divides for gradient accumulation like any loss.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_accel._core.lightning import configure_model_early
from lightning_accel._core.modules import module_copy
from lightning_accel._core.views import float_view

LOSS_CHOICES = ("kl", "mse", "cosine")


def _first_tensor(output: Any) -> Tensor:
    """The main tensor of a module output: a tensor, a tuple's first tensor, a dict's ``logits`` or first tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        values = dict(output)
        if isinstance(values.get("logits"), Tensor):
            return values["logits"]
        output = list(values.values())
    if isinstance(output, Sequence):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"Distillation: cannot find a tensor in the module output of type {type(output).__name__}")


def distillation_loss(student: Tensor, teacher: Tensor, loss: str, temperature: float) -> Tensor:
    """The loss between a student and a teacher output (the teacher is a constant).

    ``"kl"``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last axis, averaged over the
    other axes (Hinton et al. 2015). ``"mse"``: mean squared error. ``"cosine"``: ``1 - cos`` over the last axis.
    """
    student, teacher = student.float(), teacher.detach().float()
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    log_p = F.log_softmax(student / temperature, dim=-1).flatten(0, -2)
    log_q = F.log_softmax(teacher / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


class Distillation(Callback):
    """Add a distillation loss from a frozen teacher to the training loss, without changing ``training_step``.

    Args:
        weight: The distillation loss is added as ``weight x loss``.
        loss: ``"kl"`` (logits, with ``temperature``), ``"mse"`` or ``"cosine"`` (embeddings) on the outputs.
        temperature: Softens both distributions for ``"kl"``.
        teacher: ``None`` (default): a frozen copy of the model taken at ``setup``, as it was before pruning or
            QAT changed it. Or the path of a Lightning checkpoint (``.ckpt``) or a saved ``state_dict``, loaded into
            a copy of the model. Or an ``nn.Module`` that takes what ``output_module`` (or the forward) takes;
            ``modules`` are then looked up in it by the same names.
        output_module: The submodule whose output is distilled, when ``training_step`` calls it directly instead
            of ``self(...)`` (e.g. ``"bert"``); ``None``: the module's own ``forward``. The first call in each
            training step is the one distilled.
        modules: Named intermediate modules whose outputs are matched too (MSE, each weighted like the output
            loss), e.g. ``["bert.encoder.layer.5"]``.

    It logs ``distill/loss``. The teacher runs under ``torch.no_grad`` inside the training step, so under the
    Trainer's precision (autocast for ``*-mixed``); it is moved to the module's device and dtype at fit start, is not
    a child of the module (DDP neither wraps nor syncs it), and every DDP rank has its own copy.

    Example:
        >>> callbacks = [MagnitudePruning(0.5, pattern="channels"), Distillation(loss="cosine")]  # doctest: +SKIP
    """

    def __init__(
        self,
        weight: float = 1.0,
        loss: Literal["kl", "mse", "cosine"] = "kl",
        temperature: float = 2.0,
        teacher: str | os.PathLike | nn.Module | None = None,
        output_module: str | None = None,
        modules: list[str] | None = None,
    ) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise ValueError(f"`weight` must be a number > 0, got {weight!r}")
        if loss not in LOSS_CHOICES:
            raise ValueError(f"`loss` must be one of {list(LOSS_CHOICES)}, got {loss!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        if teacher is not None and not isinstance(teacher, str | os.PathLike | nn.Module):
            raise TypeError(f"`teacher` must be None, a checkpoint path or an nn.Module, got {type(teacher).__name__}")
        if output_module is not None and not isinstance(output_module, str):
            raise TypeError(f"`output_module` must be a module name (str) or None, got {output_module!r}")
        self.weight = float(weight)
        self.loss = loss
        self.temperature = float(temperature)
        self.teacher_source = teacher
        self.output_module = output_module
        if modules is not None and (isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules)):
            raise TypeError(f"`modules` must be a list of module names such as ['encoder.layer.5'], got {modules!r}")
        self.modules = list(modules or [])
        self.teacher: nn.Module | None = None
        self._captured: dict[str, Any] = {}
        self._capturing = False
        self._handles: list[Any] = []
        self._wrapped: Any = None

    # --- hooks --------------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Build the teacher (once) and wrap ``training_step``; refuse manual optimization."""
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "Distillation adds its loss to the loss `training_step` returns, which manual optimization does not "
                "use: call `manual_backward` on your loss plus `distillation_loss(...)` yourself, or use automatic "
                "optimization"
            )
        configure_model_early(trainer, pl_module)
        for name in [n for n in (self.output_module, *self.modules) if n is not None]:
            try:
                pl_module.get_submodule(name)
            except AttributeError as error:
                raise ValueError(
                    f"Distillation: the module {name!r} does not exist in {type(pl_module).__name__}"
                ) from error
        if self.teacher is None:
            self.teacher = self._build_teacher(pl_module)
        self._register(pl_module)
        rank_zero_info(
            f"Distillation: {self.loss} loss x {self.weight:g} from a frozen teacher "
            f"({self._describe_teacher()}) on {self.output_module or 'the forward output'}"
            + (f" and {', '.join(self.modules)}" if self.modules else "")
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the teacher where the student is (device, and dtype under ``*-true`` precisions)."""
        parameter = next(pl_module.parameters(), None)
        if parameter is not None and self.teacher is not None:
            self.teacher.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the hooks and the wrapper (the module is left as it was given)."""
        if stage != "fit":
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._wrapped is not None and pl_module.__dict__.get("training_step") is self._wrapped:
            del pl_module.training_step
        self._wrapped = None

    # --- the loss -----------------------------------------------------------------------------------------------

    def _build_teacher(self, pl_module: LightningModule) -> nn.Module:
        source = self.teacher_source
        if isinstance(source, nn.Module):
            teacher = source
        else:
            teacher = float_view(pl_module)  # a copy with fake-quant modules stripped, weights as they are
            teacher = module_copy(pl_module) if teacher is pl_module else teacher
            if source is not None:
                state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
                teacher.load_state_dict(state.get("state_dict", state))
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    def _describe_teacher(self) -> str:
        source = self.teacher_source
        if source is None:
            return "the model at setup"
        return type(source).__name__ if isinstance(source, nn.Module) else os.fspath(source)

    def _register(self, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        output = pl_module.get_submodule(self.output_module) if self.output_module else pl_module
        self._handles.append(output.register_forward_hook(self._capture_output, with_kwargs=True))
        for name in self.modules:
            hook = functools.partial(self._capture_intermediate, name)
            self._handles.append(pl_module.get_submodule(name).register_forward_hook(hook))
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._captured = {}
            self._capturing = True
            try:
                result = original(*args, **kwargs)
            finally:
                self._capturing = False
            return self._add_loss(pl_module, result)

        self._wrapped = training_step
        pl_module.training_step = training_step

    def _capture_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing and "output" not in self._captured:  # the first call of the step is the student's
            self._captured["output"] = (args, kwargs, output)

    def _capture_intermediate(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._capturing and name not in self._captured:
            self._captured[name] = output

    def _teacher_outputs(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        teacher = self.teacher
        # A teacher handed over as a module stands for the distilled module itself; a copy of the model is entered
        # at `output_module` like the student.
        given = isinstance(self.teacher_source, nn.Module)
        target = teacher.get_submodule(self.output_module) if self.output_module and not given else teacher
        inner: dict[str, Any] = {}
        handles = [
            teacher.get_submodule(name).register_forward_hook(
                lambda module, module_args, output, name=name: inner.setdefault(name, output)
            )
            for name in self.modules
        ]
        try:
            with torch.no_grad():
                output = target(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return output, inner

    def _add_loss(self, pl_module: LightningModule, result: Any) -> Any:
        captured = self._captured
        self._captured = {}
        if "output" not in captured or result is None:
            raise RuntimeError(
                "Distillation: the training step did not call "
                f"{self.output_module or 'the module forward'}; name the submodule it calls in `output_module`"
            )
        args, kwargs, student = captured["output"]
        teacher, teacher_inner = self._teacher_outputs(args, kwargs)
        loss = distillation_loss(_first_tensor(student), _first_tensor(teacher), self.loss, self.temperature)
        for name in self.modules:
            loss = loss + F.mse_loss(_first_tensor(captured[name]).float(), _first_tensor(teacher_inner[name]).float())
        pl_module.log("distill/loss", loss.detach(), on_step=True, on_epoch=False)
        total = self.weight * loss
        if isinstance(result, Tensor):
            return result + total.to(result.dtype)
        if isinstance(result, Mapping) and isinstance(result.get("loss"), Tensor):
            return {**result, "loss": result["loss"] + total.to(result["loss"].dtype)}
        raise TypeError(
            f"Distillation: training_step returned {type(result).__name__}; it needs the loss tensor or a dict with "
            "'loss' to add the distillation loss to"
        )

    # --- state --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The settings only: the teacher is rebuilt from the same start (or path), never stored in the checkpoint."""
        return {"weight": self.weight, "loss": self.loss, "temperature": self.temperature}

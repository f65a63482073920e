"""Weight-only group-wise quantization (int4 or int8 weights, float activations): ``W4A16`` for language models.

:func:`quantize_weights` returns a copy of a model whose selected matrix products (every ``nn.Linear`` and every
transposed Linear such as GPT-2's ``Conv1D``, found by what it computes) hold group-wise integers in the layout of
ONNX Runtime's ``MatMulNBits`` (:mod:`groupwise`). The copy computes exactly ``x @ dequantized(W)^T + b``, the
product the runtime's fp32-accuracy kernel computes (``accuracy_level=1``: the weights are unpacked to float and the
activations stay float), so what is evaluated is what is deployed (contract 14). With ``activations="dynamic"``
(``8da4w``) the layers round their inputs to int8 per token and group exactly as the runtime's ``accuracy_level=4``
kernel does (:mod:`block_activations`), and the export writes that level; never one whose integers are not modelled.

Methods (named like ORT's ``MatMulNBitsQuantizer`` configs):

- ``"rtn"``: round to nearest, data-free.
- ``"gptq"``: data-aware: each layer's Hessian from calibration inputs (one pass of the float model), then GPTQ
  error compensation with a per-group range search (:mod:`gptq`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_accel._core.inputs import batch_picker, run_model
from lightning_accel._core.modules import is_transposed_linear, module_copy, select_modules
from lightning_accel._core.validation import validate_int
from lightning_accel.export.onnx import write_onnx
from lightning_accel.quantization.gptq import HessianAccumulator, quantize_groups_gptq
from lightning_accel.quantization.group_linear import WEIGHT_ONLY_ACTIVATIONS, GroupQuantizedLinear
from lightning_accel.quantization.groupwise import (
    GROUP_BITS_CHOICES,
    GROUP_SIZE_CHOICES,
    quantize_groups_rtn,
)

WEIGHT_ONLY_METHODS = ("rtn", "gptq")


def validate_weight_only(bits: Any, group_size: Any, method: Any, activations: Any = "float") -> None:
    """Raise ``ValueError`` naming the argument unless the bits, group size, method and activations are supported."""
    if bits not in GROUP_BITS_CHOICES:
        raise ValueError(
            f"`weight_bits` for group-wise weights must be one of {list(GROUP_BITS_CHOICES)}, got {bits!r}"
        )
    if group_size not in GROUP_SIZE_CHOICES:
        raise ValueError(f"`group_size` must be one of {list(GROUP_SIZE_CHOICES)}, got {group_size!r}")
    if method not in WEIGHT_ONLY_METHODS:
        raise ValueError(f"`method` must be one of {list(WEIGHT_ONLY_METHODS)}, got {method!r}")
    if activations not in WEIGHT_ONLY_ACTIVATIONS:
        raise ValueError(
            f"`activations` for group-wise weights must be one of {list(WEIGHT_ONLY_ACTIVATIONS)} (float: W4A16; "
            f"dynamic: int8 per token and group, 8da4w), got {activations!r}"
        )
    if activations == "dynamic" and bits != 4:
        raise ValueError(
            f"`activations`='dynamic' with group-wise weights needs weight_bits=4 (int4 weights, int8 activations: "
            f"the kernel modelled), got weight_bits={bits!r}"
        )


def _weight_of(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a transposed Linear stores ``[in, out]``)."""
    return module.weight.T if is_transposed_linear(module) else module.weight


def weight_only_targets(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    owner: str = "quantize_weights",
) -> dict[str, nn.Module]:
    """The matrix products to quantize: Linears and transposed Linears, by ``include``/``exclude`` patterns."""
    candidates = select_modules(model, include, exclude, types=(nn.Module,), owner=owner)
    return {
        name: module
        for name, module in candidates.items()
        if (type(module) is nn.Linear or type(module).forward is nn.Linear.forward) or is_transposed_linear(module)
    }


def collect_hessians(
    model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[Any], model_input: Any = None, limit: int = 8
) -> dict[str, HessianAccumulator]:
    """One pass of the float model over up to ``limit`` batches: each target's input Hessian ``2 X X^T / n``."""
    accumulators = {name: HessianAccumulator(_weight_of(m).shape[1]) for name, m in targets.items()}
    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: accumulators[name].add(args[0]))
        for name, module in targets.items()
    ]
    pick = batch_picker(model_input, model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if index >= limit:
                    break
                run_model(model, pick(batch))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    unused = [name for name, accumulator in accumulators.items() if accumulator.samples == 0]
    if unused:
        raise RuntimeError(
            f"quantize_weights(method='gptq'): {len(unused)} layers never ran on the calibration batches "
            f"({unused[:5]}), so they have no inputs to calibrate on; exclude them or use method='rtn'"
        )
    return accumulators


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def quantize_weights(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    symmetric: bool = True,
    method: str = "rtn",
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 8,
    model_input: Any = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    activations: str = "float",
) -> nn.Module:
    """A copy of ``model`` with group-wise integer weights (``MatMulNBits`` layout); ``model`` is unchanged.

    Args:
        model: The float model.
        bits: 4 (default) or 8.
        group_size: Values per scale along each row's inputs: 16, 32 (default), 64, 128 or 256.
        symmetric: Store no zero point (the runtime's default middle level); ``False`` stores one per group.
        method: ``"rtn"`` (round to nearest, no data) or ``"gptq"`` (error compensation on ``calibration``).
        calibration: Batches for ``"gptq"`` (e.g. a training DataLoader).
        calibration_batches: How many of them.
        model_input: Which part of a batch is the model's input (see ``PostTrainingQuantization``).
        include: Module patterns to quantize (default: every Linear and transposed Linear, the LM head included).
        exclude: Module patterns to keep in float.
        activations: ``"float"`` (default, W4A16) or ``"dynamic"`` (int4 only: each token's inputs rounded to int8
            per group inside the kernel, ``8da4w``; exported at ``accuracy_level=4``).

    Returns:
        The quantized copy, in eval mode; export it with :func:`export_weight_only_onnx`.
    """
    validate_weight_only(bits, group_size, method, activations)
    calibration_batches = validate_int("calibration_batches", calibration_batches, 1)
    if method == "gptq" and calibration is None:
        raise ValueError("quantize_weights(method='gptq') needs `calibration` batches (e.g. a DataLoader)")
    copy = module_copy(model).eval()
    targets = weight_only_targets(copy, include, exclude)
    if not targets:
        raise ValueError("quantize_weights: the selection holds no Linear or transposed Linear layer to quantize")
    hessians = (
        collect_hessians(copy, targets, calibration, model_input, calibration_batches) if method == "gptq" else {}
    )
    for name, module in targets.items():
        weight = _weight_of(module).detach().float()
        if method == "gptq":
            quantized = quantize_groups_gptq(weight, hessians[name].hessian, bits, group_size, symmetric)
        else:
            quantized = quantize_groups_rtn(weight, bits, group_size, symmetric)
        layer = GroupQuantizedLinear(quantized, module.bias, activations)
        _replace(copy, name, layer.to(module.weight.device))
    rank_zero_info(
        f"quantize_weights: {len(targets)} layers to {describe_format(bits, group_size, symmetric, activations)} "
        f"({method}); every other layer stays float"
    )
    return copy


@dataclass(frozen=True)
class WeightOnlySettings:
    """How :func:`quantize_weights` quantizes, validated once (PTQ's ``weight_bits=4`` or ``activations="float"``).

    Attributes:
        bits: 4 or 8.
        group_size: Values per scale along the inputs.
        symmetric: No stored zero point (``True``) or one per group.
        method: ``"rtn"`` or ``"gptq"``.
        include: Module patterns to quantize.
        exclude: Module patterns to keep in float.
        activations: ``"float"`` (W4A16) or ``"dynamic"`` (int8 per token and group, 8da4w).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    activations: str = "float"

    def __post_init__(self) -> None:
        validate_weight_only(self.bits, self.group_size, self.method, self.activations)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"`symmetric` must be True or False, got {self.symmetric!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if value is not None else None)

    def quantize(self, model: nn.Module, calibration: Iterable[Any] | None = None, **options: Any) -> nn.Module:
        """:func:`quantize_weights` with these settings (``"gptq"`` without calibration falls back to ``"rtn"``)."""
        fields = dataclasses.asdict(self)
        if calibration is None:
            fields["method"] = "rtn"
        fields["include"] = list(self.include) if self.include is not None else None
        fields["exclude"] = list(self.exclude) if self.exclude is not None else None
        return quantize_weights(model, calibration=calibration, **fields, **options)


def weight_only_settings(
    weight_bits: Any,
    activations: Any,
    embeddings: Any,
    group_size: Any,
    method: Any,
    symmetric: Any,
    include: list[str] | None,
    exclude: list[str] | None,
) -> WeightOnlySettings | None:
    """PTQ's weight-only settings when its arguments ask for them (4 bits, or float activations); else ``None``."""
    if weight_bits != 4 and activations != "float":
        return None
    if activations not in (None, *WEIGHT_ONLY_ACTIVATIONS):
        raise ValueError(
            f"`activations`={activations!r} with weight_bits=4: int4 weights run with float activations "
            "('float' or None: W4A16) or int8 activations rounded per token and group inside the kernel ('dynamic': "
            "8da4w); static int8 ranges belong to the int8 path"
        )
    if embeddings != "float":
        raise ValueError(
            f"`embeddings`={embeddings!r} with weight-only groups: embeddings stay float there (set "
            "embeddings='float'); the int8 embedding tables belong to the int8 activation path"
        )
    activations = activations or "float"
    return WeightOnlySettings(weight_bits, group_size, symmetric, method, include, exclude, activations)


def export_weight_only_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Any,
    check_inputs: Sequence[Any] | None = None,
    on_mismatch: str = "warn",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classification: bool | None = True,
) -> tuple[Path, Any]:
    """Write a :func:`quantize_weights` model to ONNX (``MatMulNBits`` nodes) and check it in ONNX Runtime.

    The check compares the file with the model on ``example_input`` and ``check_inputs``: cosine and SNR of the
    first output and, for logits (``classification``, by default), argmax agreement, which for a language model's
    ``[batch, tokens, vocabulary]`` logits is next-token agreement at every position.

    Returns:
        The path written and the check's figures (see ``export_onnx_checked``).
    """
    if not group_quantized_layers(model):
        raise ValueError("export_weight_only_onnx: `model` holds no group-quantized layer; run quantize_weights first")
    reference = module_copy(model).eval()
    return write_onnx(
        reference,
        module_copy(reference),
        path,
        example_input,
        check_inputs=check_inputs,
        on_mismatch=on_mismatch,
        dynamic_axes=dynamic_axes,
        classification=classification,
        note=f" (weights in {describe_weight_only(model)})",
    )


def describe_format(bits: int, group_size: int, symmetric: bool, activations: str = "float") -> str:
    """``"int4 groups of 32, symmetric"`` (``"..., int8 activations per token and group"`` for ``8da4w``)."""
    text = f"int{bits} groups of {group_size}, {'symmetric' if symmetric else 'asymmetric'}"
    return text + (", int8 activations per token and group" if activations == "dynamic" else "")


def describe_weight_only(model: nn.Module) -> str:
    """What the model's group-quantized layers store (:func:`describe_format`, one per distinct format)."""
    layers = group_quantized_layers(model).values()
    kinds = sorted({(m.bits, m.group_size, m.zero_points is None, m.activations) for m in layers})
    return "; ".join(describe_format(*kind) for kind in kinds)


def dry_run_weight_only(
    model: nn.Module,
    settings: WeightOnlySettings,
    example_input: Any,
    owner: str,
    deployable: Callable[[nn.Module], nn.Module] | None = None,
) -> None:
    """Export a deployable copy (by default round to nearest), so that the end of fit cannot fail on the export.

    Args:
        model: The model being trained.
        settings: The group format.
        example_input: What the export traces with.
        owner: The callback named in the error.
        deployable: Makes the copy to export (QAT's rounded weights); default ``settings.quantize``.
    """
    try:
        probe = (deployable or settings.quantize)(model)
        with tempfile.TemporaryDirectory() as directory:
            export_weight_only_onnx(probe, Path(directory) / "dry_run.onnx", example_input, on_mismatch="ignore")
    except Exception as error:
        raise RuntimeError(
            f"{owner}: the {settings.bits}-bit weight-only export of {type(model).__name__} fails on its "
            f"example_input_array, so it would fail at the end of fit. Checked at setup, before training: "
            f"{type(error).__name__}: {error}"
        ) from error


def group_quantized_layers(model: nn.Module) -> dict[str, GroupQuantizedLinear]:
    """The group-quantized layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GroupQuantizedLinear)}

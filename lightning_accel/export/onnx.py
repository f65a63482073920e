"""Writing ONNX files: tracing, the int8 QDQ graph passes, and the check of the file in ONNX Runtime.

The fake-quant ops export (TorchScript exporter, ``dynamo=False``) as QuantizeLinear/DequantizeLinear pairs, which
ONNX Runtime fuses into int8 kernels (QLinearConv, QGemm) and TensorRT reads as explicit quantization. The weights
are then stored as int8 initializers, so the file is about a quarter of the fp32 one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.files import atomic_target
from lightning_accel._core.modules import module_copy
from lightning_accel._core.outputs import named_outputs, output_tensors
from lightning_accel._core.validation import ON_MISMATCH_CHOICES, validate_int
from lightning_accel.export.check import (
    MIN_AGREEMENT,
    MIN_SNR_DB,
    ExportCheck,
    as_float32,
    check_onnx,
    run_float32,
    split_example,
)
from lightning_accel.export.int8_passes import share_identical_scalars, store_int8_weights, store_int32_biases

ONNX_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError("Exporting to ONNX needs the `onnx` extra: pip install 'lightning-accel[onnx]'") from err
    return onnx


def validate_export_arguments(
    example_input: Any, check_inputs: Sequence[Any] | None, opset_version: int, on_mismatch: str
) -> int:
    """Check the arguments every ONNX export takes before anything is converted; return the opset as an int."""
    _check_example_input("example_input", example_input)
    for index, extra in enumerate(check_inputs or ()):
        _check_example_input(f"check_inputs[{index}]", extra)
    if on_mismatch not in ON_MISMATCH_CHOICES:
        raise ValueError(f"`on_mismatch` must be one of {list(ON_MISMATCH_CHOICES)}, got {on_mismatch!r}")
    return validate_int("opset_version", opset_version, 13)  # per-channel QuantizeLinear needs opset 13


def export_float_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    opset_version: int = ONNX_OPSET,
    check_inputs: Sequence[Any] | None = None,
    on_mismatch: str = "warn",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classification: bool | None = None,
) -> tuple[Path, ExportCheck | None]:
    """Export a plain (float) model to fp32 ONNX, checked in ONNX Runtime against the model in eval mode.

    The arguments are those of :func:`lightning_accel.export_onnx`, which also exports fake-quantized models.

    Returns:
        The path written, and the check's figures (``None`` when not checked in ONNX Runtime).
    """
    opset_version = validate_export_arguments(example_input, check_inputs, opset_version, on_mismatch)
    reference = module_copy(model).eval().float()
    # The tracer runs its own copy: tracing can change a model's later forwards (a Hugging Face BERT traced once
    # computed other outputs afterwards, cosine 0.95), and the reference must stay the model as evaluated.
    return write_onnx(
        reference,
        module_copy(reference),
        path,
        example_input,
        opset_version=opset_version,
        check_inputs=check_inputs,
        on_mismatch=on_mismatch,
        dynamic_axes=dynamic_axes,
        classification=classification,
    )


def write_onnx(
    reference: nn.Module,
    traced: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    opset_version: int = ONNX_OPSET,
    check_inputs: Sequence[Any] | None = None,
    on_mismatch: str = "warn",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classification: bool | None = None,
    int8: bool = False,
    min_snr_db: Callable[[], float] | None = None,
    note: str = "",
) -> tuple[Path, ExportCheck | None]:
    """Trace ``traced`` to ONNX at ``path`` (atomically) and check the file against ``reference`` in ONNX Runtime.

    The technique-agnostic half of every ONNX export: the caller has already made the copy the runtime will execute
    (``traced``) and the model it must reproduce (``reference``). With ``int8`` the QDQ graph passes run: weights
    stored as int8, biases as int32, identical scalars shared.

    Args:
        reference: What the file must compute (the model as evaluated).
        traced: The copy to trace (never the reference itself).
        path: Where the ``.onnx`` goes.
        example_input: One tensor, a tuple of positional inputs, or a dict of keyword inputs.
        opset_version: The ONNX opset.
        check_inputs: More inputs to check the file on.
        on_mismatch: ``"warn"``, ``"raise"`` (``path`` is left as it was) or ``"ignore"`` (no check).
        dynamic_axes: The axes that vary, by input/output name; by default batch and sequence axes.
        classification: Whether the output is logits (argmax agreement is measured only then).
        int8: Whether to run the int8 QDQ graph passes.
        min_snr_db: The SNR the file must reach, computed when the check runs; ``None``: ``MIN_SNR_DB``.
        note: Said in the log line beside the check's figures.

    Returns:
        The path written, and the check's figures (``None`` when not checked in ONNX Runtime).
    """
    onnx = _require_onnx()
    inputs = [example_input, *(check_inputs or ())]
    args, kwargs, input_names = split_example(example_input)
    raw_output = run_float32(traced, example_input)
    output_names = _output_names(raw_output)
    if not _is_plain_output(raw_output):
        # The tracer cannot map keyword inputs onto a ``**kwargs`` signature: the wrapper takes every input
        # positionally and hands the keyword ones back to the model by name.
        traced = _TensorOutputs(traced, len(args), list(kwargs))
        args, kwargs = (*args, *kwargs.values()), {}
    if dynamic_axes is None:
        dynamic_axes = default_dynamic_axes(example_input, raw_output, input_names, output_names)
    else:
        dynamic_axes = _check_dynamic_axes(dynamic_axes, input_names + output_names)

    target = Path(path)
    with atomic_target(target) as temporary:
        with warnings.catch_warnings():
            # The TorchScript exporter is the one that maps ATen fake-quant ops to QDQ; its deprecation notice and
            # tracer warnings about constant scales are expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                traced.cpu(),
                tuple(as_float32(a).cpu() for a in args),
                str(temporary),
                kwargs={k: as_float32(v).cpu() for k, v in kwargs.items()} if kwargs else None,
                dynamo=False,
                opset_version=opset_version,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        onnx_model = onnx.load(str(temporary))
        if int8:
            store_int8_weights(onnx_model)
            store_int32_biases(onnx_model)
            share_identical_scalars(onnx_model)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(temporary))
        check = None
        if on_mismatch != "ignore":
            check = _check_written(reference, temporary, target, inputs, on_mismatch, classification, min_snr_db, note)
    return target, check


def default_dynamic_axes(
    example_input: Any, output: Any, input_names: list[str], output_names: list[str]
) -> dict[str, dict[int, str]]:
    """Batch everywhere; the sequence axis of integer token inputs (``input_ids``, masks) and of matching outputs.

    Token models take any length (Hugging Face encoders, GPT-2): fixing the example's length made ONNX Runtime
    refuse other lengths ("Got: 48 Expected: 32").
    """
    args, kwargs, _ = split_example(example_input)
    inputs = dict(zip(input_names, [*args, *kwargs.values()], strict=True))
    axes = {name: {0: "batch"} for name in input_names + output_names}
    # One label per length in the example: `input_ids` and `attention_mask` share theirs, while an
    # encoder-decoder's `decoder_input_ids` gets its own (one shared label made ORT refuse T5's two lengths).
    labels: dict[int, str] = {}
    for name, tensor in inputs.items():
        if not tensor.is_floating_point() and tensor.dim() >= 2:
            length = int(tensor.shape[1])
            axes[name][1] = labels.setdefault(length, "sequence" if not labels else f"{name}_sequence")
    for name, tensor in zip(output_names, output_tensors(output), strict=True):
        if labels and tensor.dim() >= 3 and int(tensor.shape[1]) in labels:
            axes[name][1] = labels[int(tensor.shape[1])]
    return axes


def _check_dynamic_axes(dynamic_axes: Any, names: list[str]) -> dict[str, dict[int, str]]:
    if not isinstance(dynamic_axes, Mapping) or not all(isinstance(v, Mapping) for v in dynamic_axes.values()):
        raise TypeError(
            "`dynamic_axes` must map input/output names to {axis: name} dicts, e.g. "
            f"{{'input_ids': {{0: 'batch', 1: 'sequence'}}}}, got {dynamic_axes!r}"
        )
    unknown = sorted(set(dynamic_axes) - set(names))
    if unknown:
        raise ValueError(f"`dynamic_axes` names {unknown}, which are not inputs or outputs; they are {names}")
    return {name: {int(axis): str(label) for axis, label in axes.items()} for name, axes in dynamic_axes.items()}


class _TensorOutputs(nn.Module):
    """Returns a model's dict or dataclass output as a tuple, which the tracer can follow; names go separately."""

    def __init__(self, model: nn.Module, positional: int, keyword_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.positional = positional
        self.keyword_names = keyword_names

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        keywords = dict(zip(self.keyword_names, inputs[self.positional :], strict=True))
        return tuple(output_tensors(self.model(*inputs[: self.positional], **keywords)))


def _output_names(output: Any) -> list[str]:
    names = [name for name, _ in named_outputs(output)]
    if len(set(names)) != len(names):
        raise ValueError(f"The model's output names are not unique: {names}")
    return names


def _is_plain_output(output: Any) -> bool:
    return isinstance(output, torch.Tensor) or (
        isinstance(output, tuple | list) and all(isinstance(t, torch.Tensor) for t in output)
    )


def _check_example_input(argument: str, example_input: Any) -> None:
    if isinstance(example_input, Mapping):
        values = list(example_input.values())
    elif isinstance(example_input, tuple):
        values = list(example_input)
    else:
        values = [example_input]
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(
            f"`{argument}` must be a tensor, a tuple of positional input tensors or a dict of keyword input "
            f"tensors, got {_describe(example_input)}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a dict of " + ", ".join(f"{k}: {type(v).__name__}" for k, v in value.items())
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of " + ", ".join(type(v).__name__ for v in value)
    return type(value).__name__


def _check_written(
    reference: nn.Module,
    written: Path,
    target: Path,
    inputs: list[Any],
    on_mismatch: str,
    classification: Any,
    min_snr_db: Callable[[], float] | None,
    note: str,
) -> ExportCheck | None:
    """Run the written file in ONNX Runtime and compare with the evaluated model; log, and warn or raise."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        rank_zero_info(f"Not checking {target.name} against PyTorch: onnxruntime is not installed (extra `onnx`)")
        return None
    result = check_onnx(reference, written, inputs, classification)
    wanted_snr = min_snr_db() if min_snr_db is not None else MIN_SNR_DB
    rank_zero_info(f"Checked {target.name} in ONNX Runtime against the evaluated PyTorch model{note}: {result}")
    if result.passed(min_snr_db=wanted_snr):
        return result
    message = (
        f"The ONNX model {target} does not reproduce the PyTorch model: {result} (wanted agreement >= "
        f"{MIN_AGREEMENT:.0%} and SNR >= {wanted_snr:.0f} dB). The runtime would compute something other than "
        "what was validated."
    )
    if on_mismatch == "raise":
        raise RuntimeError(message + f" {target} was left as it was.")
    rank_zero_warn(message)
    return result

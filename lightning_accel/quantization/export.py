"""``export_onnx``: any model to ONNX, an int8 QDQ model when it is fake-quantized, checked against what was evaluated.

The fake-quant ops export (TorchScript exporter, ``dynamo=False``) as QuantizeLinear/DequantizeLinear pairs, which
ONNX Runtime fuses into int8 kernels (QLinearConv, QGemm) and TensorRT reads as explicit quantization. The weights
are then stored as int8 initializers, so the file is about a quarter of the fp32 one. This module is quantization's
convert step meeting the technique-agnostic writer (:mod:`lightning_accel.export.onnx`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_accel.export.check import ExportCheck, check_rewrite
from lightning_accel.export.onnx import ONNX_OPSET, export_float_onnx, validate_export_arguments, write_onnx
from lightning_accel.quantization.convert import as_evaluated, dynamic_min_snr_db, to_deployable
from lightning_accel.quantization.dynamic import has_dynamic_layers
from lightning_accel.quantization.prepare import is_prepared


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    opset_version: int = ONNX_OPSET,
    check_inputs: Sequence[Any] | None = None,
    on_mismatch: str = "warn",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classification: bool | None = None,
) -> Path:
    """Export ``model`` to ONNX and check it: see :func:`export_onnx_checked`, which also returns the figures.

    Returns:
        The path written.

    Example:
        >>> export_onnx(model, "model.int8.onnx", torch.zeros(1, 1, 8, 8))  # doctest: +SKIP
    """
    return export_onnx_checked(
        model, path, example_input, opset_version, check_inputs, on_mismatch, dynamic_axes, classification
    )[0]


def export_onnx_checked(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    opset_version: int = ONNX_OPSET,
    check_inputs: Sequence[Any] | None = None,
    on_mismatch: str = "warn",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classification: bool | None = None,
) -> tuple[Path, ExportCheck | None]:
    """Export ``model`` to ONNX: an int8 QDQ model if it is fake-quantized, an ordinary fp32 model otherwise.

    The batch dimension of every input and output is dynamic, and so is the sequence dimension of token inputs
    (see ``dynamic_axes``). The file is written under a temporary name and renamed, so ``path`` never holds a
    half-written model. ``model`` itself is not changed.

    The export checks itself against the model as it is evaluated (:func:`as_evaluated`: for a fake-quantized
    model, fake quantization in eval mode), never against its own intermediate copy. First, before anything is
    written, the deployable copy (BatchNorms folded, weights on their integer grid) must compute what the
    evaluated model computes on ``example_input`` and ``check_inputs``, or a ``RuntimeError`` says so. Then the
    written file runs in ONNX Runtime on the same inputs and is compared with the evaluated model (argmax
    agreement for logits, SNR and max abs difference); the figures and the sample count are logged, with a
    warning when agreement is below 99% or SNR below 30 dB. Without onnxruntime installed, that second check is
    skipped with a note.

    Args:
        model: A plain model, or one prepared by ``QuantizationAwareTraining`` / ``calibrate_``.
        path: Where to write the ``.onnx`` file.
        example_input: One input tensor, a tuple of positional inputs, or a dict of keyword inputs (their names
            become the ONNX input names).
        opset_version: ONNX opset (QuantizeLinear with per-channel axis needs >= 13).
        check_inputs: More example inputs (e.g. a calibration or validation batch) to check the file on.
        on_mismatch: ``"warn"`` (default), ``"raise"`` (a ``RuntimeError``, and ``path`` is left as it was), or
            ``"ignore"`` (no check).
        dynamic_axes: The axes that vary, by input/output name: ``{"input_ids": {0: "batch", 1: "sequence"}}``.
            By default the batch axis of everything, and the sequence axis (1) of integer token inputs and of the
            outputs whose axis 1 has the example's sequence length, so one file takes any batch and length.
        classification: Whether the output is logits, for the check: argmax agreement is measured only then
            (``None``: a 2-D output with several columns is taken for logits); cosine is measured always.

    Returns:
        The path written, and the check's figures (``None`` when not checked in ONNX Runtime).
    """
    arguments = dict(
        opset_version=opset_version,
        check_inputs=check_inputs,
        on_mismatch=on_mismatch,
        dynamic_axes=dynamic_axes,
        classification=classification,
    )
    if not is_prepared(model):
        return export_float_onnx(model, path, example_input, **arguments)
    arguments["opset_version"] = validate_export_arguments(example_input, check_inputs, opset_version, on_mismatch)
    reference = as_evaluated(model)
    deploy = to_deployable(model)
    inputs = [example_input, *(check_inputs or ())]
    check_rewrite(reference, deploy, inputs, "The deployable int8 copy (BatchNorms folded, weights on their grid)")
    dynamic = has_dynamic_layers(reference)
    return write_onnx(
        reference,
        deploy,
        path,
        example_input,
        int8=True,
        min_snr_db=(lambda: dynamic_min_snr_db(reference, inputs)) if dynamic else None,
        note=(
            " (dynamic activations: batch for batch, wanted SNR at least the int8 model's own SNR to its float "
            "weights, within [10, 30] dB)"
            if dynamic
            else ""
        ),
        **arguments,
    )

"""Exporting a model to ONNX: int8 QDQ for fake-quantized models, plain fp32 otherwise.

The fake-quant ops export (TorchScript exporter, ``dynamo=False``) as QuantizeLinear/DequantizeLinear pairs, which
ONNX Runtime fuses into int8 kernels (QLinearConv, QGemm) and TensorRT reads as explicit quantization. The weights
are then stored as int8 initializers, so the file is about a quarter of the fp32 one.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_accel._validation import validate_int
from lightning_accel.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from lightning_accel.quantization.prepare import activation_quantizers, is_prepared, quantized_modules

ONNX_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError("Exporting to ONNX needs the `onnx` extra: pip install 'lightning-accel[onnx]'") from err
    return onnx


def _replace_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


@torch.no_grad()
def to_deployable(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of a fake-quantized ``model`` as the runtime will execute it.

    BatchNorms folded during training are folded into their conv for real (weight and bias) and replaced by
    ``nn.Identity``; weight scales are fixed; every quantizer fake-quantizes with constant parameters. ``model`` is
    not changed, so training can go on.

    Raises:
        ValueError: when ``model`` is not prepared, or a quantizer has never observed data.
    """
    if not is_prepared(model):
        raise ValueError("`model` has no fake-quantized modules; prepare it with QuantizationAwareTraining first")
    uncalibrated = [name for name, q in activation_quantizers(model).items() if not q.calibrated]
    if uncalibrated:
        raise ValueError(
            f"The activation ranges of {uncalibrated[:3]} (and {max(0, len(uncalibrated) - 3)} more) were never "
            "observed: train past QuantizationAwareTraining's `start_step`, or calibrate with `calibrate_`, "
            "before exporting"
        )
    for module in quantized_modules(model).values():
        module._fold_check = None  # a pending non-leaf tensor cannot be deep-copied
    deploy = copy.deepcopy(model).eval()
    for module in quantized_modules(deploy).values():
        bn = module.folded_bn
        if bn is not None:
            weight, factor = module.folded_weight_and_factor()
            bias = module.bias if module.bias is not None else torch.zeros_like(factor)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(factor)
            module.weight = nn.Parameter(weight.detach().clone())
            module.bias = nn.Parameter(((bias - bn.running_mean) * factor + beta).detach())
            module.output_quant = bn.output_quant
            object.__setattr__(module, "folded_bn", None)
            _replace_submodule(deploy, bn.folded_name, nn.Identity())
        if module.weight_quant.observe:  # scales still followed the weights: fix them for these weights
            module.weight_quant(module.weight)
    for quantizer in deploy.modules():
        if isinstance(quantizer, ActivationFakeQuant | WeightFakeQuant):
            quantizer.observe = False
            quantizer.fake_quant = True
            quantizer.export_constants = True
    return deploy


def _constant_arrays(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays


def store_int8_weights(onnx_model: Any) -> int:
    """Replace each QuantizeLinear of a constant (a weight) by its int8 result, stored as an initializer.

    The exporter writes fp32 weights followed by QuantizeLinear; quantizing them ahead of time makes the file about
    4x smaller, and leaves the DequantizeLinear that ONNX Runtime fuses into int8 kernels.

    Returns:
        How many weights were converted.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    constants = _constant_arrays(graph)
    replaced = {}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in constants or node.input[1] not in constants:
            continue
        weight, scale = constants[node.input[0]], constants[node.input[1]]
        zero_point = constants[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zero_point.dtype)
        quantized = np.round(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64)
        name = f"{node.output[0]}_quantized"
        graph.initializer.append(
            numpy_helper.from_array(np.clip(quantized, info.min, info.max).astype(zero_point.dtype), name)
        )
        replaced[node.output[0]] = name
        graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replaced:
                node.input[index] = replaced[name]
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(replaced)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    opset_version: int = ONNX_OPSET,
) -> Path:
    """Export ``model`` to ONNX: an int8 QDQ model if it is fake-quantized, an ordinary fp32 model otherwise.

    The batch dimension of every input and output is dynamic. The file is written under a temporary name and
    renamed, so ``path`` never holds a half-written model. ``model`` itself is not changed.

    Args:
        model: A plain model, or one prepared by ``QuantizationAwareTraining`` / ``calibrate_``.
        path: Where to write the ``.onnx`` file.
        example_input: One input tensor, a tuple of positional inputs, or a dict of keyword inputs (their names
            become the ONNX input names).
        opset_version: ONNX opset (QuantizeLinear with per-channel axis needs >= 13).

    Returns:
        The path written.

    Example:
        >>> export_onnx(model, "model.int8.onnx", torch.zeros(1, 1, 8, 8))  # doctest: +SKIP
    """
    if not isinstance(example_input, torch.Tensor | tuple | Mapping):
        raise TypeError(
            f"`example_input` must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"got {type(example_input).__name__}"
        )
    validate_int("opset_version", opset_version, 13)  # per-channel QuantizeLinear needs opset 13
    onnx = _require_onnx()
    quantized = is_prepared(model)
    deploy = to_deployable(model) if quantized else copy.deepcopy(model).eval()
    if isinstance(example_input, Mapping):
        args, kwargs, input_names = (), dict(example_input), list(example_input)
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        kwargs, input_names = None, [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    device = next(deploy.parameters()).device
    with torch.no_grad():
        outputs = deploy(*[a.to(device) for a in args], **{k: v.to(device) for k, v in (kwargs or {}).items()})
    output_count = len(outputs) if isinstance(outputs, tuple | list) else 1
    output_names = ["output"] if output_count == 1 else [f"output_{i}" for i in range(output_count)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is the one that maps ATen fake-quant ops to QDQ; its deprecation notice and
            # tracer warnings about constant scales are expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                deploy.cpu(),
                tuple(a.cpu() for a in args),
                str(temporary),
                kwargs={k: v.cpu() for k, v in kwargs.items()} if kwargs else None,
                dynamo=False,
                opset_version=opset_version,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        onnx_model = onnx.load(str(temporary))
        if quantized:
            store_int8_weights(onnx_model)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(temporary))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target

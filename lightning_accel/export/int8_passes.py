"""The int8 QDQ graph passes run on an exported ONNX model: the file holds exactly the integers PyTorch computed.

Weights are stored as int8 initializers behind DequantizeLinear (a quarter of fp32), biases as int32 at
``input_scale * weight_scale`` (the runtime adds them in its integer accumulator), and identical scalar constants
once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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


def share_identical_scalars(onnx_model: Any) -> int:
    """Let every node read one constant per distinct scalar (zero points), instead of one copy per layer.

    Returns:
        How many constants were dropped.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    first: dict[tuple[int, bytes], str] = {}
    replaced: dict[str, str] = {}

    def scalar_key(tensor: Any) -> tuple[int, bytes] | None:
        return (tensor.data_type, numpy_helper.to_array(tensor).tobytes()) if len(tensor.dims) == 0 else None

    for init in graph.initializer:
        key = scalar_key(init)
        if key is not None:
            replaced[init.name] = first.setdefault(key, init.name)
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            key = scalar_key(tensor)
            if key is not None:  # an earlier node or an initializer: it precedes every consumer
                replaced[node.output[0]] = first.setdefault(key, node.output[0])
    replaced = {name: kept for name, kept in replaced.items() if name != kept}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replaced:
                node.input[index] = replaced[name]
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in replaced)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept_inits = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return len(replaced)


def store_int32_biases(onnx_model: Any) -> int:
    """Store the bias of each quantized Conv/Gemm as int32 at scale ``s_x * s_w``, behind a DequantizeLinear.

    This is how int8 kernels add a bias (inside the integer accumulator). Writing the integers here, from a bias
    that ``to_deployable`` already put on that grid, means the runtime adds exactly what PyTorch computed with,
    rather than rounding a float bias itself.

    Returns:
        How many biases were converted.
    """
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    constants = _constant_arrays(graph)
    producers = {output: node for node in graph.node for output in node.output}
    converted = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in constants:
            continue
        activation, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in (activation, weight)):
            continue
        if activation.input[1] not in constants or weight.input[1] not in constants:
            continue
        bias = constants[node.input[2]].astype(np.float32)
        input_scale = constants[activation.input[1]].astype(np.float32)
        weight_scale = constants[weight.input[1]].astype(np.float32)
        scale = np.broadcast_to(input_scale * weight_scale, bias.shape).astype(np.float32)
        info = np.iinfo(np.int32)
        integers = np.clip(np.round(bias / scale), info.min, info.max).astype(np.int32)
        base = f"{node.name or node.output[0]}_bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(integers, f"{base}_int32"),
                numpy_helper.from_array(scale, f"{base}_scale"),
                numpy_helper.from_array(np.zeros_like(integers), f"{base}_zero_point"),
            ]
        )
        dequantize = helper.make_node(
            "DequantizeLinear",
            [f"{base}_int32", f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_dequantized"],
            name=f"{base}_DequantizeLinear",
            axis=0,
        )
        graph.node.insert(list(graph.node).index(node), dequantize)
        node.input[2] = f"{base}_dequantized"
        converted += 1
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return converted

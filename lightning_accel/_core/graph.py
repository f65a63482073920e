"""What consumes each layer's output, from a traced forward pass: the graph that placement and grouping decide from.

Used by quantization (where a layer's output is quantized) and by channel pruning (which groups cross an attention
reshape). A rule keyed on module types silently does the wrong thing on the model families it does not list.

A quantized output costs a rounding and only pays when the consumer takes int8 directly: another quantized layer
(through shape-only ops such as flatten, reshape, transpose or dropout). Softmax, GELU, a residual add, LayerNorm or
an attention matmul take float anyway, and ONNX Runtime still runs the layer's own int8 kernel
(``MatMulIntegerToFloat``) from its quantized input and weight. A rule keyed on module types
(``nn.TransformerEncoderLayer`` only) quantized every Linear output of a Hugging Face ``BertLayer`` to uint8 before
softmax, GELU and LayerNorm (measured on the pretrained MiniLM: cosine 0.942 against 0.992 with float outputs), so
the decision is made here from the forward pass itself, for any model that runs.

The trace runs the float model once on the example input under a ``TorchFunctionMode`` that follows each selected
layer's output tensor through shape-only ops and records every other function that consumes it. Convolutions keep
their quantized output whatever consumes it: ONNX Runtime forms ``QLinearConv`` only with an output quantizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_accel._core.modules import model_device

#: Functions and tensor methods that move values without computing new ones: a quantized tensor stays on its
#: grid through them, so a consumer after them still takes int8 directly.
PASS_THROUGH = frozenset(
    {
        "flatten",
        "reshape",
        "view",
        "view_as",
        "transpose",
        "permute",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "dropout",
        "__getitem__",
        "split",
        "chunk",
        "unbind",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "to",
        "float",
        "clone",
        "detach",
        "expand",
        "narrow",
    }
)
#: Attribute reads the tracer sees as function calls; they consume nothing.
IGNORED_CALLS = frozenset(
    {"size", "dim", "shape", "dtype", "device", "__get__", "__len__", "numel", "is_floating_point"}
)


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in a value: a tensor, or nested lists, tuples and dicts of them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


class _ConsumerTrace(TorchFunctionMode):
    """Follows marked tensors (layer outputs) and records the functions that consume them."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[int, tuple[Tensor, frozenset[str]]] = {}  # the tensor is kept alive: ids stay unique
        self.float_consumers: dict[str, set[str]] = {}
        self.int8_consumers: dict[str, set[str]] = {}
        self.paused = 0

    def mark(self, value: Any, producers: frozenset[str]) -> None:
        for tensor in tensors_in(value):
            known = self.marks.get(id(tensor))
            self.marks[id(tensor)] = (tensor, producers | (known[1] if known else frozenset()))

    def producers_of(self, value: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for tensor in tensors_in(value):
            entry = self.marks.get(id(tensor))
            if entry is not None and entry[0] is tensor:
                found |= entry[1]
        return found

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused:
            return result
        name = _name(func)
        if name in IGNORED_CALLS:
            return result
        producers = self.producers_of((args, kwargs))
        if not producers:
            return result
        if name in PASS_THROUGH:
            self.mark(result, producers)
        else:
            for producer in producers:
                self.float_consumers.setdefault(producer, set()).add(name)
        return result


def trace_consumers(
    model: nn.Module, example_input: Any, layers: Mapping[str, nn.Module]
) -> dict[str, set[str]] | None:
    """The functions (other than quantized layers and shape-only ops) that consume each layer's output.

    Args:
        model: The float model (not yet prepared).
        example_input: An input it runs on (a tensor, a tuple of positional inputs or a dict of keyword inputs).
        layers: The layers to follow, by name; a layer among them consuming another's output counts as int8.

    Returns:
        For each layer, the names of the float consumers (empty: every consumer takes int8, or the output is the
        model's). ``None`` when the model cannot run on ``example_input`` here.
    """
    trace = _ConsumerTrace()
    names = {id(module): name for name, module in layers.items()}
    handles = []

    def before(module: nn.Module, args: tuple) -> None:
        name = names[id(module)]
        for producer in trace.producers_of(args):
            trace.int8_consumers.setdefault(producer, set()).add(name)
        trace.paused += 1  # the layer's own ops are its computation, not a consumer's

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        trace.paused -= 1
        trace.mark(output, frozenset({names[id(module)]}))

    for module in layers.values():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), trace:
            run_example(model, example_input)
    except Exception:
        return None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {name: trace.float_consumers.get(name, set()) for name in layers}


def run_example(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input: a tensor, a tuple of positional inputs or a dict of keyword inputs.

    A ``torch.compile``d model runs eagerly here: these runs trace, check and calibrate at setup, and compiling them
    under a tracing mode failed ("Reconstruction of FakeIdVariable") and made dynamo skip the model's ``forward``
    for good, so the whole training step then ran eagerly, in many small compiled pieces (measured: compiled QAT
    slower than eager QAT).
    """
    device = model_device(model)

    def moved(value: Any) -> Any:
        if isinstance(value, Tensor):
            return (value.float() if value.is_floating_point() else value).to(device)
        return value

    with eager_only():
        if isinstance(example_input, Mapping):
            return model(**{k: moved(v) for k, v in example_input.items()})
        if isinstance(example_input, tuple | list):
            return model(*[moved(v) for v in example_input])
        return model(moved(example_input))


def eager_only() -> Any:
    """A context in which compiled functions run eagerly and nothing is compiled (setup-time runs)."""
    return torch.compiler.set_stance("force_eager")


#: Functions that consume a projection as attention heads: its channels are reshaped into heads there.
ATTENTION_CONSUMERS = frozenset({"scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum", "softmax"})

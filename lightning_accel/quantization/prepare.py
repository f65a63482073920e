"""Preparing a model for int8 fake quantization in place, without renaming or replacing any parameter.

Each selected ``nn.Linear``/``nn.Conv1d/2d/3d`` becomes its quantized subclass (same parameters, same names) with
three child modules: ``input_quant`` (uint8 activations), ``weight_quant`` (int8 per-channel weights) and
``output_quant``. A conv directly followed by a BatchNorm is trained with the BatchNorm folded into its weight, so
the int8 weights the runtime sees are the ones that were trained; the BatchNorm then carries ``output_quant``.
The model's ``forward`` is untouched, so keyword and multiple inputs keep working.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_accel._core.graph import trace_consumers
from lightning_accel._core.modules import BATCH_NORMS, describe_selection, module_copy, select_modules
from lightning_accel._core.views import register_float_view
from lightning_accel.quantization.dynamic import (
    DEFAULT_ACTIVATIONS,
    DynamicActivationFakeQuant,
    is_dynamic,
    validate_activations,
)
from lightning_accel.quantization.embeddings import (
    DEFAULT_EMBEDDINGS,
    QuantizedEmbedding,
    is_quantizable_embedding,
    prepare_embedding_,
    validate_embeddings,
)
from lightning_accel.quantization.fake_quant import (
    DEFAULT_WEIGHT_BITS,
    WEIGHT_BITS_CHOICES,
    ActivationFakeQuant,
    WeightFakeQuant,
    weight_qmax,
)
from lightning_accel.quantization.layers import (
    _check_bn_input,
    _check_relu_input,
    _quantize_after_relu,
    _quantize_bn_output,
    _quantize_relu_output,
    _Quantized,
    _quantized_class,
    _relu_followers,
    computes_linear,
    plain_class,
    quantizable_base,
)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- output quantization after a ReLU ---------------------------------------------------------------------------
# A layer followed by a ReLU is quantized *after* the ReLU: the range starts at 0, so the uint8 zero point is 0
# and ONNX Runtime absorbs the ReLU into QLinearConv/QGemm; the values that reach a MaxPool or Flatten are already
# on the next layer's grid (a MaxPool keeps the range), so ORT runs the pooling in int8 too. Quantizing before
# the ReLU (as before) left DequantizeLinear -> Relu -> MaxPool -> QuantizeLinear in float between the int8 layers.
# The quantizer stays registered on the layer (its state keeps its name); the ReLU module applies it through a
# forward hook. The ReLU is found by registration order and confirmed on the first forward, like a folded
# BatchNorm: if it does not receive the layer's output, quantization stays on the layer.


def is_prepared(model: nn.Module) -> bool:
    """Return whether ``model`` holds fake-quantized modules."""
    return any(isinstance(m, _Quantized) for m in model.modules())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fake-quantized modules by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Quantized)}


def activation_quantizers(model: nn.Module) -> dict[str, ActivationFakeQuant]:
    """Activation fake-quantizers by name (``<module>.input_quant`` / ``<module>.output_quant``), in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationFakeQuant)}


def is_plain_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly a BatchNorm and nothing else, so that folding it loses nothing.

    A subclass that overrides ``forward`` or holds child modules does more: timm's ``BatchNormAct2d`` applies its
    activation inside the norm module, and folding it into the conv would drop that activation from the export.
    """
    return (
        isinstance(module, BATCH_NORMS)
        and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
        and not any(True for _ in module.children())
    )


def _conv_bn_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Convs immediately followed, in registration order, by a plain BatchNorm of matching width.

    A BatchNorm that does more than normalise (:func:`is_plain_batch_norm`) stays unfolded: the conv's output is
    quantized instead, and the norm with whatever it holds runs in float. The selection summary names it.
    """
    entries = list(model.named_modules())
    pairs = {}
    for (name, module), (next_name, following) in itertools.pairwise(entries):
        if (
            quantizable_base(module) in _CONVS
            and is_plain_batch_norm(following)
            and following.num_features == module.out_channels
            and following.track_running_stats
        ):
            pairs[name] = (next_name, following)
    return pairs


def attention_kernel_children(model: nn.Module) -> set[str]:
    """Layers whose weights ``nn.MultiheadAttention`` reads inside its own kernel, never calling their forward.

    Its ``out_proj`` is a Linear subclass, but the fused attention function takes the weight directly, so a
    quantized forward would never run (and calibration would report it as skipped).
    """
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }


#: Where activations are quantized: ``"graph"`` decides each Linear output from what consumes it in a traced
#: forward pass (see ``placement.py``); ``"auto"`` leaves the outputs of Linear layers inside torch's transformer
#: blocks in float (the type-keyed rule before ``"graph"``, kept for its checkpoints); ``"all"`` quantizes every
#: layer's output (the behaviour before the choice existed).
OUTPUT_CHOICES = ("graph", "auto", "all")
DEFAULT_OUTPUTS = "graph"
_TRANSFORMER_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def validate_outputs(outputs: object) -> None:
    """Raise ``ValueError`` naming ``outputs`` unless it is one of :data:`OUTPUT_CHOICES`."""
    if outputs not in OUTPUT_CHOICES:
        raise ValueError(
            f"`outputs` must be one of {list(OUTPUT_CHOICES)} ('graph': a Linear output is quantized only where "
            "every consumer takes int8, decided from a traced forward; 'auto': float outputs for the Linear layers "
            f"of torch's transformer blocks; 'all': quantize every layer's output), got {outputs!r}"
        )


def _inside_transformer_blocks(model: nn.Module) -> set[str]:
    """Names of the modules that sit inside an ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer``."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, _TRANSFORMER_BLOCKS)]
    return {name for name, _ in model.named_modules() if any(name.startswith(f"{block}.") for block in blocks if block)}


def _float_outputs(
    model: nn.Module, selected: dict[str, nn.Module], relus: dict[str, nn.Module], outputs: str, example_input: Any
) -> dict[str, str]:
    """The Linear layers whose output stays float, each with the reason (named in the selection summary)."""
    if outputs == "all":
        return {}
    linears = {n: m for n, m in selected.items() if computes_linear(m) and n not in relus}
    consumers = None
    if outputs == "graph":
        # Every selected layer is followed (a layer consuming another's output takes int8); only Linears decide.
        consumers = trace_consumers(model, example_input, selected) if example_input is not None else None
        if consumers is None:
            why = "no example input" if example_input is None else "the model did not run on its example input"
            rank_zero_info(f"Quantization placement: {why} to trace, so the type rule ('auto') decides Linear outputs")
    if consumers is None:
        inside = _inside_transformer_blocks(model)
        return {n: "inside a transformer block" for n in linears if n in inside}
    return {n: "consumed by " + ", ".join(sorted(used)) for n, used in consumers.items() if used and n in linears}


def prepare_qat_(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    fold_bn: bool = True,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    outputs: str = DEFAULT_OUTPUTS,
    example_input: Any = None,
    activations: str = DEFAULT_ACTIVATIONS,
    embeddings: str = DEFAULT_EMBEDDINGS,
) -> dict[str, nn.Module]:
    """Prepare ``model`` in place for int8 fake quantization (W8A8, static or dynamic activations).

    Parameters keep their identity and names; the fake-quant state lives in non-persistent buffers of new child
    modules, so ``model.state_dict()`` is unchanged. Quantization starts switched off: see :func:`set_qat_phase`.

    Args:
        model: The model to prepare.
        include: Glob patterns over module names to quantize; ``None`` selects every ``nn.Linear`` and
            ``nn.Conv1d/2d/3d``.
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold a BatchNorm that directly follows a conv into the conv's quantized weight.
        weight_bits: 7 (default): weights in [-63, 63], which ONNX Runtime computes exactly on every CPU. 8: the
            full [-127, 127] range, exact only where the int8 dot product accumulates in int32 (x86 with VNNI or
            AMX, ARM, TensorRT); x86 without VNNI then needs the ORT session option ``session.x64quantprecision``.
        outputs: Where layer outputs are quantized. Every Conv output is (after the ReLU module that follows it,
            if any: ONNX Runtime forms QLinearConv only with an output quantizer). ``"graph"`` (default): a Linear
            output is quantized only where every consumer takes int8 directly (another quantized layer, through
            shape-only ops), or it is the model's output; where softmax, GELU, a residual add, LayerNorm or an
            attention matmul consume it, it stays float and ONNX Runtime still runs the layer's int8 kernel
            (``MatMulIntegerToFloat``). Decided by tracing one forward pass on ``example_input``; without one, or
            when the model does not run on it, the ``"auto"`` rule applies, with a note. ``"auto"``: float outputs
            for the Linear layers inside ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer``.
            ``"all"``: quantize every output.
        example_input: An input the model runs on (``example_input_array``), for ``outputs="graph"``.
        activations: ``"static"`` (default): per-tensor uint8 ranges observed in training or calibration.
            ``"dynamic"``: every Linear quantizes its input with a scale computed from that input at run time
            (``DynamicQuantizeLinear``, as ONNX Runtime's ``quantize_dynamic``), and its output stays float; the
            scale spans the whole input tensor, so it depends on the batch. Convs keep static activations.
        embeddings: ``"float"`` (default) or ``"int8"``: every ``nn.Embedding`` not excluded is stored in int8,
            one symmetric scale per row (8 bits: a lookup cannot saturate), fake-quantized in training alike.

    Returns:
        The prepared modules by name.

    Raises:
        ValueError: when the patterns select no module, or the model is already prepared with other weight bits.
    """
    validate_weight_bits(weight_bits)
    validate_outputs(outputs)
    validate_activations(activations)
    validate_embeddings(embeddings)
    if is_prepared(model):
        return _already_prepared(model, weight_bits, activations)
    pairs = _conv_bn_pairs(model) if fold_bn else {}
    relus = _relu_followers(model)
    read_by_attention = attention_kernel_children(model)
    selected = {
        name: module
        # Every module is a candidate: a transposed Linear (GPT-2's Conv1D) is recognised by what it computes.
        for name, module in select_modules(model, include, exclude, types=(nn.Module,)).items()
        # own forwards stay; so do layers whose forward never runs (their weight is read by an attention kernel)
        if not isinstance(module, _Quantized) and quantizable_base(module) is not None and name not in read_by_attention
    }
    if not selected:
        raise ValueError(
            f"QuantizationAwareTraining selected no nn.Linear/nn.Conv module of {type(model).__name__} with "
            f"{describe_selection(include, exclude)}"
        )
    dynamic = activations == "dynamic"
    if dynamic:  # every Linear output stays float: its consumers quantize their own inputs
        float_outputs = {n: "dynamic activations" for n, m in selected.items() if computes_linear(m)}
    else:
        float_outputs = _float_outputs(model, selected, relus, outputs, example_input)
    for name, module in selected.items():
        _prepare_layer_(module, name, weight_bits, dynamic, float_outputs.get(name), pairs.get(name), relus)
    if embeddings == "int8":
        for embedding in select_modules(model, None, exclude, types=(nn.Embedding,)).values():
            if is_quantizable_embedding(embedding):
                prepare_embedding_(embedding)
    _disable_transformer_fast_paths(model)
    device = next(model.parameters()).device
    model.to(device)  # the new buffers follow the parameters
    return selected


def _already_prepared(model: nn.Module, weight_bits: int, activations: str) -> dict[str, nn.Module]:
    """The prepared modules of a model prepared before, if that preparation agrees with these settings."""
    prepared = quantized_modules(model)
    bits = {m.weight_quant.qmax for m in prepared.values()}
    if bits != {weight_qmax(weight_bits)}:
        raise ValueError(
            f"`weight_bits`: the model is already prepared with weights in +-{sorted(bits)}, which "
            f"weight_bits={weight_bits} (+-{weight_qmax(weight_bits)}) contradicts; prepare a fresh copy"
        )
    schemes = {"dynamic" if is_dynamic(m) else "static" for m in prepared.values() if computes_linear(m)}
    if schemes and schemes != {activations}:
        raise ValueError(
            f"`activations`: the model is already prepared with {sorted(schemes)} activations, which "
            f"activations={activations!r} contradicts; prepare a fresh copy"
        )
    return prepared


def _prepare_layer_(
    module: nn.Module,
    name: str,
    weight_bits: int,
    dynamic: bool,
    float_output_reason: str | None,
    folded: tuple[str, nn.Module] | None,
    relus: dict[str, nn.Module],
) -> None:
    """Turn one selected layer into its fake-quantized subclass, with its quantizers (and its folded BatchNorm)."""
    linear = computes_linear(module)
    module.__class__ = _quantized_class(type(module))
    if dynamic and linear:
        module.input_quant = DynamicActivationFakeQuant()
    else:
        module.input_quant = ActivationFakeQuant()
        module.input_quant.is_input = True
    module.weight_quant = WeightFakeQuant(module.weight_rows().shape[0], weight_qmax(weight_bits))
    module.folded_name = name
    module._fold_check = None
    if folded is None:
        object.__setattr__(module, "folded_bn", None)
        if float_output_reason is not None:
            module.output_quant = None  # the runtime's int8 kernel gives a float output here
            module.float_output_reason = float_output_reason
            return
        module.output_quant = ActivationFakeQuant()
        if name in relus:
            _quantize_after_relu(module, relus[name])
        return
    bn_name, bn = folded
    module.output_quant = None
    object.__setattr__(module, "folded_bn", bn)
    bn.output_quant = ActivationFakeQuant()
    if bn_name in relus:
        _quantize_after_relu(bn, relus[bn_name])
    bn.folded_name = bn_name
    object.__setattr__(bn, "folded_into", module)
    bn.register_forward_pre_hook(_check_bn_input)
    bn.register_forward_hook(_quantize_bn_output)


def validate_weight_bits(weight_bits: object) -> None:
    """Raise ``ValueError`` naming ``weight_bits`` unless it is 7 or 8 (4 is handled before, as group-wise int4)."""
    if isinstance(weight_bits, bool) or weight_bits not in WEIGHT_BITS_CHOICES:
        raise ValueError(
            f"`weight_bits` must be one of {[4, *WEIGHT_BITS_CHOICES]} (7: exact on every CPU; 8: for VNNI/AMX, "
            f"ARM and TensorRT targets; 4: int4 weight-only groups for language models), got {weight_bits!r}"
        )


def _keeps_slow_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: its presence makes ``nn.TransformerEncoderLayer`` skip its fused fast path."""


def _disable_transformer_fast_paths(model: nn.Module) -> None:
    """Make transformer layers that hold quantized modules run them in eval mode too.

    In eval mode ``nn.TransformerEncoderLayer`` takes a fused kernel that reads ``linear1``/``linear2`` weights
    directly and bypasses their forward, so validation would score the float FFN while the export quantizes it.
    The layer documents that forward hooks switch the fast path off; ``nn.TransformerEncoder``'s nested-tensor
    path is switched off too, since the layers then see padded tensors.
    """
    for module in model.modules():
        if not any(isinstance(m, _Quantized) for m in module.modules()):
            continue
        hooks = module._forward_pre_hooks.values()
        if isinstance(module, nn.TransformerEncoderLayer) and _keeps_slow_path not in hooks:
            module.register_forward_pre_hook(_keeps_slow_path)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def set_qat_phase(model: nn.Module, fake_quant: bool, observe: bool) -> None:
    """Switch fake quantization and observation on or off for every quantizer in ``model``."""
    for module in model.modules():
        if isinstance(module, ActivationFakeQuant | WeightFakeQuant | DynamicActivationFakeQuant):
            module.fake_quant = fake_quant
            module.observe = observe


def iter_batch_norms(model: nn.Module) -> Iterator[nn.Module]:
    """Every BatchNorm module of ``model``."""
    return (m for m in model.modules() if isinstance(m, BATCH_NORMS))


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every fake-quantized module turned back into its plain class.

    It computes what the float model computes and exports as fp32; ``model`` is not changed (never prepared: a copy).
    """
    for module in quantized_modules(model).values():
        module._fold_check = None  # a pending non-leaf tensor cannot be deep-copied
    plain = module_copy(model)
    for module in plain.modules():
        unprepare_module_(module)
    return plain


def unprepare_module_(module: nn.Module) -> None:
    """Turn one module back to what it was before :func:`prepare_qat_`: plain class, no quantizer, no hook."""
    if isinstance(module, _Quantized):
        module.__class__ = plain_class(module)
        for child in ("input_quant", "weight_quant", "output_quant"):
            module._modules.pop(child, None)
    elif isinstance(module, QuantizedEmbedding):
        module.__class__ = nn.Embedding
        module._modules.pop("weight_quant", None)
    elif isinstance(module, BATCH_NORMS) and "output_quant" in module._modules:
        module._modules.pop("output_quant")
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key, hook in list(hooks.items()):
            if hook in (_quantize_bn_output, _check_bn_input, _quantize_relu_output, _check_relu_input):
                del hooks[key]


def _float_view(model: nn.Module) -> nn.Module | None:
    """A fake-quantized model seen as its plain float copy (same names); ``None`` for any other model."""
    return float_copy(model) if is_prepared(model) else None


register_float_view(_float_view)  # tracing, slimming's proofs and distillation teachers see through fake quant

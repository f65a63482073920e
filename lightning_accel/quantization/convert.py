"""From the fake-quant model to what the runtime executes: the reference, the deployable copy, and their check.

The fake-quant model in eval mode is what ``validate``/``test``/``predict`` score (:func:`as_evaluated`): every
artifact is checked against it. :func:`to_deployable` rewrites it for export (BatchNorms folded for real, weights
on their integer grid, int32 biases); :func:`check_rewrite` proves that such a rewrite computes what it rewrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_accel._core.modules import module_copy
from lightning_accel.export.check import MIN_SNR_DB, snr_db, torch_outputs
from lightning_accel.quantization.dynamic import is_dynamic, store_dynamic_weights_
from lightning_accel.quantization.embeddings import Int8Embedding, quantized_embeddings
from lightning_accel.quantization.fake_quant import (
    ActivationFakeQuant,
    WeightFakeQuant,
    quantize_bias,
    symmetric_weight_scale,
)
from lightning_accel.quantization.prepare import (
    activation_quantizers,
    float_copy,
    is_prepared,
    quantized_modules,
    set_qat_phase,
)


def _replace_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _detach_fold_checks(model: nn.Module) -> None:
    for module in quantized_modules(model).values():
        module._fold_check = None  # a pending non-leaf tensor cannot be deep-copied


@torch.no_grad()
def as_evaluated(model: nn.Module) -> nn.Module:
    """An eval-mode float32 copy of ``model`` that computes what ``validate``/``test``/``predict`` score.

    For a fake-quantized model: fake quantization on, nothing observed, and weight scales fixed for the current
    weights where they still followed them. This, not an intermediate rewrite, is the reference every export is
    checked against. ``model`` is not changed.
    """
    _detach_fold_checks(model)
    reference = module_copy(model).eval().float()
    if not is_prepared(reference):
        return reference
    for module in quantized_modules(reference).values():
        quantizer = module.weight_quant
        if quantizer.observe:  # the scale followed the weights: what the export will fix for these weights
            quantizer.scale.copy_(symmetric_weight_scale(module.folded_weight_and_factor()[0], quantizer.qmax))
    for embedding in quantized_embeddings(reference).values():
        if embedding.weight_quant.observe:
            embedding.weight_quant.scale.copy_(embedding.weight_quant.compute_scale(embedding.weight))
    set_qat_phase(reference, fake_quant=True, observe=False)
    return reference


@torch.no_grad()
def to_deployable(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of a fake-quantized ``model`` as the runtime will execute it.

    BatchNorms folded during training are folded into their conv for real (weight and bias) and replaced by
    ``nn.Identity``; weight scales are fixed; int8 embedding tables become int8 lookups; dynamic Linears compute
    through the ONNX integer ops they export as; weights are stored on their integer grid (within ``+-qmax``) and
    biases on the runtime's int32 grid at ``input_scale * weight_scale``; every quantizer fake-quantizes with
    constant parameters; the copy is float32 whatever precision the model trained in. Its outputs are what the
    exported file computes, and the eval-mode fake-quant model computes the same. ``model`` is not changed, so
    training can go on.

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
    # The evaluated copy: float32 whatever precision the model trained in (the runtime computes in float32), fake
    # quantization on, weight scales fixed for the current weights. The rewrites below start from it.
    deploy = as_evaluated(model)
    for module in quantized_modules(deploy).values():
        bn, quantizer = module.folded_bn, module.weight_quant
        if bn is not None:
            weight, factor = module.folded_weight_and_factor()
            bias = module.folded_bias(factor)
            module.output_quant = bn.output_quant
            relu = getattr(bn, "relu_after", None)
            if relu is not None and relu.quantizes_for is bn:  # the ReLU now quantizes the folded conv's output
                object.__setattr__(module, "relu_after", relu)
                object.__setattr__(relu, "quantizes_for", module)
            object.__setattr__(module, "folded_bn", None)
            _replace_submodule(deploy, bn.folded_name, nn.Identity())
        else:
            weight, bias = module.weight_rows(), module.bias
        # Store the weights on their integer grid (clipped to +-qmax) and the bias on the runtime's int32 grid,
        # so that the file holds exactly the integers that the PyTorch model computes with.
        module.weight = nn.Parameter(module.stored_layout(quantizer(weight).detach()).clone())
        if is_dynamic(module):  # the bias is added in float after the integer product; the export reads int8 buffers
            store_dynamic_weights_(module)
        elif bias is not None:
            module.bias = nn.Parameter(quantize_bias(bias, module.input_quant.scale, quantizer.scale).detach())
    for name, embedding in quantized_embeddings(deploy).items():
        _replace_submodule(deploy, name, Int8Embedding(embedding))  # traces to Gather on the int8 table
    for quantizer in deploy.modules():
        if isinstance(quantizer, ActivationFakeQuant | WeightFakeQuant):
            quantizer.export_constants = True
    return deploy


#: With dynamic activations the file cannot reproduce the PyTorch model bit for bit: each tensor's scale is its
#: own maximum, so a last-bit difference between two runtimes' float ops (GELU, softmax, LayerNorm, summation
#: order) moves a maximum now and then, and with it the rounding of every value after it. Measured on the
#: pretrained MiniLM: two PyTorch runs 1e-7 apart agree to 42.7 dB, PyTorch and ONNX Runtime to 21.7-27.4 dB,
#: while int8 itself is 18.4 dB from fp32. So the file must be at least as close to the evaluated model as that
#: model is to its float weights (the quantization error), never less than this floor; argmax agreement keeps
#: its threshold.
MIN_DYNAMIC_SNR_DB = 10.0


def dynamic_min_snr_db(reference: nn.Module, inputs: Sequence[Any]) -> float:
    """The SNR a file of a model with dynamic activations must reach: its quantization SNR, within [10, 30] dB."""
    plain = float_copy(reference).eval()
    evaluated = [torch_outputs(reference, example)[0] for example in inputs]
    floats = [torch_outputs(plain, example)[0] for example in inputs]
    quantization_snr = snr_db(torch.cat(floats), torch.cat(evaluated))
    return max(MIN_DYNAMIC_SNR_DB, min(MIN_SNR_DB, quantization_snr))

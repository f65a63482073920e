"""Rebuilding the int8 model from a QAT checkpoint, without retraining."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_accel._core.validation import check_state_version
from lightning_accel.quantization.prepare import prepare_qat_, quantized_modules, set_qat_phase
from lightning_accel.quantization.ranges import load_quantizer_state_
from lightning_accel.quantization.settings import QAT_STATE_VERSION, Int8Settings

_STATE_PREFIX = "QuantizationAwareTraining"


def quantization_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The QAT callback's state in a loaded checkpoint (when it holds quantizers), or ``None``."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith(_STATE_PREFIX) and isinstance(state, dict) and state.get("quantizers"):
            return state
    return None


def load_quantized(module: nn.Module, ckpt_path: str | os.PathLike) -> nn.Module:
    """Restore a QAT-trained model from a Lightning checkpoint as the int8 model it was trained to be.

    The module is prepared exactly as the ``QuantizationAwareTraining`` callback prepared it (same selection, weight
    bits and BatchNorm folding), the checkpoint's weights and quantizer ranges are loaded, and fake quantization
    is switched on in eval mode. ``export_onnx(module, ...)`` then writes the int8 model, and the module computes
    what that file computes. (``load_from_checkpoint`` alone gives the float model, since quantizer state lives in
    the callback's part of the checkpoint.)

    Args:
        module: A fresh instance of the model class (e.g. ``MyModel(**hparams)``), not yet prepared.
        ckpt_path: A checkpoint written while ``QuantizationAwareTraining`` was in the Trainer.

    Returns:
        ``module``, prepared, loaded and in eval mode.

    Raises:
        ValueError: when the checkpoint holds no quantizer state (it was written before QAT started, or without it).
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    found = quantization_state(checkpoint)
    if found is None:
        raise ValueError(
            f"{ckpt_path} holds no QuantizationAwareTraining state with observed ranges: it was written without the "
            "callback or before its start_step. Load it with `load_state_dict` for the float model instead."
        )
    state = found
    check_state_version("QuantizationAwareTraining", state, QAT_STATE_VERSION)
    settings = Int8Settings.from_state(state["settings"])
    quantizer_names = set(state["quantizers"])
    arguments = settings.prepare_arguments()
    # The placement traced in training is in the state itself: every output quantizer first, then those it lacks
    # (float outputs) removed below, so no trace of this module is needed.
    arguments["outputs"] = "all" if settings.outputs == "graph" else settings.outputs
    prepare_qat_(module, **arguments)
    if settings.outputs == "graph":
        for name, layer in quantized_modules(module).items():
            if layer.output_quant is not None and f"{name}.output_quant" not in quantizer_names:
                layer.output_quant = None
    module.load_state_dict(checkpoint["state_dict"])
    load_quantizer_state_(module, state["quantizers"])
    set_qat_phase(module, fake_quant=True, observe=False)
    return module.eval()

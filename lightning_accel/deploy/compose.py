"""Where two techniques meet: a channel-pruned model that is also fake-quantized (the slimmed int8 export).

Pruning's ``slim`` removes channels from any model, and the per-channel scales of QAT's weight quantizers follow the
kept channels; what only the combination knows is how to check the result. A fake-quantized model is checked as it
is evaluated (fake quantization in eval mode), and with dynamic activations on its float weights first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from torch import nn

from lightning_accel._core.stage import DeployingCallback
from lightning_accel.export.check import MIN_REWRITE_SNR_DB, check_rewrite
from lightning_accel.pruning.groups import ChannelGroups, trainer_channel_groups
from lightning_accel.pruning.slim import slim, slim_checked
from lightning_accel.quantization.convert import as_evaluated, dynamic_min_snr_db
from lightning_accel.quantization.dynamic import has_dynamic_layers
from lightning_accel.quantization.export import export_onnx
from lightning_accel.quantization.prepare import float_copy, is_prepared
from lightning_accel.quantization.weight_only import group_quantized_layers


def slim_evaluated(model: nn.Module, example_input: Any, groups: ChannelGroups | None = None) -> nn.Module:
    """``slim`` any model, then raise unless the slim copy computes what ``model`` computes as it is evaluated.

    Slimming must never change what the masked model computes: the files are then checked against the slim model,
    so a wrong slim would pass its own check. With dynamic activations, a last-bit difference in a sum (fewer
    channels, another summation order) can move a tensor's maximum and so every rounding after it (measured on a
    slimmed MiniLM: 32.7 dB between two correct models). There the slicing is checked on the float models at the
    strict threshold, and the quantized models at the export check's dynamic threshold.
    """
    if group_quantized_layers(model):
        raise ValueError(
            "channel pruning (pattern='channels') with weight-only group quantization (weight_bits=4 or "
            "activations='float') is not supported yet: the groups' integers would have to be re-cut for the kept "
            "channels. Use unstructured or N:M pruning with it, or int8 (weight_bits=7)"
        )
    if not is_prepared(model):
        return slim_checked(model, example_input, groups)
    small = slim(model, example_input, groups)
    inputs, reference = [example_input], as_evaluated(model)
    threshold = MIN_REWRITE_SNR_DB
    if has_dynamic_layers(model):
        floats = float_copy(model).eval(), float_copy(small).eval()
        check_rewrite(*floats, inputs, "The slim model (its float weights)")
        threshold = dynamic_min_snr_db(reference, inputs)
    check_rewrite(reference, as_evaluated(small), inputs, "The slim model", min_snr_db=threshold)
    return small


def dry_run_combined_exports(trainer: Trainer, pl_module: LightningModule) -> None:
    """Before training, build the exports that combine techniques (slimmed int8) from throwaway probes.

    Each callback dry-runs its own export at setup; only at fit start, once every setup has run, is it known
    whether another technique changes that export (channel pruning slims the int8 model). Each deploying callback
    may offer a probe (``dry_run_contribution``) whose ``int8_model`` builds a copy calibrated on the example input.
    """
    groups = trainer_channel_groups(trainer.callbacks)
    example = getattr(pl_module, "example_input_array", None)
    if groups is None or example is None or not trainer.is_global_zero or trainer.fast_dev_run:
        return
    for callback in trainer.callbacks:
        probe = callback.dry_run_contribution(trainer, pl_module) if isinstance(callback, DeployingCallback) else None
        if probe is None or probe.int8_model is None:
            continue
        try:
            model = slim_evaluated(probe.int8_model(), example, groups)
            with tempfile.TemporaryDirectory() as directory:
                export_onnx(model, Path(directory) / "dry_run.onnx", example, on_mismatch="ignore")
        except Exception as error:
            raise RuntimeError(
                f"{probe.owner}: the slimmed int8 export of {type(pl_module).__name__} fails on its "
                "example_input_array, so it would fail at the end of fit. Checked before training: "
                f"{type(error).__name__}: {error}"
            ) from error

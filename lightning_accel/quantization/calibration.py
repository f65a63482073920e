"""Calibration and batch handling: calibrating, and the batches the callbacks check and score on.

``calibrate_`` is post-training quantization without Lightning; the callbacks use the same batch picker to
calibrate and to choose the inputs the exports are checked on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_accel._core.inputs import (
    as_model_input,
    batch_labels,
    batch_picker,
    example_input,
    run_model,
)
from lightning_accel._core.lightning import datamodule_loader, first_loader
from lightning_accel._core.validation import validate_int
from lightning_accel.quantization.dynamic import DEFAULT_ACTIVATIONS
from lightning_accel.quantization.embeddings import DEFAULT_EMBEDDINGS
from lightning_accel.quantization.fake_quant import DEFAULT_WEIGHT_BITS, update_many
from lightning_accel.quantization.prepare import (
    DEFAULT_OUTPUTS,
    activation_quantizers,
    prepare_qat_,
    set_qat_phase,
)
from lightning_accel.quantization.ranges import (
    flag_nonfinite,
    observed_ranges,
    update_ranges,
)


def _same_structure(candidate: Any, example: Any) -> bool:
    """Whether a picked batch input can be fed to the ONNX inputs that ``example`` named."""
    if isinstance(example, Mapping):
        return isinstance(candidate, Mapping) and set(candidate) == set(example)
    if isinstance(example, tuple | list):
        return isinstance(candidate, tuple | list) and len(candidate) == len(example)
    if not isinstance(candidate, torch.Tensor) or candidate.dim() != example.dim():
        return False
    # The export fixes every axis but the batch (and the sequence of token inputs): a batch of another shape is
    # another input (a GAN's real images, where the forward takes noise).
    fixed_from = 1 if candidate.is_floating_point() else 2
    return candidate.is_floating_point() == example.is_floating_point() and (
        candidate.shape[fixed_from:] == example.shape[fixed_from:]
    )


#: The export check runs on at least this many validation samples where the data has them: a few dozen samples
#: hid a 1.2-point agreement loss that 1,797 showed.
CHECK_SAMPLES = 1000


def batch_size(inputs: Any) -> int:
    """The batch size of a tensor, a tuple of tensors or a dict of keyword tensors (1 when it has none)."""
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    first = first[0] if isinstance(first, tuple | list) else first
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def check_batches(
    trainer: Trainer, pl_module: LightningModule, picker: Callable[[Any], Any], samples: int = CHECK_SAMPLES
) -> list[Any]:
    """Validation (else training) batches' model inputs, at least ``samples`` rows where the data has them.

    ``[]`` when no batch gives a model input shaped like ``example_input_array``.
    """
    example = example_input(pl_module)
    if example is None:  # nothing is exported without an example input
        return []
    for loader in evaluation_loaders(trainer):
        picked, count = [], 0
        try:
            for batch in loader:
                inputs = picker(batch)
                inputs = as_model_input(inputs)
                if not _same_structure(inputs, example):
                    break
                picked.append(inputs)
                count += batch_size(inputs)
                if count >= samples:
                    break
        except (ValueError, TypeError, KeyError, IndexError):
            picked = []
        if picked:
            return picked
    rank_zero_info(
        "The export is checked on example_input_array only: no batch gave a model input shaped like it (set "
        "`model_input` to pick it)"
    )
    return []


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 32,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    fold_bn: bool = True,
    model_input: str | int | Callable[[Any], Any] | None = None,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    outputs: str = DEFAULT_OUTPUTS,
    activations: str = DEFAULT_ACTIVATIONS,
    embeddings: str = DEFAULT_EMBEDDINGS,
    modules_not_run: str = "raise",
) -> nn.Module:
    """Post-training quantization: prepare ``model`` in place and calibrate its activation ranges on data.

    The model runs in eval mode on up to ``num_batches`` batches; each quantizer keeps the overall min and max it
    sees, over every call of its module. Batches with NaN/inf activations are skipped (with a warning).
    Afterwards fake quantization is on, and ``export_onnx(model, ...)`` writes the int8 model.

    Args:
        model: The trained float model.
        batches: An iterable of batches, e.g. a DataLoader.
        num_batches: How many batches to calibrate on.
        include: Glob patterns over module names to quantize (default: every Linear/Conv).
        exclude: Glob patterns over module names to keep in float.
        fold_bn: Fold BatchNorms into the convs they follow.
        model_input: Picks the model input out of a batch: ``None`` (the first element of a tuple/list, else the
            batch), a dict key, a tuple index, or a function of the batch. A dict input is passed as keywords and a
            tuple as positional inputs.
        weight_bits: 7 (default, exact in ONNX Runtime on every CPU) or 8 (VNNI/AMX, ARM, TensorRT targets).
        outputs: ``"graph"`` (default: a Linear output stays float where something other than a quantized layer
            consumes it, traced on the first batch), ``"auto"`` (the type rule) or ``"all"``.
        activations: ``"static"`` (default: ranges calibrated here) or ``"dynamic"`` (Linear inputs quantized at
            the scale of each input at run time; only the convs' ranges are calibrated).
        embeddings: ``"float"`` (default) or ``"int8"`` (tables stored in int8, one scale per row).
        modules_not_run: ``"raise"`` (default): every quantized module must run on every batch. ``"placeholder"``:
            modules the forward never runs (a GAN's discriminator, when the forward is the generator) get the
            range [0, 1]; the export of that forward does not contain them. For export dry runs.

    Returns:
        The same ``model``, prepared and calibrated.

    Raises:
        ValueError: when no batch came, or every batch gave a quantizer NaN/inf activations (named).
    """
    num_batches = validate_int("num_batches", num_batches, 1)
    if modules_not_run not in ("raise", "placeholder"):
        raise ValueError(f"`modules_not_run` must be 'raise' or 'placeholder', got {modules_not_run!r}")
    if not isinstance(batches, Iterable) or isinstance(batches, torch.Tensor):
        raise TypeError(f"`batches` must be an iterable of batches such as a DataLoader, got {type(batches).__name__}")
    picker = batch_picker(model_input, model)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("`batches` yielded no batch to calibrate on")
    example = as_model_input(picker(first))  # the placement is traced on the first batch
    prepare_qat_(
        model,
        include,
        exclude,
        fold_bn,
        weight_bits,
        outputs,
        example_input=example,
        activations=activations,
        embeddings=embeddings,
    )
    batches = itertools.chain([first], batches)
    quantizers = activation_quantizers(model)
    was_training = model.training
    model.eval()
    set_qat_phase(model, fake_quant=False, observe=True)
    seen = skipped = 0
    for seen, batch in enumerate(batches, start=1):
        run_model(model, picker(batch))
        observed = quantizers
        if modules_not_run == "placeholder":
            observed = {name: q for name, q in quantizers.items() if q.batch_range is not None}
        ranges = flag_nonfinite(observed_ranges(observed))
        if ranges[-1] > 0:
            skipped += 1
        else:
            update_ranges(list(observed.values()), ranges[:-1], averaging_constant=None)
        if seen >= num_batches:
            break
    if modules_not_run == "placeholder":
        unused = [q for q in quantizers.values() if not q.calibrated]
        update_many(unused, torch.zeros(len(unused)), torch.ones(len(unused)), None)
    if seen == 0:
        raise ValueError("`batches` yielded no batch to calibrate on")
    if skipped:
        rank_zero_warn(f"calibrate_: {skipped} of {seen} batch(es) gave NaN/inf activations and were skipped")
    uncalibrated = [name for name, q in quantizers.items() if not q.calibrated]
    if uncalibrated:
        raise ValueError(
            f"calibrate_: every calibration batch gave NaN/inf activations at {uncalibrated[:5]}, so they have no "
            "range; check the data and the model for non-finite values"
        )
    set_qat_phase(model, fake_quant=True, observe=False)
    model.train(was_training)
    return model


def evaluation_loaders(trainer: Trainer) -> list[Iterable]:
    """The first validation dataloader, then the training one: where the checks take their batches from."""
    found = [first_loader(trainer.val_dataloaders), first_loader(trainer.train_dataloader)]
    return [loader for loader in found if loader is not None]


def fresh_train_loader(trainer: Trainer) -> Iterable | None:
    """A new training loader from the data module, or ``None`` without one.

    Never ``trainer.train_dataloader``: mid-fit, iterating that again resets the iterator the fit loop consumes.
    """
    return datamodule_loader(trainer, "train_dataloader")


def first_batch(trainer: Trainer) -> Any:
    """The first batch of :func:`evaluation_loaders` that yields one, or ``None``."""
    for loader in evaluation_loaders(trainer):
        try:
            return next(iter(loader))
        except (StopIteration, TypeError):
            continue
    return None


def classification_batches(trainer: Trainer) -> bool | None:
    """Whether the validation (else training) batches carry integer classes: the model gives logits.

    ``None`` when there is no batch to look at. A dict batch is a classification batch when it holds integer
    ``labels`` of one per sample.
    """
    batch = first_batch(trainer)
    return None if batch is None else batch_labels(batch) is not None

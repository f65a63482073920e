"""Checking an exported ONNX file against the PyTorch model it came from.

An export is only useful if the runtime computes what was trained and validated. ``check_onnx`` runs the file in
ONNX Runtime on given inputs and compares it with the PyTorch model as evaluated: argmax agreement where the output
looks like logits, signal-to-noise ratio and the largest absolute difference always.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_accel._core.modules import model_device
from lightning_accel._core.outputs import output_tensors

#: Below these, ``export_onnx`` warns (or raises with ``on_mismatch="raise"``).
MIN_AGREEMENT = 0.99
MIN_SNR_DB = 30.0


@dataclass(frozen=True)
class ExportCheck:
    """How closely an ONNX file reproduces its PyTorch model.

    Attributes:
        samples: Number of samples (rows of the batch dimension) compared.
        agreement: Fraction of samples whose argmax agrees, for classification-shaped outputs (logits); else
            ``None``: the argmax of an embedding means nothing.
        cosine: Mean cosine similarity of the samples' first outputs (each flattened), for every output shape.
        snr_db: Signal-to-noise ratio of the ONNX output against the PyTorch output, in dB (``inf`` if equal).
        max_abs_diff: Largest absolute difference between the two.
    """

    samples: int
    agreement: float | None
    snr_db: float
    max_abs_diff: float
    cosine: float | None = None

    def passed(self, min_agreement: float = MIN_AGREEMENT, min_snr_db: float = MIN_SNR_DB) -> bool:
        """Whether agreement (where measured) and SNR reach the thresholds."""
        agrees = self.agreement is None or self.agreement >= min_agreement
        return agrees and self.snr_db >= min_snr_db

    def __str__(self) -> str:
        agreement = "n/a" if self.agreement is None else f"{self.agreement:.2%}"
        cosine = "" if self.cosine is None else f"cosine {self.cosine:.4f}, "
        return (
            f"argmax agreement {agreement}, {cosine}SNR {self.snr_db:.1f} dB, max abs diff {self.max_abs_diff:.3g} "
            f"over {self.samples} sample(s)"
        )


def snr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-noise ratio of ``approximation`` against ``reference`` in dB (``inf`` when they are equal)."""
    reference, approximation = reference.double(), approximation.double()
    noise = (reference - approximation).pow(2).mean().item()
    signal = reference.pow(2).mean().item()
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def split_example(example_input: Any) -> tuple[tuple[Tensor, ...], dict[str, Tensor], list[str]]:
    """Positional inputs, keyword inputs and the ONNX input names for an example input."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input), list(example_input)
    args = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
    return args, {}, [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]


def as_float32(tensor: Tensor) -> Tensor:
    """Floating tensors as float32 (the precision of the exported graph); integer tensors unchanged."""
    return tensor.float() if tensor.is_floating_point() else tensor


@torch.no_grad()
def run_float32(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input (floating inputs as float32, on the model's device); return its output."""
    args, kwargs, _ = split_example(example_input)
    device = model_device(model)
    return model(*[as_float32(a).to(device) for a in args], **{k: as_float32(v).to(device) for k, v in kwargs.items()})


def torch_outputs(model: nn.Module, example_input: Any) -> list[Tensor]:
    """Run ``model`` on an example input and return its output tensors, float32 on CPU."""
    return [t.detach().float().cpu() for t in output_tensors(run_float32(model, example_input))]


def onnx_session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session with default options: what a user deploying the file gets."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads (for timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, example_input: Any) -> dict[str, np.ndarray]:
    """The input feed of an ONNX Runtime session for an example input (tensor, tuple or dict)."""
    args, kwargs, names = split_example(example_input)
    values = dict(zip(names, [*args, *kwargs.values()], strict=True))
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs that the graph does not use
    return {name: as_float32(value).cpu().numpy() for name, value in values.items() if name in wanted}


def onnx_outputs(session: Any, example_input: Any) -> list[Tensor]:
    """Run an ONNX Runtime session on an example input."""
    return [torch.from_numpy(np.asarray(out)).float() for out in session.run(None, onnx_feed(session, example_input))]


def compare_outputs(
    reference: Sequence[Tensor], candidate: Sequence[Tensor], classification: bool | None = None
) -> ExportCheck:
    """Compare two lists of output tensors; the first output gives the agreement and the cosine.

    Args:
        reference: The outputs of the model as evaluated.
        candidate: The outputs to check.
        classification: Whether the first output is logits (argmax agreement is measured; for ``[batch, tokens,
            vocabulary]`` logits, the next token's at every position). ``None``: a 2-D output with several columns
            is taken for logits. The callbacks pass what their validation data says
            ((input, class) batches); an embedding model's check then reports cosine, not agreement.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"The ONNX model has {len(candidate)} output(s), the PyTorch model {len(reference)}")
    flat_reference = torch.cat([t.reshape(-1) for t in reference])
    flat_candidate = torch.cat([t.reshape(-1) for t in candidate])
    first, first_candidate = reference[0], candidate[0]
    logits_shaped = first.dim() == 2 and first.shape[1] > 1
    agreement = None
    if logits_shaped and classification is not False:
        agreement = (first.argmax(1) == first_candidate.argmax(1)).float().mean().item()
    elif first.dim() == 3 and classification:  # a language model's logits: next-token agreement at every position
        agreement = (first.argmax(-1) == first_candidate.argmax(-1)).float().mean().item()
    cosine = None
    if first.dim() >= 1 and first.numel():
        rows = first.reshape(first.shape[0], -1).double()
        candidate_rows = first_candidate.reshape(first_candidate.shape[0], -1).double()
        cosine = torch.nn.functional.cosine_similarity(rows, candidate_rows, dim=1, eps=1e-12).mean().item()
    max_abs = (flat_reference - flat_candidate).abs().max().item() if flat_reference.numel() else 0.0
    return ExportCheck(
        samples=first.shape[0] if first.dim() else 1,
        agreement=agreement,
        snr_db=snr_db(flat_reference, flat_candidate),
        max_abs_diff=max_abs,
        cosine=cosine,
    )


def check_onnx(
    reference: nn.Module, path: str | Path, inputs: Sequence[Any], classification: bool | None = None
) -> ExportCheck:
    """Compare an ONNX file with the PyTorch model it must reproduce, on several example inputs.

    Args:
        reference: The model as evaluated: for a fake-quantized model, ``as_evaluated(model)`` (the fake-quant
            model in eval mode), not an intermediate copy made for export.
        path: The ONNX file.
        inputs: Example inputs (each a tensor, a tuple or a dict, as ``export_onnx`` takes them); their outputs
            are concatenated along the batch dimension.
        classification: Whether the output is logits (see :func:`compare_outputs`).

    Returns:
        The :class:`ExportCheck`.
    """
    if not inputs:
        raise ValueError("`inputs` must hold at least one example input to compare on")
    session = onnx_session(path)
    expected = [torch_outputs(reference, example) for example in inputs]
    candidate = [onnx_outputs(session, example) for example in inputs]
    return compare_outputs(
        [torch.cat(parts) for parts in zip(*expected, strict=True)],
        [torch.cat(parts) for parts in zip(*candidate, strict=True)],
        classification,
    )


#: A rewrite of the model (folding, Identity replacement, slimming) may move values across a rounding boundary
#: of a quantizer now and then, never more: below this SNR against the model it rewrote, a rewrite changed what
#: the model computes.
MIN_REWRITE_SNR_DB = 40.0


def check_rewrite(
    reference: nn.Module,
    rewritten: nn.Module,
    inputs: Sequence[Any],
    what: str,
    min_snr_db: float = MIN_REWRITE_SNR_DB,
) -> None:
    """Raise unless ``rewritten`` computes what ``reference`` computes on ``inputs`` (torch only, no runtime).

    Args:
        reference: The model as evaluated (see :func:`as_evaluated`).
        rewritten: A copy made from it for export (folded, slimmed, ...).
        inputs: Example inputs, as :func:`export_onnx` takes them.
        what: Names the rewrite in the error.
        min_snr_db: The SNR the rewrite must reach (``MIN_REWRITE_SNR_DB`` unless a caller knows better).

    Raises:
        RuntimeError: when argmax agreement (for logits) is below 99% or the SNR below ``min_snr_db``.
    """
    expected = [torch_outputs(reference, example) for example in inputs]
    got = [torch_outputs(rewritten, example) for example in inputs]
    result = compare_outputs(
        [torch.cat(parts) for parts in zip(*expected, strict=True)],
        [torch.cat(parts) for parts in zip(*got, strict=True)],
    )
    if not result.passed(min_snr_db=min_snr_db):
        raise RuntimeError(
            f"{what} does not compute what the evaluated model computes: {result} (wanted agreement >= "
            f"{MIN_AGREEMENT:.0%} and SNR >= {min_snr_db:.0f} dB). Exporting it would deploy another model "
            "than the one validated, so nothing was written. Please report this model's layer types; excluding "
            "the affected layers from quantization (`exclude=[...]`) avoids it meanwhile."
        )

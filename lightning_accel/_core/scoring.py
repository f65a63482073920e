"""Scoring a model on validation batches: accuracy, next-token perplexity for a causal LM, or cosine to a reference.

One rule for every technique that asks "how much did this cost?" (QAT's start/end probe, the quality budget's
per-layer sensitivity, channel pruning's per-group sensitivity): accuracy where the batches carry class labels;
perplexity (the exponential of the mean next-token cross-entropy) for a causal language model, whose input is the
token ids its ``[batch, tokens, vocabulary]`` logits predict; otherwise the mean cosine of each sample's output to
the reference outputs (the float model's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_accel._core.inputs import batch_labels, run_model
from lightning_accel._core.outputs import output_tensors


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list/dict of them, or a Hugging Face output)."""
    return output_tensors(output)[0]


def next_token_ids(inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
    """The token ids a causal LM's logits predict (its input ids), or ``None`` when ``output`` is not such logits."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int) or ids.dim() != 2:
        return None
    if output.dim() != 3 or tuple(output.shape[:2]) != tuple(ids.shape) or ids.shape[1] < 2:
        return None
    return ids if int(ids.max()) < output.shape[-1] else None


def _perplexity(outputs: list[torch.Tensor], token_ids: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for logits, ids in zip(outputs, token_ids, strict=True):
        predicted, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).cpu()
        total += torch.nn.functional.cross_entropy(predicted, target, reduction="sum").item()
        count += target.numel()
    return math.exp(total / count)


class QualityProbe:
    """The scored batches, their float outputs at QAT start, and the two scores of the quantized model.

    Args:
        batches: Model inputs to score on.
        labels: Their class labels, or ``None``.
        float_outputs: The float model's outputs on them at QAT start.
        label: The format named in the messages (``"int8"``, ``"int4"``).
    """

    def __init__(
        self,
        batches: list[Any],
        labels: list[torch.Tensor] | None,
        float_outputs: list[torch.Tensor],
        label: str = "int8",
    ) -> None:
        self.batches = batches
        self.labels = labels
        self.float_outputs = float_outputs
        self.label = label
        self.token_ids = [next_token_ids(b, o) for b, o in zip(batches, float_outputs, strict=True)]
        causal = labels is None and all(ids is not None for ids in self.token_ids)
        self.metric = "accuracy" if labels is not None else "perplexity" if causal else "cosine"
        self.start: float | None = None
        self.end: float | None = None

    def score(self, model: nn.Module) -> float:
        """Accuracy against the labels, perplexity for a causal LM, else mean cosine to the float outputs."""
        outputs = [first_tensor(run_model(model, inputs)).detach().float().cpu() for inputs in self.batches]
        if self.metric == "perplexity":
            return _perplexity(outputs, self.token_ids)
        if self.labels is not None:
            correct = sum(int((o.argmax(-1) == y.cpu()).sum()) for o, y in zip(outputs, self.labels, strict=True))
            return correct / sum(len(y) for y in self.labels)
        cosines = [
            torch.nn.functional.cosine_similarity(o.flatten(1), f.flatten(1), dim=1)
            for o, f in zip(outputs, self.float_outputs, strict=True)
        ]
        return torch.cat(cosines).mean().item()

    def ended_worse(self) -> bool:
        """Whether the end is worse than the start: by over one sample (accuracy), 0.1% (perplexity) or 1e-4."""
        if self.start is None or self.end is None:
            return False
        if self.metric == "perplexity":
            return self.end > self.start * 1.001
        samples = sum(len(y) for y in self.labels) if self.labels is not None else 0
        tolerance = 1.0 / samples if samples else 1e-4
        return self.end < self.start - tolerance

    def describe(self) -> str:
        """One line with both scores."""
        what = {"accuracy": "accuracy", "perplexity": "perplexity (next token, validation batches)"}.get(
            self.metric, "cosine to the float model at QAT start"
        )
        end = "n/a" if self.end is None else f"{self.end:.4f}"
        return f"{self.label} {what}: {self.start:.4f} at QAT start (PTQ of those weights), {end} at the end"


def cost_of(metric: str, reference: float, score: float) -> float:
    """How much worse ``score`` is than ``reference`` (positive: worse): a rise for perplexity, else a drop."""
    return score - reference if metric == "perplexity" else reference - score


@torch.no_grad()
def probe_on(
    reference: nn.Module, batches: Sequence[Any], pick: Callable[[Any], Any], label: str = "int8"
) -> QualityProbe:
    """A probe on ``batches`` against ``reference``'s outputs now (``reference`` runs in the mode it is in).

    ``pick`` takes the model input out of a batch; the labels are the batches' own, where every batch carries them.
    """
    inputs = [pick(batch) for batch in batches]
    labels = [batch_labels(batch) for batch in batches]
    outputs = [first_tensor(run_model(reference, x)).detach().float().cpu() for x in inputs]
    return QualityProbe(inputs, labels if all(y is not None for y in labels) else None, outputs, label)

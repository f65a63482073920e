"""Channel pruning's quality budget: the dense model scored when pruning starts, the pruned one at the end.

``MagnitudePruning(max_quality_loss=...)`` states what pruning may cost, in the unit of the shared scoring rule
(:mod:`lightning_accel._core.scoring`: accuracy as a fraction with labels, perplexity for a causal LM, else one
minus the cosine to the dense outputs). The dense model is scored on up to 8 validation batches when the first masks
are due; at the end of fit the pruned model is scored on the same batches, and the figure is logged, put in the
report's notes, and a loss above the budget is a warning with the figures (contract 15), never silence. With
``channel_fractions="sensitivity"`` the groups whose removal costs most already lose least.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_accel._core.scoring import QualityProbe, cost_of
from lightning_accel._core.validation import validate_quality_budget
from lightning_accel.pruning.fractions import scoring_probe


class PruningBudget:
    """The dense score at the first masks and the pruned score at the end, against ``max_quality_loss``.

    Args:
        max_quality_loss: The allowed loss, or ``None`` (nothing is measured).
    """

    def __init__(self, max_quality_loss: Any) -> None:
        self.max_quality_loss = validate_quality_budget(max_quality_loss)
        self.probe: QualityProbe | None = None
        self.dense: float | None = None
        #: Notes for the report (the measured line), filled at the end of fit.
        self.notes: list[str] = []
        #: ``{"metric", "dense", "pruned", "loss", "met"}`` once measured.
        self.result: dict[str, Any] | None = None

    @torch.no_grad()
    def start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Score the dense model (rank 0, once, before the first masks)."""
        if self.max_quality_loss is None or self.probe is not None or not trainer.is_global_zero:
            return
        was_training = pl_module.training
        self.probe = scoring_probe(trainer, pl_module, batch)
        self.dense = self.probe.score(pl_module)
        pl_module.train(was_training)

    @torch.no_grad()
    def end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the pruned model on the same batches; log, note, and warn when the budget is exceeded."""
        if self.max_quality_loss is None or not trainer.is_global_zero:
            return
        if self.probe is None or self.dense is None:
            self.notes.append(
                "Pruning: quality budget not measured (the dense model was not scored in this fit: resumed after "
                "the first masks, or training ended before them)."
            )
            return
        was_training = pl_module.training
        pl_module.eval()
        pruned = self.probe.score(pl_module)
        pl_module.train(was_training)
        loss = cost_of(self.probe.metric, self.dense, pruned)
        met = loss <= self.max_quality_loss
        self.result = {"metric": self.probe.metric, "dense": self.dense, "pruned": pruned, "loss": loss, "met": met}
        line = (
            f"quality budget {self.max_quality_loss:g} ({self.probe.metric}) {'met' if met else 'MISSED'}: dense "
            f"{self.dense:.4f}, pruned {pruned:.4f} (loss {loss:+.4f})"
        )
        self.notes.append(f"Pruning: {line}.")
        (rank_zero_info if met else rank_zero_warn)(f"MagnitudePruning: {line}")

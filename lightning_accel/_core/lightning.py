"""Small pieces of Lightning plumbing shared by the callbacks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden


def configure_model_early(trainer: Trainer, pl_module: LightningModule) -> None:
    """Run the module's ``configure_model`` now, in the contexts Lightning itself would use.

    Lightning calls callbacks' ``setup`` *before* ``configure_model``, so layers built there would be invisible to
    a callback that selects layers in ``setup`` (contract 2: structure changes happen in ``setup``, before the
    checkpoint restore, DDP wrapping and optimizer creation). Lightning documents that ``configure_model`` must be
    idempotent, because it may be called more than once; calling it here, inside the strategy's tensor-init and
    sharded contexts and the precision plugin's init context (as Lightning does), builds the layers exactly as
    Lightning would, and Lightning's own later call finds them built.
    """
    if type(pl_module).configure_model is LightningModule.configure_model:
        return  # not overridden: nothing is built lazily
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()


class TrainingSteps:
    """The schedule position: training steps, not optimizer calls.

    With automatic optimization (one optimizer) ``trainer.global_step`` counts the steps, accumulation included.
    With manual optimization ``global_step`` counts every ``optimizer.step()`` call, so a GAN with two optimizers
    would run every schedule at twice the speed and reach a "75%" end step at 37.5% of training
    (``trainer.estimated_stepping_batches`` counts batches). There, the training batches are counted instead; the
    count is part of the callback's checkpoint state, so a resumed run continues from it.
    """

    def __init__(self) -> None:
        self.batches = 0

    def current(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """The current training step."""
        return trainer.global_step if pl_module.automatic_optimization else self.batches

    def batch_done(self, pl_module: LightningModule) -> None:
        """Count a finished training batch (manual optimization only)."""
        if not pl_module.automatic_optimization:
            self.batches += 1


def refuse_weight_averaging(trainer: Trainer, owner: str, keeps: str) -> None:
    """Raise ``ValueError`` when ``StochasticWeightAveraging`` is in the Trainer beside ``owner``.

    SWA averages the weights of many steps and then runs its own BatchNorm update: the average mixes weights from
    before and after masking, and the fit ends with SWA's model. Measured: validation accuracy 0.963 -> 0.170 with
    pruning and 0.856 -> 0.107 with every callback, while the logged sparsity still read its target.
    """
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    if any(isinstance(callback, StochasticWeightAveraging) for callback in getattr(trainer, "callbacks", None) or ()):
        raise ValueError(
            f"{owner} cannot run beside StochasticWeightAveraging: SWA averages weights across steps and swaps "
            f"the averaged model in at the end of fit, which loses {keeps}. Remove StochasticWeightAveraging from "
            "the callbacks, or average in a separate fine-tuning run without this callback."
        )


def first_loader(loaders: Any) -> Iterable | None:
    """The first of a Trainer's or data module's loaders (they may be a list), if it is iterable."""
    loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
    return loader if isinstance(loader, Iterable) else None


def datamodule_loader(trainer: Trainer, hook: str) -> Iterable | None:
    """A new loader from the data module's ``hook`` (its own iterator and workers), or ``None`` without one."""
    datamodule = trainer.datamodule
    if datamodule is None or not is_overridden(hook, datamodule):
        return None
    try:
        return first_loader(getattr(datamodule, hook)())
    except (NotImplementedError, AttributeError):  # a data module that declines to give these batches
        return None


def validation_loader(trainer: Trainer) -> Iterable | None:
    """The first validation loader: the Trainer's once loaded, else a new one from the data module, else ``None``.

    Safe to iterate during training (the validation loop holds no iterator between its runs); never the training
    loader, whose iterator the fit loop is consuming.
    """
    return first_loader(trainer.val_dataloaders) or datamodule_loader(trainer, "val_dataloader")

"""Small pieces of Lightning plumbing shared by the callbacks."""

from __future__ import annotations

from lightning import LightningModule, Trainer


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

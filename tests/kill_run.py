"""A training run for the kill test: ``python -m tests.kill_run DIR [--kill-at STEP] [--resume]``.

Trains TinyModule with all three callbacks, checkpointing ``last.ckpt`` every 3 steps. With ``--kill-at`` the
process sends itself SIGKILL after that optimizer step (no cleanup, no flushing: as a preempted job dies).
At the end it writes DIR/final.pt with the masks, quantizer state and validation loss.
"""

import argparse
import os
import signal
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import MagnitudePruning, MixedPrecision, QuantizationAwareTraining
from tests.helpers import RandomImages, TinyModule, fast_trainer_kwargs


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    seed_everything(0, verbose=False)
    pruning = MagnitudePruning(0.8, end_step=20, every_n_steps=2)
    qat = QuantizationAwareTraining(start_step=6, freeze_observers_step=26)
    callbacks = [
        MixedPrecision("bf16-mixed"),
        pruning,
        qat,
        ModelCheckpoint(dirpath=args.directory, save_last=True, every_n_train_steps=3, save_top_k=0),
    ]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=4, enable_checkpointing=True), callbacks=callbacks)
    module = TinyModule()
    data = RandomImages()
    trainer.fit(module, datamodule=data, ckpt_path="last" if args.resume else None)
    loss = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    torch.save(
        {"masks": pruning.state_dict()["masks"], "quantizers": qat.state_dict()["quantizers"], "val_loss": loss},
        args.directory / "final.pt",
    )


if __name__ == "__main__":
    main()

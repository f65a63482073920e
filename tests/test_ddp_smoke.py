"""The DDP harness: two CPU processes with ddp_spawn train one model and end with identical weights."""

import torch
from lightning import Trainer

from tests.helpers import RandomImages, SaveRankState, TinyModule, assert_states_equal, fast_trainer_kwargs


def test_ddp_spawn_two_cpu_ranks_end_with_identical_weights(tmp_path):
    trainer = Trainer(
        **fast_trainer_kwargs(strategy="ddp_spawn", devices=2, limit_train_batches=4),
        callbacks=[SaveRankState(tmp_path)],
    )
    trainer.fit(TinyModule(), datamodule=RandomImages())

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)
    # Training changed the weights: the two files are not identical merely because nothing ran.
    assert not torch.equal(rank0["model/net.fc1.weight"], TinyModule().net.fc1.weight.detach())

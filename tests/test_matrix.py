"""Composition matrix: every combination of the three callbacks, in both list orders, single process and DDP,
uninterrupted and resumed from an epoch-boundary checkpoint."""

import itertools

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import MagnitudePruning, MixedPrecision, QuantizationAwareTraining
from tests.helpers import RandomImages, SaveRankState, TinyModule, fast_trainer_kwargs

EPOCHS = 3  # 8 steps each: pruning ends at step 10, QAT observes from step 4 and freezes at step 14
MAKERS = {
    "amp": lambda: MixedPrecision("bf16-mixed"),
    "prune": lambda: MagnitudePruning(0.75, end_step=10, every_n_steps=2),
    "qat": lambda: QuantizationAwareTraining(start_step=4, freeze_observers_step=14),
}
COMBINATIONS = [combo for size in (1, 2, 3) for combo in itertools.combinations(MAKERS, size)]
ORDERED = sorted({order for combo in COMBINATIONS for order in (combo, combo[::-1])})


def run(directory, names, ckpt_path=None, checkpoints=False, **trainer_kwargs):
    directory.mkdir(parents=True, exist_ok=True)
    callbacks = [MAKERS[name]() for name in names] + [SaveRankState(directory)]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=directory, save_top_k=-1, filename="{epoch}"))
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=EPOCHS, enable_checkpointing=checkpoints, **trainer_kwargs),
        callbacks=callbacks,
    )
    trainer.fit(TinyModule(), datamodule=RandomImages(), ckpt_path=ckpt_path)
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(trainer.world_size)]


def split(state):
    """(exact part: masks, quantizer state and counters; float part: model weights and buffers)."""
    exact = {k: v for k, v in state.items() if k.startswith("callback/") and "ModelCheckpoint" not in k}
    weights = {k: v for k, v in state.items() if k.startswith("model/")}
    return exact, weights


def assert_same_run(a, b, atol):
    exact_a, weights_a = split(a)
    exact_b, weights_b = split(b)
    assert exact_a.keys() == exact_b.keys()
    for key in exact_a:
        if isinstance(exact_a[key], torch.Tensor):
            assert torch.equal(exact_a[key], exact_b[key]), key
        else:
            assert exact_a[key] == exact_b[key], key
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], atol=atol, rtol=0, msg=key)


def assert_techniques_applied(state, names):
    if "prune" in names:
        masks = {k.rsplit("/", 1)[1]: v for k, v in state.items() if "/masks/" in k}
        assert masks
        for name, mask in masks.items():
            assert (state[f"model/{name}"][~mask] == 0).all(), name
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.75 * sum(m.numel() for m in masks.values()))
    if "qat" in names:
        scales = [v for k, v in state.items() if k.endswith("input_quant/scale")]
        assert scales and all(s > 0 for s in scales)


@pytest.mark.parametrize("names", ORDERED, ids="+".join)
def test_single_process_resume_matches_uninterrupted(tmp_path, names):
    (uninterrupted,) = run(tmp_path / "a", names, checkpoints=True)
    assert_techniques_applied(uninterrupted, names)
    (resumed,) = run(tmp_path / "b", names, ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    assert_same_run(uninterrupted, resumed, atol=1e-5)


@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_ddp_ranks_agree(tmp_path, names):
    rank0, rank1 = run(tmp_path, names, strategy="ddp_spawn", devices=2)
    assert_techniques_applied(rank0, names)
    assert_same_run(rank0, rank1, atol=0.0)


def test_ddp_resume_of_all_three_matches_uninterrupted(tmp_path):
    names = ("amp", "prune", "qat")
    uninterrupted = run(tmp_path / "a", names, checkpoints=True, strategy="ddp_spawn", devices=2)
    resumed = run(tmp_path / "b", names, ckpt_path=tmp_path / "a" / "epoch=0.ckpt", strategy="ddp_spawn", devices=2)
    for rank in (0, 1):
        assert_same_run(uninterrupted[rank], resumed[rank], atol=1e-5)

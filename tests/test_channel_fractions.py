"""Non-uniform channel pruning: each group's share of the target from its measured sensitivity."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import MagnitudePruning
from lightning_accel.pruning.fractions import fractions_from_costs, shared_by_kind
from lightning_accel.pruning.groups import ChannelGroup, ChannelGroups
from tests.helpers import SaveRankState, fast_trainer_kwargs


def test_fractions_take_more_from_cheap_groups_and_the_same_channels_overall():
    costs, channels = [0.5, 0.01, 0.0, 0.05], [16, 16, 32, 8]
    fractions = fractions_from_costs(costs, channels, 0.3)
    assert sum(f * n for f, n in zip(fractions, channels, strict=True)) == pytest.approx(sum(channels))
    assert fractions[0] == min(fractions) and fractions[0] >= 0.25  # the costly group loses least, never nothing
    assert fractions[2] > fractions[1] > fractions[3] > fractions[0]  # ordered by cost
    assert max(fractions) <= 2.0
    assert fractions_from_costs([0.1, 0.1], [8, 8], 0.5) == pytest.approx([1.0, 1.0])  # equal costs: uniform
    with pytest.raises(ValueError, match=r"channel_fractions.*'sometimes'"):
        MagnitudePruning(0.5, pattern="channels", channel_fractions="sometimes")
    with pytest.raises(ValueError, match=r"channel_fractions`='sensitivity'.*pattern='channels'"):
        MagnitudePruning(0.5, channel_fractions="sensitivity")


def test_heads_and_channels_share_the_target_apart():
    """Twelve heads beside 1536 FFN units would hardly weigh in one balance: each kind keeps its own total."""
    groups = ChannelGroups(
        [ChannelGroup(f"ffn{i}", 1536, ()) for i in range(2)]
        + [ChannelGroup(f"attn{i}", 12, (), kind="heads") for i in range(2)]
    )
    fractions = shared_by_kind(groups, [0.03, 0.01, 0.005, 0.08], 0.3)
    assert fractions[0] * 1536 + fractions[1] * 1536 == pytest.approx(2 * 1536)  # the same units overall
    assert fractions[2] * 12 + fractions[3] * 12 == pytest.approx(2 * 12)  # and the same heads overall
    assert fractions[1] > 1 > fractions[0] and fractions[2] > 1 > fractions[3]


def _pruning():
    return MagnitudePruning(
        0.5, pattern="channels", exclude=["last"], every_n_steps=2, end_step=6, channel_fractions="sensitivity"
    )


def _digits_mlp():
    from tests.test_budget import _trained

    model = _trained()  # a digits MLP trained to ~0.90: its two hidden layers matter unequally
    model.lr = 1e-3
    return model


def test_sensitivity_fractions_prune_groups_unevenly_and_resume_with_the_same_fractions(tmp_path, monkeypatch):
    import lightning_accel.pruning.fractions as fractions_module
    from lightning_accel import AccelerationReport
    from lightning_accel.report.markdown import to_markdown

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    first = _pruning()
    report = AccelerationReport(directory=tmp_path / "report", latency=False, plots=False)
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=2, enable_checkpointing=True), callbacks=[first, checkpoints, report]
    )
    trainer.fit(_digits_mlp())
    groups = first._groups.groups
    assert first._fractions is not None and len(first._fractions) == len(groups) >= 2
    assert len(set(round(f, 6) for f in first._fractions)) > 1  # measured, not uniform
    channels = [g.channels for g in groups]
    assert sum(f * n for f, n in zip(first._fractions, channels, strict=True)) == pytest.approx(sum(channels))
    assert first.state_dict()["channel_fractions"] == first._fractions
    measured = report.report["channel_sensitivity"]["MagnitudePruning"]
    assert measured["metric"] == "accuracy" and measured["sparsity"] == 0.5 and measured["seconds"] > 0
    assert [row["fraction"] for row in measured["groups"]] == first._fractions
    costliest = max(measured["groups"], key=lambda row: row["cost"])
    assert costliest["fraction"] == min(first._fractions)  # the costliest removal gives the least
    assert f"| {costliest['group']} | channels | {costliest['cost']:+.4f} |" in to_markdown(report.report)

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed fit must reuse the saved fractions")

    monkeypatch.setattr(fractions_module, "channel_sensitivity", measured_again)
    second = _pruning()
    resumed = Trainer(**fast_trainer_kwargs(max_epochs=2), callbacks=[second])
    resumed.fit(_digits_mlp(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert second._fractions == first._fractions and second.channel_sensitivity == first.channel_sensitivity
    assert all(torch.equal(first._masks[k].cpu(), second._masks[k].cpu()) for k in first._masks)


def test_ddp_ranks_keep_rank_zeros_fractions(tmp_path):
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=1, strategy="ddp_spawn", devices=2),
        callbacks=[_pruning(), SaveRankState(tmp_path)],
    )
    trainer.fit(_digits_mlp())
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    fractions = {k: v for k, v in rank0.items() if "/channel_fractions/" in k}
    assert fractions and all(rank1[k] == v for k, v in fractions.items())
    masks = {k for k in rank0 if "/masks/" in k}
    assert masks and all(torch.equal(rank0[k], rank1[k]) for k in masks)


def test_a_pruning_budget_is_measured_dense_against_pruned_and_a_missed_one_warns(tmp_path):
    from lightning_accel._core.stage import built_deployment

    met = MagnitudePruning(
        0.25, pattern="channels", exclude=["last"], every_n_steps=2, end_step=4, max_quality_loss=1.0
    )
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1, default_root_dir=tmp_path), callbacks=[met])
    trainer.fit(_digits_mlp())
    result = met.quality.result
    assert result["metric"] == "accuracy" and result["met"] and result["dense"] > 0.85
    assert result["loss"] == pytest.approx(result["dense"] - result["pruned"])
    assert any("Pruning: quality budget 1 (accuracy) met" in note for note in built_deployment(trainer).notes)

    strict = MagnitudePruning(
        0.9, pattern="channels", exclude=["last"], every_n_steps=2, end_step=4, max_quality_loss=0
    )
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1, default_root_dir=tmp_path), callbacks=[strict])
    with pytest.warns(UserWarning, match=r"quality budget 0 \(accuracy\) MISSED: dense 0\.\d{4}, pruned 0\.\d{4}"):
        trainer.fit(_digits_mlp())
    with pytest.raises(ValueError, match=r"max_quality_loss.*got -0.5"):
        MagnitudePruning(0.5, pattern="channels", max_quality_loss=-0.5)

"""Wanda importance: weights ranked by |w| x the input feature's norm, one-shot and on the schedule."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from torch import nn

from lightning_accel import MagnitudePruning
from lightning_accel.pruning.masks import compute_masks
from lightning_accel.pruning.wanda import WandaImportance, wanda_masks
from tests.helpers import TinyModule
from tests.lm_models import TinyCausalLM, lm_trainer


def _outlier_inputs(features: int = 16, rows: int = 256) -> torch.Tensor:
    torch.manual_seed(0)
    inputs = torch.randn(rows, features)
    inputs[:, :2] *= 30.0  # two loud features, as language models have
    return inputs


def test_wanda_keeps_small_weights_on_loud_features_and_loses_less_output_than_magnitude():
    inputs = _outlier_inputs()
    layer = nn.Linear(16, 8, bias=False)
    scorer = WandaImportance(nn.Sequential(layer), ["0.weight"])
    scorer.gather(nn.Sequential(layer), [inputs])
    norms = scorer.take()
    assert norms is not None and norms.norms["0.weight"][:2].min() > 10 * norms.norms["0.weight"][2:].max()
    weights = {"0.weight": layer.weight.detach()}
    wanda = wanda_masks(weights, norms.norms, 0.5)["0.weight"]
    magnitude = compute_masks(weights, 0.5, scope="layer")["0.weight"]
    assert torch.equal(wanda.sum(1), torch.full((8,), 8))  # per output row, as Wanda compares
    assert wanda[:, :2].all()  # the loud features' weights all stay

    def output_error(mask):
        return ((inputs @ (layer.weight * mask).T - inputs @ layer.weight.T) ** 2).mean().item()

    assert output_error(wanda) < 0.5 * output_error(magnitude)


def test_wanda_n_m_masks_keep_n_of_every_m_inputs_and_transposed_weights_are_ranked_along_their_inputs():
    inputs = _outlier_inputs()
    weight = torch.randn(8, 16)
    norms = inputs.norm(dim=0)
    mask = wanda_masks({"w": weight}, {"w": norms}, 0.5, "2:4")["w"]
    assert torch.equal(mask.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2))
    transposed = wanda_masks({"w": weight.T.contiguous()}, {"w": norms}, 0.5, "2:4", transposed={"w"})["w"]
    assert torch.equal(transposed, mask.T)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_shot_wanda_at_step_zero_gathers_norms_on_the_first_batch_and_reaches_2_4(tmp_path, kind):
    masks = {}
    for importance in ("magnitude", "wanda"):
        pruning = MagnitudePruning(
            target_sparsity=0.5,
            pattern="2:4",
            schedule="one_shot",
            importance=importance,
            exclude=["net.model.lm_head"],
        )
        trainer = lm_trainer(tmp_path, [pruning], 2, limit_val_batches=0)
        trainer.fit(TinyCausalLM(kind))
        masks[importance] = pruning.masks
    wanda = masks["wanda"]
    assert wanda and all(abs(m.float().mean().item() - 0.5) < 1e-6 for m in wanda.values())
    differing = [name for name in wanda if not torch.equal(wanda[name], masks["magnitude"][name])]
    assert len(differing) == len(wanda)  # the input norms changed the ranking of every layer


def test_wanda_state_survives_a_checkpoint_round_trip_and_refuses_other_layers():
    layer = nn.Sequential(nn.Linear(16, 8))
    scorer = WandaImportance(layer, ["0.weight"])
    scorer.gather(layer, [_outlier_inputs()])
    restored = WandaImportance(layer, ["0.weight"])
    restored.load_state_dict(scorer.state_dict())
    torch.testing.assert_close(restored.take().norms["0.weight"], scorer.take().norms["0.weight"])
    other = WandaImportance(nn.Sequential(nn.Linear(12, 8)), ["0.weight"])
    with pytest.raises(ValueError, match="other layers"):
        other.load_state_dict(restored.state_dict() | {"sums": {"0.weight": torch.ones(16)}})


def test_wanda_is_refused_for_channels_and_for_non_linear_weights():
    with pytest.raises(ValueError, match=r"importance='wanda'.*pattern='channels'"):
        MagnitudePruning(target_sparsity=0.5, pattern="channels", importance="wanda")
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"not Linear weights: \['net.conv.weight \(Conv2d\)'\]"):
        MagnitudePruning(target_sparsity=0.5, importance="wanda").setup(trainer, TinyModule(), "fit")


def test_channel_pruning_of_a_rotary_decoder_is_refused_at_setup_with_the_reason(tmp_path):
    import time

    pruning = MagnitudePruning(target_sparsity=0.3, pattern="channels", include=["*.mlp.*"])
    trainer = lm_trainer(tmp_path, [pruning], 2, limit_val_batches=0)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"rotary decoders .*LlamaAttention.*pattern='unstructured' or 'N:M'"):
        trainer.fit(TinyCausalLM("llama"))
    # Refused before any trace: torch-pruning's dependency fixing ran over 60 s on this model without finishing.
    assert time.perf_counter() - started < 30

"""MagnitudePruning in a Trainer: exact targets, zeros after every step, state, resume, DDP, logging, errors."""

import csv
import re
import warnings

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_accel import MagnitudePruning, mask_sparsity, tensor_sparsity
from tests.helpers import (
    CheckZerosAfterEveryStep,
    RandomImages,
    SaveRankState,
    TinyModule,
    assert_states_equal,
    fast_trainer_kwargs,
    fit_tiny,
    flatten,
    module_with_example,
)

STEPS_PER_EPOCH = 8  # RandomImages: 64 samples / batch 8


class RecordMaskSparsity(Callback):
    """Records the mask sparsity in force at each optimizer step."""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = mask_sparsity(self.pruning.masks)


def fit(callbacks, module=None, epochs=3, **kwargs):
    return fit_tiny(callbacks, module, epochs, **kwargs)


def selected(module):
    return {n: p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1}


@pytest.mark.parametrize("schedule", ["cubic", "linear", "one_shot"])
@pytest.mark.parametrize("scope", ["global", "lamp", "layer"])
def test_reaches_the_target_exactly(schedule, scope):
    pruning = MagnitudePruning(0.9, schedule=schedule, scope=scope, every_n_steps=2)
    _, module = fit([pruning])
    weights = selected(module)
    if scope in ("global", "lamp"):
        total = sum(p.numel() for p in weights.values())
        assert tensor_sparsity(weights) == pytest.approx(round(0.9 * total) / total)
    else:
        for p in weights.values():
            assert int((p == 0).sum()) == round(0.9 * p.numel())


@pytest.mark.parametrize(("optimizer", "accumulate"), [("sgd", 1), ("adam", 1), ("sgd", 2), ("adam", 3)], ids=str)
def test_pruned_weights_are_zero_after_every_optimizer_step(optimizer, accumulate):
    pruning = MagnitudePruning(0.8, every_n_steps=1, end_step=6)
    check = CheckZerosAfterEveryStep(pruning)
    fit([pruning, check], module=TinyModule(optimizer=optimizer), accumulate_grad_batches=accumulate)
    assert check.checked == 3 * STEPS_PER_EPOCH
    assert check.violations == 0
    assert pruning.masks and not all(m.all() for m in pruning.masks.values())


def test_without_the_step_hook_momentum_would_revive_pruned_weights():
    # Guards the test above: with the per-step zeroing removed, momentum makes pruned weights nonzero again.
    pruning = MagnitudePruning(0.8, every_n_steps=1, end_step=2)
    pruning._after_optimizer_step = lambda *args: None
    check = CheckZerosAfterEveryStep(pruning)
    fit([pruning, check], epochs=1)
    assert check.violations > 0


def test_parameters_keep_names_identity_and_load_into_the_plain_model(tmp_path):
    module = TinyModule()
    before = {n: id(p) for n, p in module.named_parameters()}
    trainer, module = fit([MagnitudePruning(0.5, every_n_steps=4)], module=module)
    assert {n: id(p) for n, p in module.named_parameters()} == before
    trainer.save_checkpoint(tmp_path / "pruned.ckpt", weights_only=True)
    checkpoint = torch.load(tmp_path / "pruned.ckpt", weights_only=True)
    plain = TinyModule()
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    assert tensor_sparsity(selected(plain)) == pytest.approx(tensor_sparsity(selected(module)))


def test_full_checkpoint_state_loads_with_weights_only(tmp_path):
    pruning = MagnitudePruning(0.5, every_n_steps=4)
    trainer, _ = fit([pruning])
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    state = torch.load(tmp_path / "full.ckpt", weights_only=True)["callbacks"][pruning.state_key]
    assert state["pattern"] == "unstructured"
    assert all(mask.dtype == torch.bool for mask in state["masks"].values())
    assert state["mask_sparsity"] == 0.5


@pytest.mark.parametrize("resume_epoch", [1, 2], ids=["mid-schedule", "after-schedule"])
def test_resume_gives_bit_identical_masks(tmp_path, resume_epoch):
    def pruning():
        return MagnitudePruning(0.9, end_step=20, every_n_steps=3)

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    (tmp_path / "a").mkdir()
    first = pruning()
    first_record = RecordMaskSparsity(first)
    fit([first, first_record, checkpoints, SaveRankState(tmp_path / "a")], epochs=4, enable_checkpointing=True)

    (tmp_path / "b").mkdir()
    second = pruning()
    second_record = RecordMaskSparsity(second)
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=4), callbacks=[second, second_record, SaveRankState(tmp_path / "b")]
    )
    trainer.fit(TinyModule(), datamodule=RandomImages(), ckpt_path=tmp_path / f"epoch={resume_epoch - 1}.ckpt")

    # The resumed run continues the same schedule step by step, from its first step on.
    assert min(second_record.by_step) == resume_epoch * STEPS_PER_EPOCH + 1
    assert second_record.by_step == {k: v for k, v in first_record.by_step.items() if k in second_record.by_step}

    a = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    masks = {k: v for k, v in a.items() if "/masks/" in k}
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    model = {k: v for k, v in a.items() if k.startswith("model/")}
    assert_states_equal(model, {k: b[k] for k in model}, atol=1e-6)


def test_resume_refuses_masks_of_another_pattern_or_shape(tmp_path):
    pruning = MagnitudePruning(0.5, every_n_steps=4)
    trainer, _ = fit([pruning], epochs=1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    other_pattern = MagnitudePruning(0.5, pattern="channels")
    with pytest.raises(ValueError, match=r"pattern 'unstructured'.*'channels'"):
        fit([other_pattern], module_with_example(), epochs=2, ckpt_path=tmp_path / "run.ckpt")

    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["callbacks"][pruning.state_key]
    state["masks"]["net.fc1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    fresh = MagnitudePruning(0.5)
    fresh.setup(None, TinyModule(), "fit")
    with pytest.raises(ValueError, match=r"net.fc1.weight: checkpoint \(3, 3\) vs model \(16, 128\)"):
        fresh.load_state_dict(state)


def test_ddp_ranks_hold_identical_masks_and_weights(tmp_path):
    pruning = MagnitudePruning(0.9, end_step=6, every_n_steps=2)
    _, module = fit([pruning, SaveRankState(tmp_path)], epochs=2, strategy="ddp_spawn", devices=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)
    masks = [v for k, v in rank0.items() if "/masks/" in k]
    pruned = sum(int((~m).sum()) for m in masks)
    assert pruned == round(0.9 * sum(m.numel() for m in masks))
    # As the README says: the launching process gets the pruned weights back, but the masks stayed in the workers.
    for name, mask in ((k.rsplit("/masks/", 1)[1], v) for k, v in rank0.items() if "/masks/" in k):
        assert torch.equal(module.get_parameter(name).detach() == 0, ~mask)
    assert pruning.masks == {}


def test_logs_target_and_actual_sparsity_to_the_logger(tmp_path):
    pruning = MagnitudePruning(0.8, end_step=12, every_n_steps=2, log_per_layer=True)
    fit([pruning], epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with open(next(tmp_path.rglob("metrics.csv"))) as metrics:
        rows = list(csv.DictReader(metrics))
    actual = [float(r["sparsity/actual"]) for r in rows if r.get("sparsity/actual")]
    target = [float(r["sparsity/target"]) for r in rows if r.get("sparsity/target")]
    assert len(actual) >= 10 and actual == sorted(actual) and actual[0] < actual[-1]
    assert target[-1] == pytest.approx(0.8) and actual[-1] == pytest.approx(0.8, abs=1e-3)
    assert any(r.get("sparsity/layer/net.fc1.weight") for r in rows)


def test_warns_when_training_stops_before_the_target():
    with pytest.warns(UserWarning, match="the schedule reaches its target only at step"):
        fit([MagnitudePruning(0.9, end_step=1000)], epochs=1)


def test_channels_and_n_m_patterns_in_training():
    channels = MagnitudePruning(0.5, pattern="channels", exclude=["net.fc2.*"], every_n_steps=2)
    _, module = fit([channels], module=module_with_example())
    rows = module.net.fc1.weight.flatten(1)
    assert int((rows == 0).all(dim=1).sum()) == 8 and torch.equal(rows.any(dim=1), ~(rows == 0).all(dim=1))
    # the output layer keeps its rows; it loses the input columns of fc1's pruned channels (one group)
    assert (module.net.fc2.weight.any(dim=1)).all() and int((module.net.fc2.weight == 0).all(dim=0).sum()) == 8

    n_m = MagnitudePruning(0.5, pattern="2:4", exclude=["net.conv.*"], every_n_steps=2)
    _, module = fit([n_m])
    groups = (module.net.fc1.weight != 0).reshape(-1, 4).sum(dim=1)
    assert (groups <= 2).all() and (groups == 2).float().mean() > 0.99


def test_two_instances_on_different_parameters_share_a_trainer(tmp_path):
    first = MagnitudePruning(0.5, include=["net.fc1.weight"], every_n_steps=2)
    second = MagnitudePruning(0.25, include=["net.fc2.weight"], every_n_steps=2)
    assert first.state_key != second.state_key
    trainer, module = fit([first, second])
    assert tensor_sparsity({"w": module.net.fc1.weight}) == 0.5
    assert tensor_sparsity({"w": module.net.fc2.weight}) == 0.25
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    assert {first.state_key, second.state_key} <= set(torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"])


def test_fit_twice_keeps_the_masks():
    pruning = MagnitudePruning(0.5, every_n_steps=2)
    trainer, module = fit([pruning], epochs=1)
    first = {k: v.clone() for k, v in flatten(pruning.state_dict(), "").items() if "/masks/" in k}
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=RandomImages())
    second = {k: v for k, v in flatten(pruning.state_dict(), "").items() if "/masks/" in k}
    assert all(not (second[k] & ~first[k]).any() for k in first)
    assert tensor_sparsity(selected(module)) >= 0.5 - 1e-3


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument", "error"),
    [
        (dict(target_sparsity=1.0), "target_sparsity", ValueError),
        (dict(target_sparsity=-0.5), "target_sparsity", ValueError),
        (dict(schedule="step"), "schedule", ValueError),
        (dict(start_step=5, end_step=5), "end_step", ValueError),
        (dict(start_step=-2), "start_step", ValueError),
        (dict(every_n_steps=0), "every_n_steps", ValueError),
        (dict(pattern="2:3:4"), "pattern", ValueError),
        (dict(pattern="8:4"), "pattern", ValueError),
        (dict(pattern="2:4", target_sparsity=0.9), "target_sparsity", ValueError),
        (dict(scope="model"), "scope", ValueError),
        (dict(include="net.fc1.weight"), "include", TypeError),
        (dict(exclude=[1]), "exclude", TypeError),
    ],
)
def test_bad_constructor_arguments_name_argument_and_value(kwargs, argument, error):
    arguments = {"target_sparsity": 0.5} | kwargs
    with pytest.raises(error, match=f"`{argument}`") as info:
        MagnitudePruning(**arguments)
    assert repr(arguments[argument]) in str(info.value)


def test_patterns_that_select_nothing_fail_at_setup_and_name_the_patterns():
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder\.\*' matches no module.*'net\.fc1'"):
        fit([MagnitudePruning(0.5, include=["encoder.*"])])
    with pytest.raises(ValueError, match=r"`exclude` pattern 'haed' matches no module"):
        fit([MagnitudePruning(0.5, exclude=["haed"])])


def test_n_m_on_misfitting_shapes_fails_at_setup_naming_the_parameter():
    with pytest.raises(ValueError, match=r"net\.conv\.weight \(8, 1, 3, 3\).*exclude"):
        fit([MagnitudePruning(0.5, pattern="2:4")])


def test_constant_amount_in_lightning_model_pruning_overshoots_where_ours_lands_on_target():
    from lightning.pytorch.callbacks import ModelPruning

    # Both prune the same weights (Linear/Conv weights, one global threshold) towards "0.9".
    reference = ModelPruning(
        "l1_unstructured", amount=0.9, parameter_names=["weight"], use_global_unstructured=True, verbose=0
    )
    _, theirs = fit([reference], epochs=3, module=TinyModule(optimizer="adam"))
    _, ours = fit([MagnitudePruning(0.9, end_step=16, every_n_steps=2)], epochs=3, module=TinyModule(optimizer="adam"))
    assert tensor_sparsity(selected(theirs)) > 0.99  # compounding per epoch: 0.9, then 0.99, then 0.999
    assert tensor_sparsity(selected(ours)) == pytest.approx(0.9, abs=1e-3)


# --- weights nobody names are named -----------------------------------------------------------------------------


class _SequenceModel(TinyModule):
    """An embedding, an LSTM, a transposed conv and a head: the layers the default selection used to skip."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None
        self.embed = nn.Embedding(16, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.head = nn.Linear(8 * 8, 4)

    def forward(self, x):
        tokens = (x.flatten(1)[:, :4].abs() * 4).long().clamp(max=15)
        out, _ = self.lstm(self.embed(tokens))
        return self.head(self.up(out.transpose(1, 2)).flatten(1))


def test_lstm_gates_and_transposed_convs_are_pruned_and_embeddings_are_named(capsys):
    pruning = MagnitudePruning(target_sparsity=0.9, schedule="one_shot")
    fit_tiny([pruning], _SequenceModel())
    names = set(pruning.masks)
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "up.weight", "head.weight"} <= names
    assert "embed.weight" not in names and "lstm.bias_ih_l0" not in names
    for name in ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "up.weight"):
        # one global threshold over all of them: each layer lost most of its weights, none was skipped
        assert (~pruning.masks[name]).float().mean() > 0.5, name
    assert re.search(r"left dense by default, embeddings[^;]*: embed\.weight", pruning._selection_summary)


def test_resuming_with_a_lower_target_warns_that_zeros_do_not_come_back(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="p90", save_last=False)
    fit_tiny([MagnitudePruning(target_sparsity=0.9, schedule="one_shot"), checkpoint], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"target_sparsity 0\.5.*below the 90\.00% .*checkpoint.*zero"):
        fit_tiny(
            [MagnitudePruning(target_sparsity=0.5, schedule="one_shot")], epochs=2, ckpt_path=tmp_path / "p90.ckpt"
        )


class _SmallLayer(TinyModule):
    """fc2's weights are 1,000x smaller than the others': a global threshold empties it first."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.net.fc2.weight.mul_(1e-3)


def test_a_layer_the_global_threshold_empties_is_named_at_each_recompute():
    pruning = MagnitudePruning(0.5, schedule="one_shot", scope="global")
    with pytest.warns(UserWarning, match=r"above 99% zeros: net\.fc2\.weight 100\.0%"):
        fit_tiny([pruning], _SmallLayer())
    assert (~pruning.masks["net.fc2.weight"]).all()  # the reason for the warning, measured
    # The default ranks scale-aware (LAMP): the small-scale layer keeps weights, and nothing is warned about.
    default = MagnitudePruning(0.5, schedule="one_shot")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!MagnitudePruning)")
        fit_tiny([default], _SmallLayer())
    assert (~default.masks["net.fc2.weight"]).float().mean() < 0.5  # scale does not decide: it keeps most


class _Depthwise(TinyModule):
    """TinyModule with a depthwise conv after the stem, as in MobileNet's inverted residuals."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        net = self.net
        x = torch.relu(self.dw(torch.relu(net.bn(net.conv(x)))))
        return net.fc2(torch.relu(net.fc1(torch.nn.functional.max_pool2d(x, 2).flatten(1))))


def test_depthwise_convs_stay_dense_under_unstructured_pruning_unless_named():
    pruning = MagnitudePruning(0.9, scope="layer", schedule="one_shot")
    fit_tiny([pruning], _Depthwise())
    assert "dw.weight" not in pruning.masks and "net.conv.weight" in pruning.masks
    assert re.search(r"left dense by default, depthwise convs[^;]*: dw\.weight", pruning._selection_summary)
    named = MagnitudePruning(0.9, scope="layer", schedule="one_shot", include=["dw"])
    fit_tiny([named], _Depthwise())
    assert set(named.masks) == {"dw.weight"}


class _LoraLinear(nn.Module):
    """The shape of a PEFT LoRA layer: a frozen base layer and two trainable adapters."""

    def __init__(self, inputs, outputs, rank=2):
        super().__init__()
        self.base_layer = nn.Linear(inputs, outputs)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.Linear(inputs, rank, bias=False)
        self.lora_B = nn.Linear(rank, outputs, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _LoraModule(TinyModule):
    def __init__(self):
        super().__init__()
        self.net.fc1 = _LoraLinear(128, 16)


def test_lora_adapters_are_refused_by_default_and_the_base_layers_can_be_named():
    with pytest.raises(
        ValueError, match=r"LoRA adapters \(net\.fc1\.lora_A, net\.fc1\.lora_B\).*include=\['\*\.base_layer'\]"
    ):
        fit_tiny([MagnitudePruning(0.5)], _LoraModule())
    pruning = MagnitudePruning(0.5, include=["*.base_layer"], schedule="one_shot")
    _, module = fit_tiny([pruning], _LoraModule())
    assert set(pruning.masks) == {"net.fc1.base_layer.weight"}
    assert float((module.net.fc1.base_layer.weight == 0).float().mean()) == pytest.approx(0.5)

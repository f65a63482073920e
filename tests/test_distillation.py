"""The Distillation callback: a loss from a frozen teacher, added without any change to training_step."""

import copy

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_accel import Distillation, MagnitudePruning, QuantizationAwareTraining
from lightning_accel.distillation.callback import distillation_loss
from tests.helpers import RandomImages, SaveRankState, TinyModule, assert_states_equal, fast_trainer_kwargs


class MLPModule(TinyModule):
    """An MLP without BatchNorm or dropout (train and eval compute alike); `task` scales the task loss."""

    def __init__(self, task: float = 1.0, lr: float = 0.05):
        super().__init__(lr=lr)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.task = task
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.task * nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def fit(callbacks, module, **kwargs):
    trainer = Trainer(**fast_trainer_kwargs(**kwargs), callbacks=callbacks)
    trainer.fit(module, datamodule=RandomImages())
    return trainer


def test_losses_are_zero_for_identical_outputs_and_positive_otherwise():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    for loss in ("kl", "mse", "cosine"):
        assert distillation_loss(a, a, loss, 2.0).item() == pytest.approx(0.0, abs=1e-6)
        assert distillation_loss(a, b, loss, 2.0).item() > 0
    # KL with temperature T is T^2 times the KL of the softened distributions (Hinton et al.)
    soft = torch.nn.functional.kl_div(
        torch.log_softmax(a / 3, -1), torch.log_softmax(b / 3, -1), log_target=True, reduction="batchmean"
    )
    assert distillation_loss(a, b, "kl", 3.0).item() == pytest.approx(9 * soft.item(), rel=1e-5)


def test_the_student_learns_the_teacher_with_an_unchanged_training_step():
    student = MLPModule(task=0.0, lr=0.2)  # the task loss is zero: only distillation moves the weights
    teacher = copy.deepcopy(student.net)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    x = RandomImages().x
    before = nn.functional.mse_loss(student(x), teacher(x)).item()
    callback = Distillation(weight=1.0, loss="mse", teacher=teacher, output_module="net")
    trainer = fit([callback], student, max_epochs=8)
    after = nn.functional.mse_loss(student(x), teacher(x)).item()
    assert after < 0.2 * before
    assert trainer.logged_metrics["distill/loss"] < before
    assert "training_step" not in student.__dict__  # the wrapper is removed at teardown


def test_the_default_teacher_is_the_model_at_setup_frozen_and_outside_the_module_in_any_order():
    initial = {k: v.clone() for k, v in MLPModule().state_dict().items()}
    for order in ("first", "last"):
        distill = Distillation(weight=0.5)
        others = [MagnitudePruning(0.5, end_step=4, every_n_steps=2), QuantizationAwareTraining(start_step=2)]
        callbacks = [distill, *others] if order == "first" else [*others, distill]
        student = MLPModule()
        fit(callbacks, student, max_epochs=1)
        assert_states_equal(distill.teacher.state_dict(), initial)  # before pruning zeroed or QAT trained anything
        assert not any(p.requires_grad for p in distill.teacher.parameters())
        assert not any(m is distill.teacher for m in student.modules())
        assert not any(hasattr(m, "weight_quant") for m in distill.teacher.modules())
        pruned = [p for p in student.parameters() if p.dim() > 1]
        zeros = sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned)
        assert zeros == pytest.approx(0.5, abs=0.01)  # the student was pruned; its teacher was not


def test_gradient_accumulation_and_resume_keep_the_teacher_and_the_loss_consistent(tmp_path):
    # Two micro-batches of 8 accumulated give the weights one batch of 16 gives: the distillation loss is added
    # before Lightning divides by the accumulation count, like the task loss.
    def run(batch_size, accumulate):
        student = MLPModule()
        teacher = copy.deepcopy(student.net)
        with torch.no_grad():
            teacher[1].weight.mul_(0.5)
        callback = Distillation(weight=2.0, loss="kl", teacher=teacher, output_module="net")
        trainer = Trainer(**fast_trainer_kwargs(max_epochs=1, accumulate_grad_batches=accumulate), callbacks=[callback])
        trainer.fit(student, datamodule=RandomImages(batch_size=batch_size))
        return student.state_dict()

    assert_states_equal(run(8, 2), run(16, 1), atol=1e-6)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = Distillation(loss="mse")
    fit([first, checkpoint], MLPModule(), max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # Not stored twice: the callback's state is its settings, and the module's state has no teacher in it.
    assert saved["callbacks"][first.state_key] == {"weight": 1.0, "loss": "mse", "temperature": 2.0}
    assert set(saved["state_dict"]) == set(MLPModule().state_dict())
    resumed = Distillation(loss="mse")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=2, enable_checkpointing=True), callbacks=[resumed])
    trainer.fit(MLPModule(), datamodule=RandomImages(), ckpt_path=tmp_path / "last.ckpt")
    assert_states_equal(resumed.teacher.state_dict(), first.teacher.state_dict())  # rebuilt from the same start


def test_under_ddp_every_rank_has_a_teacher_and_the_ranks_agree(tmp_path):
    callback = Distillation(loss="mse")
    fit([callback, SaveRankState(tmp_path)], MLPModule(), strategy="ddp_spawn", devices=2, max_epochs=1)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)


def test_bf16_mixed_runs_the_teacher_under_autocast():
    callback = Distillation(loss="kl")
    trainer = fit([callback], MLPModule(), max_epochs=1, precision="bf16-mixed")
    assert torch.isfinite(trainer.logged_metrics["distill/loss"])


def test_bad_settings_and_manual_optimization_are_refused():
    with pytest.raises(ValueError, match=r"`loss` must be one of \['kl', 'mse', 'cosine'\], got 'l2'"):
        Distillation(loss="l2")
    with pytest.raises(ValueError, match="`weight` must be a number > 0"):
        Distillation(weight=0)
    with pytest.raises(TypeError, match="`modules` must be a list of module names"):
        Distillation(modules="net.1")
    manual = MLPModule()
    manual.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization"):
        fit([Distillation()], manual, max_epochs=1)
    with pytest.raises(ValueError, match="'encoder' does not exist"):
        fit([Distillation(output_module="encoder")], MLPModule(), max_epochs=1)

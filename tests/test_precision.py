"""MixedPrecision: the choice of precision, autocast in training, loss-scale health, non-finite steps, export."""

import pytest
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_accel.precision.callback as precision_module
from lightning_accel import MagnitudePruning, MixedPrecision, NonFiniteLossError, choose_precision
from tests.helpers import (
    CheckZerosAfterEveryStep,
    SaveRankState,
    TinyModule,
    assert_states_equal,
    fit_tiny,
)


class RecordAutocast(TinyModule):
    """Records, inside training_step, whether autocast is on, its dtype, and the input's memory format."""

    def training_step(self, batch, batch_idx):
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        self.output_dtype = self(batch[0]).dtype
        self.input_channels_last = batch[0].is_contiguous(memory_format=torch.channels_last)
        return super().training_step(batch, batch_idx)


class ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (inf forces a GradScaler skip)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class FaultyModule(TinyModule):
    """At ``fault_steps``: ``"grad"`` makes only the gradients infinite, ``"loss"`` only the loss NaN (gradients
    stay finite), ``"nan"`` both (the loss times NaN)."""

    def __init__(self, fault: str = "grad", fault_steps: tuple = (2,)) -> None:
        super().__init__()
        self.fault, self.fault_steps = fault, fault_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.fault_steps:
            if self.fault == "loss":
                return loss + float("nan")
            if self.fault == "nan":
                return loss * float("nan")
            return ScaleGradient.apply(loss, float("inf"))
        return loss


fit = fit_tiny


@pytest.mark.parametrize(
    ("device", "capability", "native_bf16", "expected"),
    [
        ("cuda", (9, 0), False, "bf16-mixed"),
        ("cuda", (8, 0), False, "bf16-mixed"),
        ("cuda", (7, 5), False, "16-mixed"),
        ("cpu", None, True, "bf16-mixed"),
        ("cpu", None, False, "32-true"),
    ],
)
def test_auto_picks_what_the_hardware_runs_fast(device, capability, native_bf16, expected):
    chosen, reason = choose_precision(device, capability, native_bf16)
    assert chosen == expected
    assert reason


def test_native_bf16_is_read_from_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert not precision_module.cpu_has_native_bf16(str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert precision_module.cpu_has_native_bf16(str(cpuinfo))
    assert not precision_module.cpu_has_native_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize(("native", "expected"), [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_on_cpu_keeps_fp32_without_native_bf16_and_says_why(monkeypatch, caplog, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    trainer, module = fit([MixedPrecision("auto")], module=RecordAutocast(), limit_train_batches=2)
    assert trainer.precision == expected
    assert module.autocast[0] == (expected != "32-true")
    if not native:
        assert "no native bf16" in caplog.text


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_forced_precision_runs_real_autocast_on_cpu(precision, dtype):
    trainer, module = fit([MixedPrecision(precision)], module=RecordAutocast(), limit_train_batches=2)
    assert trainer.precision == precision
    assert module.autocast == (True, dtype)
    assert module.output_dtype == dtype


def test_fp16_logs_loss_scale_and_counts_skipped_steps(tmp_path):
    trainer, _ = fit(
        [MixedPrecision("16-mixed")],
        module=FaultyModule("grad", fault_steps=(2, 5)),
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    assert trainer.callback_metrics["amp/skipped_steps"] == 2
    assert trainer.callback_metrics["amp/loss_scale"] == 2.0**16 / 4  # backed off once per skipped step
    assert "amp/loss_scale" in (next(tmp_path.rglob("metrics.csv"))).read_text()


def test_grad_scaler_state_survives_checkpoint_and_resume(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit([MixedPrecision("16-mixed"), checkpoint], module=FaultyModule("grad"), enable_checkpointing=True)

    class ScaleAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.scale = trainer.strategy.precision_plugin.scaler.get_scale()

    probe = ScaleAtStart()
    resumed = MixedPrecision("16-mixed")
    fit([resumed, probe], module=FaultyModule("grad", fault_steps=()), epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert probe.scale == 2.0**15
    assert resumed.state_dict()["skipped_steps"] == 1


def test_non_finite_loss_stops_training_with_step_loss_and_parameter():
    with pytest.raises(NonFiniteLossError, match=r"at step 3: loss = nan, first parameter .*: net\.conv\.weight"):
        fit([MixedPrecision("bf16-mixed")], module=FaultyModule("nan", fault_steps=(3,)))


def test_warn_mode_and_patience_let_training_continue():
    with pytest.warns(UserWarning, match="non-finite training for 2 consecutive"):
        trainer, _ = fit(
            [MixedPrecision("bf16-mixed", nonfinite="warn", patience=2)],
            module=FaultyModule("loss", fault_steps=(3, 4)),
        )
    assert trainer.global_step == 8


def test_isolated_non_finite_step_below_patience_is_tolerated():
    trainer, _ = fit(
        [MixedPrecision("bf16-mixed", patience=2)], module=FaultyModule("loss", fault_steps=(3,)), limit_train_batches=5
    )
    assert trainer.global_step == 5


def test_pruned_weights_stay_zero_through_skipped_fp16_steps():
    pruning = MagnitudePruning(0.7, every_n_steps=1, end_step=3)
    check = CheckZerosAfterEveryStep(pruning)
    module = FaultyModule("grad", fault_steps=(1, 4, 6))
    trainer, _ = fit([check, MixedPrecision("16-mixed"), pruning], module=module)
    assert trainer.callback_metrics["amp/skipped_steps"] == 3
    assert check.violations == 0 and check.checked == 8


def test_conflicting_trainer_precision_is_refused_matching_one_accepted():
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*conflicts.*Trainer\(precision='bf16-mixed'\)"):
        fit([MixedPrecision("16-mixed")], precision="bf16-mixed")
    trainer, _ = fit([MixedPrecision("bf16-mixed")], precision="bf16-mixed", limit_train_batches=1)
    assert trainer.precision == "bf16-mixed"
    trainer, _ = fit([MixedPrecision("auto")], precision="bf16-mixed", limit_train_batches=1)
    assert trainer.precision == "bf16-mixed"


def test_fp8_without_a_capable_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`precision` 'fp8' needs a CUDA device.*got device 'cpu'"):
        fit([MixedPrecision("fp8")])


def test_channels_last_converts_conv_weights_and_inputs_keeping_identity():
    module = RecordAutocast()
    ids = {n: id(p) for n, p in module.named_parameters()}
    fit([MixedPrecision("bf16-mixed", channels_last=True)], module=module, limit_train_batches=2)
    assert module.net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.input_channels_last
    assert {n: id(p) for n, p in module.named_parameters()} == ids


def test_precision_is_logged_as_a_hyperparameter(tmp_path):
    fit([MixedPrecision("bf16-mixed")], logger=CSVLogger(tmp_path), limit_train_batches=1)
    assert "precision: bf16-mixed" in next(tmp_path.rglob("hparams.yaml")).read_text()


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_export_half_is_half_the_size_and_loads_into_the_float_model(tmp_path, precision, dtype):
    path = tmp_path / "export" / "model.half.pt"
    _, module = fit([MixedPrecision(precision, export_half=str(path))], limit_train_batches=2)
    assert [p.name for p in path.parent.iterdir()] == ["model.half.pt"]  # no temporary file left behind
    half = torch.load(path, weights_only=True)
    assert half["net.fc1.weight"].dtype == dtype
    full_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    half_bytes = sum(t.numel() * t.element_size() for t in half.values())
    assert half_bytes < 0.51 * full_bytes  # file sizes are compared on the digits model in test_cli
    plain = TinyModule()
    plain.load_state_dict(half)
    assert plain.net.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(plain.net.fc1.weight, module.net.fc1.weight, atol=1e-2, rtol=1e-2)


def test_ddp_ranks_train_identically_under_bf16(tmp_path):
    fit([MixedPrecision("bf16-mixed"), SaveRankState(tmp_path)], strategy="ddp_spawn", devices=2, limit_train_batches=3)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)
    assert rank0["callback/MixedPrecision{'precision': 'bf16-mixed'}/precision"] == "bf16-mixed"


@pytest.mark.parametrize(
    ("kwargs", "argument", "error"),
    [
        (dict(precision="fp16"), "precision", ValueError),
        (dict(precision=16), "precision", ValueError),
        (dict(nonfinite="ignore"), "nonfinite", ValueError),
        (dict(patience=0), "patience", ValueError),
        (dict(channels_last="yes"), "channels_last", TypeError),
        (dict(export_half=""), "export_half", TypeError),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, argument, error):
    with pytest.raises(error, match=f"`{argument}`") as info:
        MixedPrecision(**kwargs)
    assert repr(kwargs[argument]) in str(info.value)


# --- GPU-only paths (skipped without CUDA) -----------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_auto_and_fp16_loss_scale_on_cuda():
    trainer, _ = fit([MixedPrecision("16-mixed")], accelerator="gpu", devices=1, module=FaultyModule("grad"))
    assert trainer.callback_metrics["amp/skipped_steps"] == 1
    trainer, _ = fit([MixedPrecision("auto")], accelerator="gpu", devices=1, limit_train_batches=2)
    expected = "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    assert trainer.precision == expected


@pytest.mark.gpu
def test_gpu_fp8_converts_linear_layers():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")

    class Wide(TinyModule):
        def __init__(self):
            super().__init__()
            self.net.fc1 = torch.nn.Linear(128, 32)
            self.net.fc2 = torch.nn.Linear(32, 16)

    _, module = fit([MixedPrecision("fp8")], module=Wide(), accelerator="gpu", devices=1, limit_train_batches=2)
    assert type(module.net.fc1).__name__ == "Float8Linear"


@pytest.mark.gpu
def test_gpu_channels_last():
    _, module = fit([MixedPrecision("auto", channels_last=True)], accelerator="gpu", devices=1, limit_train_batches=2)
    assert module.net.conv.weight.is_contiguous(memory_format=torch.channels_last)

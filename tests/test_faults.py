"""Faults: a killed training process, interrupted artifact writes, bad input everywhere, safe checkpoint loading and
long runs."""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from lightning import Callback, Trainer

from lightning_accel import (
    MagnitudePruning,
    MixedPrecision,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    apply_masks_,
    build_cli,
    calibrate_,
    compute_masks,
    export_onnx,
    sparsity_at,
)
from tests.helpers import RandomImages, TinyModule, TinyNet, fast_trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]


def run_kill_script(directory, *flags):
    return subprocess.run(
        [sys.executable, "-m", "tests.kill_run", str(directory), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_from_last_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = run_kill_script(tmp_path / "a")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    killed = run_kill_script(tmp_path / "b", "--kill-at", "13")  # step 13 is mid-epoch (8 steps per epoch)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "b" / "final.pt").exists()
    resumed = run_kill_script(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout

    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    pruned = {k: int((~m).sum()) for k, m in a["masks"].items()}
    assert sum(pruned.values()) == sum(int((~m).sum()) for m in b["masks"].values())  # same final sparsity
    for name, state in a["quantizers"].items():
        other = b["quantizers"][name]["scale"]
        if "weight_quant" in name:  # per-channel scales follow single weights: compare their mean
            assert other.mean().item() == pytest.approx(state["scale"].mean().item(), rel=0.2), name
        else:  # activation ranges are averaged over many steps
            torch.testing.assert_close(state["scale"], other, rtol=0.05, atol=0.0, msg=name)
    # The killed run restarted its interrupted epoch from the first batch (the loader is not resumable), so the
    # weights differ a little: the loss agrees within tolerance.
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.1)


# --- artifacts are never left half-written ---------------------------------------------------------------------


def test_interrupted_onnx_export_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")

    def crash_mid_write(model, path, *args, **kwargs):
        Path(path).write_bytes(b"\x08\x01half")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(TinyNet(), target, torch.zeros(1, 1, 8, 8))
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_interrupted_half_export_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.bf16.pt"
    target.write_bytes(b"previous weights")

    def crash_mid_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK half")
        raise KeyboardInterrupt

    import lightning_accel.export.half as half_module

    monkeypatch.setattr(half_module.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        half_module.save_half(TinyNet(), str(target), torch.bfloat16)
    assert target.read_bytes() == b"previous weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bf16.pt"]


# --- bad input: every public constructor argument and function ----------------------------------------------------

BAD_CONSTRUCTOR_ARGUMENTS = [
    (MagnitudePruning, {"target_sparsity": 0.5}, "target_sparsity", [1.0, -0.1, "half"]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "schedule", ["exponential", 3]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "initial_sparsity", [0.9, -1.0]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "start_step", [-1, 2.5]),
    (MagnitudePruning, {"target_sparsity": 0.5, "start_step": 10}, "end_step", [10, 3, "late"]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "every_n_steps", [0, -5, 1.5]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "pattern", ["dense", "4:2", "2:4:8", 4]),
    (MagnitudePruning, {"pattern": "2:4"}, "target_sparsity", [0.9, 0.25]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "scope", ["model", None]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "include", ["net.*", [""], [3]]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "exclude", ["net.*", [None]]),
    (MagnitudePruning, {"target_sparsity": 0.5}, "log_per_layer", ["yes", 1]),
    (MixedPrecision, {}, "precision", ["fp16", "bf16", 16, None]),
    (MixedPrecision, {}, "channels_last", ["true", 1]),
    (MixedPrecision, {}, "nonfinite", ["ignore", True]),
    (MixedPrecision, {}, "patience", [0, -1, 2.0]),
    (MixedPrecision, {}, "export_half", ["", 5]),
    (QuantizationAwareTraining, {}, "include", ["conv", [1]]),
    (QuantizationAwareTraining, {}, "exclude", ["fc"]),
    (QuantizationAwareTraining, {}, "start_step", [-1, 1.5]),
    (QuantizationAwareTraining, {"start_step": 10}, "freeze_observers_step", [5, 10, -1]),
    (QuantizationAwareTraining, {}, "freeze_bn_step", [-2, "late"]),
    (QuantizationAwareTraining, {}, "fold_bn", ["no", 0]),
    (QuantizationAwareTraining, {}, "export_path", ["model.pt", 7]),
    (QuantizationAwareTraining, {}, "log_ranges", ["off"]),
    (PostTrainingQuantization, {}, "export_path", [None, "model.bin"]),
    (PostTrainingQuantization, {"export_path": "m.onnx"}, "calibration_batches", [0, "all"]),
    (PostTrainingQuantization, {"export_path": "m.onnx"}, "include", ["conv"]),
    (PostTrainingQuantization, {"export_path": "m.onnx"}, "fold_bn", ["yes"]),
]


def constructor_cases():
    for cls, base, argument, values in BAD_CONSTRUCTOR_ARGUMENTS:
        for value in values:
            yield pytest.param(cls, base, argument, value, id=f"{cls.__name__}-{argument}-{value!r}")


def assert_names_argument_allowed_and_given(error, argument, value):
    message = str(error.value)
    assert f"`{argument}`" in message
    assert "must" in message  # the allowed values follow
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(("cls", "base", "argument", "value"), list(constructor_cases()))
def test_every_constructor_rejects_bad_values_by_name(cls, base, argument, value):
    with pytest.raises((ValueError, TypeError)) as error:
        cls(**(base | {argument: value}))
    assert_names_argument_allowed_and_given(error, argument, value)


BAD_FUNCTION_CALLS = [
    (sparsity_at, dict(step=0, target_sparsity=1.2), "target_sparsity", 1.2),
    (sparsity_at, dict(step=0, target_sparsity=0.5, schedule="log"), "schedule", "log"),
    (sparsity_at, dict(step=0, target_sparsity=0.5, start_step=4, end_step=2), "end_step", 2),
    (compute_masks, dict(weights={"w": torch.ones(4, 4)}, sparsity=1.5), "sparsity", 1.5),
    (compute_masks, dict(weights={"w": torch.ones(4, 4)}, sparsity=0.5, pattern="2/4"), "pattern", "2/4"),
    (compute_masks, dict(weights={"w": torch.ones(4, 4)}, sparsity=0.75, pattern="2:4"), "sparsity", 0.75),
    (compute_masks, dict(weights={"w": torch.ones(4, 4)}, sparsity=0.5, scope="net"), "scope", "net"),
    (apply_masks_, dict(params={"w": torch.ones(2)}, masks={"v": torch.ones(2, dtype=torch.bool)}), "masks", "v"),
    (calibrate_, dict(model=TinyNet(), batches=[torch.zeros(1, 1, 8, 8)], num_batches=0), "num_batches", 0),
    (calibrate_, dict(model=TinyNet(), batches=torch.zeros(2, 1, 8, 8)), "batches", "Tensor"),
    (export_onnx, dict(model=TinyNet(), path="m.onnx", example_input=[torch.zeros(1)]), "example_input", "list"),
    (
        export_onnx,
        dict(model=TinyNet(), path="m.onnx", example_input=torch.zeros(1), opset_version=9),
        "opset_version",
        9,
    ),
]


@pytest.mark.parametrize(
    ("function", "kwargs", "argument", "value"), BAD_FUNCTION_CALLS, ids=lambda x: getattr(x, "__name__", None)
)
def test_every_public_function_rejects_bad_values_by_name(function, kwargs, argument, value):
    with pytest.raises((ValueError, TypeError)) as error:
        function(**kwargs)
    assert_names_argument_allowed_and_given(error, argument, value)


YAML_CASES = [
    ("lightning_accel.MagnitudePruning", "target_sparsity: 1.5", "target_sparsity"),
    ("lightning_accel.MagnitudePruning", "target_sparsity: 0.5\n        pattern: '5:4'", "pattern"),
    ("lightning_accel.MagnitudePruning", "target_sparsity: 0.5\n        schedule: exponential", "schedule"),
    (
        "lightning_accel.MagnitudePruning",
        "target_sparsity: 0.5\n        start_step: 9\n        end_step: 3",
        "end_step",
    ),
    ("lightning_accel.MixedPrecision", "precision: fp16", "precision"),
    ("lightning_accel.MixedPrecision", "patience: 0", "patience"),
    (
        "lightning_accel.QuantizationAwareTraining",
        "start_step: 8\n        freeze_observers_step: 2",
        "freeze_observers_step",
    ),
    ("lightning_accel.QuantizationAwareTraining", "export_path: model.pt", "export_path"),
]


@pytest.mark.parametrize(("class_path", "init_args", "argument"), YAML_CASES, ids=[c[2] for c in YAML_CASES])
def test_bad_values_in_a_yaml_config_give_a_readable_error(
    tmp_path, monkeypatch, capsys, class_path, init_args, argument
):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: " + class_path + "\n      init_args:\n        " + init_args + "\n"
        "model:\n  class_path: examples.digits.DigitsClassifier\n"
        "data:\n  class_path: examples.digits.DigitsDataModule\n"
    )
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and argument in err
    assert "Traceback" not in err


def test_a_qat_checkpoint_from_another_model_is_refused(tmp_path):
    qat = QuantizationAwareTraining()
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[qat])
    trainer.fit(TinyModule(), datamodule=RandomImages())
    state = qat.state_dict()
    state["quantizers"] = {f"other.{k}": v for k, v in state["quantizers"].items()}
    fresh = QuantizationAwareTraining()
    fresh.setup(Trainer(**fast_trainer_kwargs()), TinyModule(), "fit")
    with pytest.raises(ValueError, match="belongs to another model"):
        fresh.load_state_dict(state)


# --- checkpoints and artifacts load safely ---------------------------------------------------------------------


def test_every_callback_state_and_the_half_export_load_with_weights_only(tmp_path):
    callbacks = [
        MixedPrecision("16-mixed", export_half=str(tmp_path / "half.pt")),
        MagnitudePruning(0.5, every_n_steps=2),
        QuantizationAwareTraining(),
    ]
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=callbacks)
    trainer.fit(TinyModule(), datamodule=RandomImages())
    trainer.save_checkpoint(tmp_path / "all.ckpt")
    checkpoint = torch.load(tmp_path / "all.ckpt", weights_only=True)
    for callback in callbacks:
        assert checkpoint["callbacks"][callback.state_key]
    assert "MixedPrecision" in checkpoint  # Lightning's plugin state: the GradScaler
    half = torch.load(tmp_path / "half.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in half.values())


# --- long runs ---------------------------------------------------------------------------------------------------


class StepClock(Callback):
    """Per-step wall time and the process's resident memory (current, from /proc) at every step."""

    def __init__(self):
        self.times, self.rss = [], []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
        with open("/proc/self/statm") as statm:
            self.rss.append(int(statm.read().split()[1]) * resource.getpagesize())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_long_run_with_masks_every_step_and_qat_does_not_grow(tmp_path):
    steps = 2000
    clock = StepClock()
    callbacks = [
        MagnitudePruning(0.9, end_step=1800, every_n_steps=1),
        QuantizationAwareTraining(start_step=0),
        clock,
    ]
    trainer = Trainer(**fast_trainer_kwargs(max_steps=steps, max_epochs=-1, limit_val_batches=0), callbacks=callbacks)
    trainer.fit(TinyModule(), datamodule=RandomImages(n=64))
    assert len(clock.times) == steps
    half = steps // 2
    first_peak, later_peak = max(clock.rss[100:half]), max(clock.rss[half:])
    assert later_peak <= 1.05 * first_peak
    first_time = sorted(clock.times[100:half])[half // 2 - 50]  # medians: robust to scheduling hiccups
    later_time = sorted(clock.times[half:])[half // 2]
    assert later_time <= 1.5 * first_time

"""Configuration a Lightning user expects: one selection convention, steps as fractions, callback sections on the
command line, one-line errors, plain and numpy values, and an honest "best" checkpoint."""

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_accel import (
    MagnitudePruning,
    MixedPrecision,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    build_cli,
)
from lightning_accel._core.files import probe_writable
from lightning_accel._core.modules import select_modules, select_weights
from lightning_accel._core.validation import resolve_step, validate_step
from lightning_accel.quantization import prepare_qat_
from tests.helpers import RandomImages, TinyModule, fast_trainer_kwargs, fit_tiny

ROOT = Path(__file__).resolve().parent.parent
ALL_WEIGHTS = {"net.conv.weight", "net.fc1.weight", "net.fc2.weight"}

# --- one selection convention ----------------------------------------------------------------------------------

SELECTION_CASES = [
    # (include, exclude, pruned weights, quantized modules): the same spelling means the same in both callbacks.
    (None, ["net.fc2"], {"net.conv.weight", "net.fc1.weight"}, {"net.conv", "net.fc1"}),
    (None, ["net.fc2.*"], {"net.conv.weight", "net.fc1.weight"}, {"net.conv", "net.fc1"}),
    (None, ["*fc2*"], {"net.conv.weight", "net.fc1.weight"}, {"net.conv", "net.fc1"}),
    (["net.fc*"], None, {"net.fc1.weight", "net.fc2.weight"}, {"net.fc1", "net.fc2"}),
    (["net"], ["net.conv"], {"net.fc1.weight", "net.fc2.weight"}, {"net.fc1", "net.fc2"}),
    (["net.fc1.weight"], None, {"net.fc1.weight"}, {"net.fc1"}),
    (None, None, ALL_WEIGHTS, {"net.conv", "net.fc1", "net.fc2"}),
]


@pytest.mark.parametrize(("include", "exclude", "pruned", "quantized"), SELECTION_CASES)
def test_a_pattern_means_the_same_in_pruning_and_in_qat(include, exclude, pruned, quantized):
    assert set(select_weights(TinyModule(), include, exclude)) == pruned
    assert set(prepare_qat_(TinyModule(), include, exclude)) == quantized


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_a_pattern_that_matches_nothing_is_an_error_listing_names(argument):
    with pytest.raises(ValueError, match=rf"`{argument}` pattern 'head' matches no module.*'net\.fc1'"):
        select_weights(TinyModule(), **{argument: ["head"]})
    with pytest.raises(ValueError, match=rf"`{argument}` pattern 'head' matches no module.*'net\.fc1'"):
        select_modules(TinyModule(), **{argument: ["head"]})


def test_an_explicit_parameter_pattern_reaches_attention_projections():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    chosen = select_weights(layer, include=["*.in_proj_weight"])
    assert set(chosen) == {"self_attn.in_proj_weight"}
    # By default every weight matrix the layer multiplies by, the Q/K/V projection (not a Linear) included.
    assert set(select_weights(layer)) == {
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    }


def test_tied_parameters_are_one_tensor_selected_under_any_name():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)
            self.body = nn.Linear(8, 8)
            self.embedding = nn.Embedding(20, 8)
            self.embedding.weight = self.head.weight

    model = TiedLM()
    assert set(select_weights(model)) == {"head.weight", "body.weight"}
    by_other_name = select_weights(model, include=["embedding.weight"])
    assert list(by_other_name.values()) == [model.head.weight]


def test_the_selection_is_logged_at_setup(caplog):
    with caplog.at_level("INFO"):
        fit_tiny([MagnitudePruning(0.5, exclude=["net.fc2"], every_n_steps=2), QuantizationAwareTraining()])
    text = caplog.text
    assert (
        "MagnitudePruning (fit): 2 selected: net.conv.weight, net.fc1.weight; "
        "left out by include/exclude: net.fc2.weight" in text
    )
    assert "QuantizationAwareTraining (fit): 3 selected" in text


# --- steps as fractions ----------------------------------------------------------------------------------------

STEP_CASES = [
    (0, 0),
    (7, 7),
    (np.int64(5), 5),
    (0.5, 0.5),
    (1.0, 1.0),
    (np.float32(0.25), 0.25),
]


@pytest.mark.parametrize(("given", "expected"), STEP_CASES)
def test_steps_accept_ints_fractions_and_numpy_scalars(given, expected):
    value = validate_step("start_step", given)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("given", [-1, 0.0, "10", True, None])
def test_bad_steps_name_the_argument_and_the_two_units(given):
    with pytest.raises(ValueError, match=r"`start_step` must be an optimizer step .* or a fraction"):
        validate_step("start_step", given)


@pytest.mark.parametrize(("given", "step_reading"), [(2.0, "`2`"), (220.0, "`220`"), (1.5, "`1`")])
def test_a_float_step_above_one_is_refused_with_both_readings(given, step_reading):
    # 2.0 could mean step 2 or 200% of the training: it is refused, never guessed.
    with pytest.raises(ValueError, match=r"`start_step` got the float .*must be in \(0, 1\]") as raised:
        validate_step("start_step", given)
    assert f"for an optimizer step write {step_reading}" in str(raised.value)
    assert "for a fraction write" in str(raised.value)


def test_an_unknown_total_with_a_fraction_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`end_step`=0.5 is a fraction .* number is unknown"):
        resolve_step("end_step", 0.5, float("inf"))
    assert resolve_step("end_step", 12, float("inf")) == 12


def test_fractional_steps_resolve_against_the_fit(tmp_path):
    # 64 images, batch 8: 8 steps per epoch, 16 steps in 2 epochs.
    qat = QuantizationAwareTraining(start_step=0.5, freeze_observers_step=0.75)
    pruning = MagnitudePruning(0.5, start_step=0.25, end_step=0.5, every_n_steps=1)
    fit_tiny([qat, pruning], TinyModule(), epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert qat.phase_at(7) == 0 and qat.phase_at(8) == 1 and qat.phase_at(12) == 2
    assert pruning.sparsity_at(3) == 0.0 and pruning.sparsity_at(8) == 0.5
    with open(next(tmp_path.rglob("metrics.csv"))) as metrics:
        rows = [r for r in csv.DictReader(metrics) if r.get("qat/phase_observing")]
    observing = [int(r["step"]) for r in rows if float(r["qat/phase_observing"]) == 1.0]
    assert observing and min(observing) == 8  # logged as 0/1 scalars that read without the source
    assert all(
        float(r["qat/phase_float"]) + float(r["qat/phase_observing"]) + float(r["qat/phase_frozen"]) == 1 for r in rows
    )


def test_fractional_steps_in_the_wrong_order_fail_before_training():
    qat = QuantizationAwareTraining(start_step=10, freeze_observers_step=0.25)  # step 4 of 16: before the start
    module = TinyModule()
    with pytest.raises(ValueError, match=r"`freeze_observers_step` \(0.25 = step 4\) must come after `start_step`"):
        fit_tiny([qat], module, epochs=2)


# --- values: numpy scalars, PathLike, strict booleans -----------------------------------------------------------


def test_numpy_scalars_and_pathlike_are_accepted_where_numbers_and_paths_are(tmp_path):
    pruning = MagnitudePruning(np.float64(0.5), every_n_steps=np.int32(3), start_step=np.int64(1))
    assert pruning.target_sparsity == 0.5 and pruning.every_n_steps == 3 and type(pruning.every_n_steps) is int
    qat = QuantizationAwareTraining(export_path=tmp_path / "m.onnx")
    assert qat.export_path == os.fspath(tmp_path / "m.onnx")
    assert PostTrainingQuantization(tmp_path / "p.onnx", calibration_batches=np.int16(2)).calibration_batches == 2
    assert MixedPrecision("bf16-mixed", export_half=tmp_path / "h.pt").export_half == os.fspath(tmp_path / "h.pt")


# --- the command line -----------------------------------------------------------------------------------------


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])


def test_callback_sections_take_options_by_name_on_the_command_line(in_root):
    cli = build_cli(
        [
            "--config",
            "examples/digits/accelerate.yaml",
            "--pruning.target_sparsity=0.5",
            "--qat.start_step=0.5",
            "--precision.precision=bf16-mixed",
        ],
        run=False,
    )
    by_type = {type(c): c for c in cli.trainer.callbacks}
    assert by_type[MagnitudePruning].target_sparsity == 0.5
    assert by_type[QuantizationAwareTraining].start_step == 0.5
    assert by_type[QuantizationAwareTraining].export_path == "artifacts/model.int8.onnx"  # from the YAML
    assert by_type[MixedPrecision].precision == "bf16-mixed"


def test_print_config_shows_the_sections(in_root, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", "examples/digits/accelerate.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert "pruning:\n  class_path: lightning_accel.MagnitudePruning" in printed
    assert "qat:\n  class_path: lightning_accel.QuantizationAwareTraining" in printed


ERROR_CASES = [
    ("typo", "pruning:\n  target_sparcity: 0.5\n", "unknown option 'target_sparcity'; did you mean 'target_sparsity'?"),
    (
        "typo in a callbacks list",
        "trainer:\n  callbacks:\n    - class_path: lightning_accel.MagnitudePruning\n"
        "      init_args:\n        target_sparcity: 0.5\n",
        "did you mean 'target_sparsity'?",
    ),
    (
        "string for a list",
        "pruning:\n  target_sparsity: 0.5\n  exclude: head.*\n",
        "expected a list such as ['head.*']",
    ),
    ("unquoted N:M", "pruning:\n  target_sparsity: 0.5\n  pattern: 2:4\n", "Quote it: pattern: '2:4'"),
    ("yes for a boolean", "precision:\n  channels_last: 'yes'\n", "`channels_last` must be true or false, got 'yes'"),
    ("out of range", "pruning:\n  target_sparsity: 1.5\n", "`target_sparsity` must be a number in [0, 1), got 1.5"),
    ("a float step above 1", "qat:\n  start_step: 2.0\n", "for an optimizer step write `2`"),
]


@pytest.mark.parametrize(("name", "yaml", "expected"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_configuration_errors_are_one_line(in_root, tmp_path, capsys, name, yaml, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", "--config", str(config)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


BEFORE_TRAINING_CASES = [
    # (name, extra command-line arguments, the key the message must name)
    ("N:M on the digits CNN", ["--pruning.target_sparsity", "0.5", "--pruning.pattern", "2:4"], "2:4"),
    (
        "a start step the fit never reaches",
        ["--qat.start_step", "1000", "--qat.freeze_bn_step", "null", "--qat.freeze_observers_step", "null"],
        "`start_step` 1000",
    ),
    (
        "an include that matches nothing",
        ["--pruning.target_sparsity", "0.5", "--pruning.include", "[encoder]"],
        "`include` pattern 'encoder'",
    ),
    (
        "an export without example_input_array",
        [
            "--model",
            "tests.helpers.TinyModule",
            "--data",
            "tests.helpers.RandomImages",
            "--ptq.export_path",
            "m.int8.onnx",
        ],
        "example_input_array",
    ),
    ("a precision that does not exist", ["--precision.precision", "bf16"], "did you mean 'bf16-mixed'?"),
    # Paths the operating system refuses although the permission bits allow them (root may "write" /proc).
    (
        "an unwritable QAT export",
        ["--qat.export_path", "/proc/model.int8.onnx"],
        "QuantizationAwareTraining: `export_path`",
    ),
    ("an unwritable half export", ["--precision.export_half", "/proc/model.bf16.pt"], "MixedPrecision: `export_half`"),
    (
        "an unwritable slim export",
        ["--pruning.target_sparsity", "0.3", "--pruning.pattern", "channels", "--pruning.export_path", "/proc/s.onnx"],
        "MagnitudePruning: `export_path`",
    ),
    ("an unwritable report folder", ["--report.directory", "/proc/report"], "AccelerationReport: `directory`"),
]


@pytest.mark.parametrize(("name", "extra", "named"), BEFORE_TRAINING_CASES, ids=[c[0] for c in BEFORE_TRAINING_CASES])
def test_mistakes_found_at_setup_or_fit_start_end_in_at_most_three_lines_before_training(
    in_root, tmp_path, capsys, name, extra, named
):
    args = ["fit", "--config", "examples/digits/baseline.yaml", f"--trainer.default_root_dir={tmp_path}", *extra]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    tail = err[err.index("error: ") :].strip().splitlines()
    assert len(tail) <= 3 and named in tail[0] and "lightning-accel fit --help" in tail[0], tail
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("version_*"))  # no training, no empty logs


def test_the_write_probe_writes_for_real_and_leaves_nothing_behind(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused = [blocker / "model.onnx", tmp_path]  # a folder below a file; a folder given as the file
    if Path("/proc").is_dir():
        refused.append(Path("/proc/model.int8.onnx"))  # os.access says yes to root; the write says no
    for path in refused:
        with pytest.raises(ValueError, match=r"^QuantizationAwareTraining: `export_path` .* cannot be written: "):
            probe_writable("QuantizationAwareTraining", "export_path", path)
    probe_writable("QuantizationAwareTraining", "export_path", tmp_path / "new" / "deeper" / "model.onnx")
    probe_writable("AccelerationReport", "directory", tmp_path / "report", directory=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "deeper", "new", "report"]


@pytest.mark.parametrize(
    ("key", "class_path", "hint"),
    [
        ("model", "examples.digits.DigitClassifier", "did you mean examples.digits.DigitsClassifier?"),
        ("data", "examples.digitz.DigitsDataModule", "did you mean examples.digits?"),
        ("trainer.callbacks+", "lightning_accel.MagnitudePrunin", "did you mean lightning_accel.MagnitudePruning?"),
        ("model", "no_such_package.Model", "no module 'no_such_package'"),
    ],
)
def test_a_misspelt_class_path_says_what_cannot_be_imported(in_root, capsys, key, class_path, hint):
    # It was "expected LightningModule, None, got NestedArg(key='class_path', val=...)".
    option = f"--{key}={class_path}" if key.endswith("+") else f"--{key}.class_path={class_path}"
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", option])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and f"cannot import {class_path}" in err[0] and hint in err[0], err


@pytest.mark.parametrize("subcommand", ["fit", "export"])
def test_a_missing_checkpoint_is_one_line_and_export_lists_the_ones_that_exist(in_root, tmp_path, capsys, subcommand):
    saved = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=3.ckpt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    args = [subcommand, "--config", "examples/digits/baseline.yaml", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--ckpt_path", "nope.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "`ckpt_path` 'nope.ckpt': no such file" in line
    assert (str(saved) in line) == (subcommand == "export")


def test_a_misspelt_section_gets_a_did_you_mean(in_root, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("prunning:\n  target_sparsity: 0.5\n")
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'prunning'; did you mean 'pruning'?" in err[0] and "lightning-accel fit --help" in err[0]


def test_fit_help_names_every_callback_option_and_the_per_section_help(in_root, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    compact = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for option in ("target_sparsity", "start_step", "export_half", "calibration_batches", "max_batches"):
        assert option in compact
    assert "lightning-accelfit--pruning.helpMagnitudePruning" in compact
    assert ":meth:`export`" not in compact  # our group headers are plain text (Lightning's own are not ours)


def test_a_boolean_word_on_the_command_line_is_refused(in_root, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", "--precision.channels_last", "on"])
    assert "`channels_last` must be true or false, got 'on'" in capsys.readouterr().err


class BrokenModel(TinyModule):
    def __init__(self, width: int = 4):
        super().__init__()
        raise ValueError(f"my own bug, width {width}")


def test_an_error_in_the_users_own_code_keeps_its_traceback(in_root, tmp_path):
    config = tmp_path / "user.yaml"
    config.write_text("model:\n  class_path: tests.test_configuration.BrokenModel\n")
    with pytest.raises(ValueError, match="my own bug, width 4") as info:
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", "--config", str(config)])
    frames = [entry.name for entry in info.traceback]
    assert "__init__" in frames  # the user's frame is there to read


# --- honest checkpoints and messages ---------------------------------------------------------------------------


class ImprovingLoss(TinyModule):
    """Validation loss that only gets worse, so that the "best" checkpoint is the first one."""

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.current_epoch))


def test_a_best_checkpoint_below_the_target_sparsity_is_warned_about(tmp_path):
    pruning = MagnitudePruning(0.8, end_step=20, every_n_steps=2)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="min")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=4, enable_checkpointing=True), callbacks=[pruning, best])
    with pytest.warns(UserWarning, match=r"best checkpoint by 'score' .* below the target 80.00%"):
        trainer.fit(ImprovingLoss(), datamodule=RandomImages())
    assert pruning.best_checkpoint_below_target == best.best_model_path


def test_test_after_fit_tests_the_final_weights_when_best_is_below_target(in_root, tmp_path, caplog):
    extra = tmp_path / "best.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        monitor: val/loss\n        mode: max\n"
    )
    with caplog.at_level("INFO"):
        build_cli(
            [
                "fit",
                "--config",
                "examples/digits/pruning.yaml",
                "--config",
                str(extra),
                "--trainer.max_epochs=3",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
            ]
        )
    assert "Testing the final weights" in caplog.text


def test_the_end_of_run_message_does_not_contradict_itself():
    with pytest.warns(UserWarning, match=r"ended after 8 optimizer steps \(the last one was step 7\).*only at step 8"):
        fit_tiny([MagnitudePruning(0.5, end_step=8, every_n_steps=2)], TinyModule(), epochs=1)


def test_frozen_weights_are_left_dense_unless_named(caplog):
    module = TinyModule()
    module.net.conv.weight.requires_grad_(False)  # e.g. a frozen pretrained stem
    assert set(select_weights(module)) == {"net.fc1.weight", "net.fc2.weight"}
    assert "net.conv.weight" in select_weights(module, include=["net.conv"])
    with caplog.at_level("INFO"):
        fit_tiny([MagnitudePruning(0.5, every_n_steps=2)], module)
    assert "left dense because frozen (requires_grad=False): net.conv.weight" in caplog.text
    assert not (module.net.conv.weight == 0).any()


def test_qat_names_what_it_leaves_in_float_and_why(caplog):
    class Encoder(TinyModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)

    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[QuantizationAwareTraining()])
    with caplog.at_level("INFO"):
        QuantizationAwareTraining().setup(trainer, Encoder(), "fit")
    assert "layer.linear1" in caplog.text and "layer.linear2" in caplog.text
    assert (
        "left in float, attention out_proj (nn.MultiheadAttention reads its weight in its own kernel): " in caplog.text
    )
    assert "layer.self_attn.out_proj" in caplog.text
    assert "attention Q/K/V projections (nn.MultiheadAttention runs them in its own kernel" in caplog.text

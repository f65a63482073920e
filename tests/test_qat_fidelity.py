"""What is evaluated is what is deployed: evaluation phase from the restored state, every call observed, the
transformer fast path, non-finite batches, any Trainer precision, failing before training, and the self-check."""

import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_accel import (
    MixedPrecision,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    build_cli,
    calibrate_,
    check_onnx,
    export_onnx,
)
from lightning_accel.quantization import activation_quantizers, to_deployable
from tests.helpers import EXAMPLE, RandomImages, TinyModule, fast_trainer_kwargs, fit_tiny, module_with_example
from tests.quant_models import snr_db

ROOT = Path(__file__).resolve().parent.parent


# --- evaluation scores the deployed model --------------------------------------------------------------------


def test_test_with_ckpt_path_in_a_fresh_trainer_scores_the_int8_model_when_start_step_is_past(tmp_path):
    qat = QuantizationAwareTraining(start_step=4, freeze_observers_step=12)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="qat")
    _, module = fit_tiny([qat, checkpoint], module_with_example(), epochs=2, enable_checkpointing=True)
    data = RandomImages()
    x, y = data.x, data.y
    with torch.no_grad():
        deployed_loss = F.cross_entropy(to_deployable(module)(x), y).item()
        module.eval()
        from lightning_accel.quantization import set_qat_phase

        set_qat_phase(module, fake_quant=False, observe=False)
        float_loss = F.cross_entropy(module(x), y).item()
    assert abs(deployed_loss - float_loss) > 1e-4  # the two models really differ

    tester = Trainer(
        **fast_trainer_kwargs(), callbacks=[QuantizationAwareTraining(start_step=4, freeze_observers_step=12)]
    )
    results = tester.test(module_with_example(), datamodule=RandomImages(), ckpt_path=tmp_path / "qat.ckpt")
    assert tester.global_step == 0  # Lightning does not restore the step here: the phase must not come from it
    assert results[0]["test_loss"] == pytest.approx(deployed_loss, abs=1e-5)


def test_test_without_quantizer_state_warns_that_it_scores_the_float_model():
    tester = Trainer(**fast_trainer_kwargs(), callbacks=[QuantizationAwareTraining(start_step=4)])
    with pytest.warns(UserWarning, match="scores the float model"):
        tester.test(module_with_example(), datamodule=RandomImages())


def test_lightning_accel_test_with_ckpt_path_scores_the_int8_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])
    common = ["--config", "examples/digits/qat.yaml", "--trainer.enable_progress_bar=false"]
    schedule = [
        "--qat.start_step=10",
        "--qat.freeze_bn_step=20",
        "--qat.freeze_observers_step=30",
        f"--qat.export_path={tmp_path / 'm.onnx'}",
    ]
    fit = build_cli(
        [
            "fit",
            *common,
            *schedule,
            "--trainer.max_epochs=2",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    images, labels = map(torch.cat, zip(*fit.datamodule.test_dataloader(), strict=True))
    from examples.digits import DigitsClassifier

    float_model = DigitsClassifier(channels=32).eval()
    float_model.load_state_dict(fit.model.state_dict())
    with torch.no_grad():
        deployed_loss = F.cross_entropy(to_deployable(fit.model)(images), labels).item()
        float_loss = F.cross_entropy(float_model(images), labels).item()
    assert abs(deployed_loss - float_loss) > 1e-3  # what the bug scored instead
    test = build_cli(
        ["test", *common, *schedule, f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert test.trainer.callback_metrics["test/loss"].item() == pytest.approx(deployed_loss, abs=1e-4)


# --- every call observed; fast paths; skipped modules ----------------------------------------------------------


class SharedLayerNet(nn.Module):
    """One Linear applied twice per forward, to inputs of very different scale (an unrolled recurrence)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.cell(10 * x))
        h = torch.tanh(self.cell(x + h))  # the last call sees a much narrower range than the first
        return self.head(h)


def test_a_module_called_twice_per_forward_observes_both_calls():
    model = SharedLayerNet()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    calibrate_(model, [(x,)], num_batches=1)
    quantizer = activation_quantizers(model)["cell.input_quant"]
    first_input = 10 * x
    assert quantizer.running_min == first_input.min() and quantizer.running_max == first_input.max()


class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_transformer_eval_runs_the_quantized_ffn_and_calibrates():
    torch.manual_seed(0)
    model = TransformerClassifier().eval()
    x = torch.randn(32, 6, 4, generator=torch.Generator().manual_seed(1))
    calibrate_(model, [(x,)], num_batches=1)  # the fast path would skip linear1/linear2: "saw no data"
    ffn = activation_quantizers(model)["encoder.layers.0.linear1.input_quant"]
    assert ffn.calibrated
    calls = []
    hook = model.encoder.layers[0].linear2.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert calls  # evaluation ran through the quantized linear2, not the fused kernel


def test_a_quantized_module_that_forward_skips_is_named():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused_branch = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match=r"\['unused_branch'\] did not run"):
        calibrate_(Skips(), [(torch.randn(2, 4),)], num_batches=1)


# --- non-finite batches ----------------------------------------------------------------------------------------


class NaNBatches(RandomImages):
    """Batches 2-4 of the training data are NaN."""

    def train_dataloader(self):
        x = self.x.clone()
        x[16:40] = float("nan")
        return DataLoader(torch.utils.data.TensorDataset(x, self.y), batch_size=self.batch_size)


class MLPModule(TinyModule):
    """No BatchNorm: a NaN batch would poison BatchNorm statistics with or without QAT."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = EXAMPLE


def test_non_finite_batches_never_enter_the_ranges_and_are_counted(tmp_path):
    qat = QuantizationAwareTraining(export_path=str(tmp_path / "m.onnx"), on_mismatch="raise")
    module = MLPModule()
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=1), callbacks=[MixedPrecision("16-mixed", nonfinite="warn", patience=10), qat]
    )
    with pytest.warns(UserWarning, match="non-finite activations"):
        trainer.fit(module, datamodule=NaNBatches())
    assert qat.skipped_ranges == 3
    assert all(
        torch.isfinite(q.running_min) and torch.isfinite(q.running_max) for q in activation_quantizers(module).values()
    )
    assert (tmp_path / "m.onnx").exists()
    assert qat.state_dict()["skipped_ranges"] == 3


def test_calibration_on_only_non_finite_batches_names_the_quantizers():
    bad = torch.full((4, 1, 8, 8), float("nan"))
    with pytest.raises(ValueError, match=r"NaN/inf activations at \['net.conv.input_quant'"):
        calibrate_(TinyModule(), [(bad,)], num_batches=1)


# --- any Trainer precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_quantizer_state_stays_float32_and_the_export_works_under_true_precision(tmp_path, precision):
    path = tmp_path / "m.onnx"
    _, module = fit_tiny([QuantizationAwareTraining(export_path=str(path))], module_with_example(), precision=precision)
    quantizer = activation_quantizers(module)["net.fc1.input_quant"]
    assert quantizer.scale.dtype == torch.float32 and quantizer.running_max.dtype == torch.float32
    assert module.net.fc1.weight_quant.scale.dtype == torch.float32
    assert path.exists()
    x = torch.randn(16, 1, 8, 8)
    check = check_onnx(to_deployable(module), path, [x])
    assert check.agreement >= 0.99


# --- fail before training, not after ---------------------------------------------------------------------------


def test_an_export_path_under_a_file_fails_at_setup(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    qat = QuantizationAwareTraining(export_path=str(blocker / "m.onnx"))
    module = module_with_example()
    with pytest.raises(ValueError, match="is a file, not a directory"):
        fit_tiny([qat], module)
    assert not any(p.grad is not None for p in module.parameters())  # no step was taken


def test_urls_are_rejected_clearly():
    with pytest.raises(ValueError, match="`export_path` must be a local file path"):
        QuantizationAwareTraining(export_path="s3://bucket/m.onnx")


def test_an_example_input_that_cannot_be_exported_fails_at_setup():
    module = TinyModule()
    module.example_input_array = torch.zeros(1, 3, 8, 8)  # wrong channel count: the export would fail at the end
    with pytest.raises(RuntimeError, match=r"fails on its example_input_array.*before training"):
        fit_tiny([QuantizationAwareTraining(export_path="unused.onnx")], module)


def test_a_fold_bn_mismatch_fails_on_the_first_forward_not_when_qat_starts():
    class Misordered(TinyModule):
        def forward(self, x):
            net = self.net
            h = net.bn(net.conv(x) * 2)  # registered conv-then-bn, but bn does not take the conv's output
            return net.fc2(F.relu(net.fc1(F.max_pool2d(F.relu(h), 2).flatten(1))))

    trainer = Trainer(**fast_trainer_kwargs(max_epochs=2), callbacks=[QuantizationAwareTraining(start_step=10)])
    with pytest.raises(RuntimeError, match=r"fold_bn: the BatchNorm 'net\.bn' does not directly follow"):
        trainer.fit(Misordered(), datamodule=RandomImages())
    assert trainer.global_step == 0


def test_a_start_step_the_fit_never_reaches_is_an_error_before_training(tmp_path):
    path = tmp_path / "m.onnx"
    qat = QuantizationAwareTraining(start_step=100, export_path=str(path))
    trainer = Trainer(**fast_trainer_kwargs(max_steps=5), callbacks=[qat])
    with pytest.raises(ValueError, match=r"`start_step` 100 \(step 100\) is never reached in this fit of 5"):
        trainer.fit(module_with_example(), datamodule=RandomImages())
    assert trainer.global_step == 0 and not path.exists()


class StopAfter(Callback):
    """Stops training after ``steps`` optimizer steps, as early stopping would."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.steps


def test_training_that_stops_early_before_qat_starts_warns_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    qat = QuantizationAwareTraining(start_step=10, export_path=str(path))
    with pytest.warns(UserWarning, match="before QAT's start_step 10.*nothing was written"):
        fit_tiny([qat, StopAfter(3)], module_with_example(), epochs=3)
    assert not path.exists()


@pytest.mark.parametrize(
    "make", [lambda p: QuantizationAwareTraining(export_path=p), lambda p: PostTrainingQuantization(p)]
)
def test_fast_dev_run_skips_the_export_with_a_warning(tmp_path, make):
    path = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match="fast_dev_run, so the int8 export"):
        fit_tiny([make(str(path))], module_with_example(), fast_dev_run=True)
    assert not path.exists()


class DictBatches(RandomImages):
    def _loader(self):
        pairs = [{"image": x, "label": y} for x, y in zip(self.x, self.y, strict=True)]
        return DataLoader(pairs, batch_size=self.batch_size)


class DictModule(TinyModule):
    def __init__(self):
        super().__init__()
        self.example_input_array = EXAMPLE

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["image"]), batch["label"]))


def test_ptq_on_dict_batches_takes_model_input_and_fails_on_the_first_batch_without_it(tmp_path):
    path = tmp_path / "m.onnx"
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[PostTrainingQuantization(str(path), model_input="image")])
    trainer.fit(DictModule(), datamodule=DictBatches())
    assert path.exists()
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[PostTrainingQuantization(str(tmp_path / "n.onnx"))])
    with pytest.raises(RuntimeError, match="Set `model_input` to the batch key"):
        trainer.fit(DictModule(), datamodule=DictBatches())
    assert trainer.global_step == 0


# --- the export checks itself ----------------------------------------------------------------------------------


class SignSwitch(nn.Module):
    """Python control flow on data: the tracer bakes in one branch, so the ONNX file is wrong for the other."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_export_check_reports_agreement_and_raises_on_mismatch_when_asked(tmp_path):
    model = SignSwitch().eval()
    positive, negative = torch.ones(8, 4), -torch.ones(8, 4) * torch.linspace(0.5, 2, 8)[:, None]
    path = export_onnx(model, tmp_path / "ok.onnx", positive)
    good = check_onnx(model, path, [positive])
    assert good.samples == 8 and good.agreement == 1.0 and good.snr_db > 60 and good.max_abs_diff < 1e-5
    bad = check_onnx(model, path, [negative])
    expected = model(negative)
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input": negative.numpy()})[0])
    assert bad.snr_db == pytest.approx(snr_db(expected, got), abs=1e-3) and not bad.passed()
    with pytest.warns(UserWarning, match="does not reproduce the PyTorch model"):
        export_onnx(model, tmp_path / "warned.onnx", positive, check_inputs=[negative])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="was left as it was"):
        export_onnx(model, path, positive, check_inputs=[negative], on_mismatch="raise")
    assert path.read_bytes() == before
    assert onnx.load(path) is not None


def test_weight_bits_are_validated_and_a_checkpoint_of_other_bits_is_refused():
    with pytest.raises(ValueError, match=r"`weight_bits` must be one of \[4, 7, 8\].*got 5"):
        QuantizationAwareTraining(weight_bits=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = fit_tiny([QuantizationAwareTraining(weight_bits=8)])
    state = next(c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining)).state_dict()
    with pytest.raises(ValueError, match="weight_bits=8"):
        QuantizationAwareTraining().load_state_dict(state)


def test_predict_under_bf16_autocast_scores_the_quantized_layers_in_float32():
    from lightning_accel.quantization import as_evaluated

    qat = QuantizationAwareTraining(start_step=0)
    trainer, module = fit_tiny([MixedPrecision("bf16-mixed"), qat], module_with_example())
    x = RandomImages().x
    predictions = torch.cat(trainer.predict(module, dataloaders=DataLoader(x, batch_size=16)))
    with torch.no_grad():
        deployed = as_evaluated(module)(x)
    assert predictions.dtype == torch.float32
    assert (predictions - deployed).abs().max() < 1e-4  # bf16 would differ by ~1e-2


@pytest.mark.parametrize("technique", ["pruning", "qat"])
def test_stochastic_weight_averaging_beside_pruning_or_qat_is_refused_at_setup(technique):
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from lightning_accel import MagnitudePruning

    callback = MagnitudePruning(target_sparsity=0.5) if technique == "pruning" else QuantizationAwareTraining()
    with pytest.raises(ValueError, match=r"StochasticWeightAveraging.*averages weights"):
        fit_tiny([callback, StochasticWeightAveraging(swa_lrs=0.01)], module_with_example())


def test_qat_from_random_weights_warns_that_it_fine_tunes():
    with pytest.warns(UserWarning, match=r"looks untrained\. QAT fine-tunes"):
        fit_tiny([QuantizationAwareTraining(start_step=0)], module_with_example())


def test_qat_that_starts_after_float_training_does_not_warn_about_random_weights(recwarn):
    fit_tiny([QuantizationAwareTraining(start_step=4)], module_with_example())
    assert not [w for w in recwarn.list if "looks untrained" in str(w.message)]

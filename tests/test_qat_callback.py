"""QuantizationAwareTraining and PostTrainingQuantization in a Trainer: phases, state, resume, DDP, composition."""

import csv

import numpy as np
import onnx
import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from onnx import numpy_helper

from lightning_accel import MagnitudePruning, MixedPrecision, PostTrainingQuantization, QuantizationAwareTraining
from lightning_accel.quantization import activation_quantizers, is_prepared
from tests.helpers import (
    CheckZerosAfterEveryStep,
    IdImages,
    IdRecordingModule,
    RandomImages,
    SaveRankState,
    TinyModule,
    assert_states_equal,
    fast_trainer_kwargs,
    fit_tiny,
    module_with_example,
)
from tests.quant_models import ResidualModule


def fit(callbacks, module=None, epochs=2, **kwargs):
    return fit_tiny(callbacks, module or module_with_example(), epochs, **kwargs)


class RecordPerStep(Callback):
    """Records, after each step, the first input quantizer's running max and the BN running mean."""

    def __init__(self):
        self.ranges, self.bn_means, self.quantizing = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        quantizer = activation_quantizers(pl_module)["net.conv.input_quant"]
        self.ranges[trainer.global_step] = quantizer.running_max.item()
        self.quantizing[trainer.global_step] = quantizer.fake_quant and quantizer.calibrated
        self.bn_means[trainer.global_step] = pl_module.net.bn.running_mean.clone()


def test_phases_float_then_observe_then_freeze():
    record = RecordPerStep()
    qat = QuantizationAwareTraining(start_step=4, freeze_observers_step=9, freeze_bn_step=12)
    fit([qat, record], epochs=2)
    assert not any(record.quantizing[s] for s in range(1, 5))  # float before start_step (step 4 is the first observed)
    assert all(record.quantizing[s] for s in range(6, 17))
    assert record.ranges[9] == record.ranges[16]  # frozen observers
    assert len({record.ranges[s] for s in range(5, 10)}) > 1  # ranges moved while observing
    assert torch.equal(record.bn_means[12], record.bn_means[16])  # frozen BatchNorm statistics
    assert not torch.equal(record.bn_means[5], record.bn_means[12])


def test_prepared_in_setup_before_optimizer_so_parameters_line_up():
    class OptimizerParams(Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            self.model_ids = {id(p) for p in pl_module.parameters()}
            self.prepared = is_prepared(pl_module)

    probe = OptimizerParams()
    fit([QuantizationAwareTraining(), probe], epochs=1)
    assert probe.prepared and probe.optimizer_ids == probe.model_ids


def test_keyword_multi_input_model_with_bn_and_residual_trains_and_exports(tmp_path):
    path = tmp_path / "residual.int8.onnx"
    _trainer, module = fit([QuantizationAwareTraining(export_path=str(path))], module=ResidualModule(), epochs=3)
    assert path.exists()
    x, mask = torch.randn(32, 1, 8, 8), torch.zeros(32, 4)
    with torch.no_grad():
        expected = module.eval()(x=x, mask=mask).argmax(1)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy(), "mask": mask.numpy()})[0]).argmax(1)
    assert (got == expected).float().mean() >= 0.99


def test_fit_twice_and_test_with_ckpt_path_restore_the_quantizers(tmp_path):
    qat = QuantizationAwareTraining()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="qat")
    trainer, module = fit([qat, checkpoint], epochs=1, enable_checkpointing=True)
    saved_scale = activation_quantizers(module)["net.fc1.input_quant"].scale.clone()
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=RandomImages())  # second fit on the same model; it overwrites qat.ckpt
    final_scale = activation_quantizers(module)["net.fc1.input_quant"].scale.clone()
    assert not torch.equal(final_scale, saved_scale)  # the second fit went on observing

    fresh_module = module_with_example()
    tester = Trainer(**fast_trainer_kwargs(), callbacks=[QuantizationAwareTraining()])
    tester.test(fresh_module, datamodule=RandomImages(), ckpt_path=tmp_path / "qat.ckpt")
    restored = activation_quantizers(fresh_module)["net.fc1.input_quant"]
    assert restored.scale == final_scale and restored.calibrated and restored.fake_quant


@pytest.mark.parametrize("resume_epoch", [1, 2])
def test_resume_mid_qat_gives_bit_identical_quantizers(tmp_path, resume_epoch):
    def qat():
        return QuantizationAwareTraining(start_step=4, freeze_observers_step=20)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    fit([qat(), checkpoints, SaveRankState(tmp_path / "a")], epochs=4, enable_checkpointing=True)
    fit([qat(), SaveRankState(tmp_path / "b")], epochs=4, ckpt_path=tmp_path / f"epoch={resume_epoch - 1}.ckpt")
    a = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    quantizers = [k for k in a if "/quantizers/" in k]
    assert quantizers and all(torch.equal(a[k], b[k]) for k in quantizers)
    assert_states_equal(
        {k: a[k] for k in a if k.startswith("model/")}, {k: b[k] for k in a if k.startswith("model/")}, atol=1e-6
    )


def test_checkpoint_state_is_weights_only_safe_and_weights_load_into_the_plain_model(tmp_path):
    qat = QuantizationAwareTraining()
    trainer, _ = fit([qat], epochs=1)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    checkpoint = torch.load(tmp_path / "full.ckpt", weights_only=True)
    assert "net.conv.input_quant" in checkpoint["callbacks"][qat.state_key]["quantizers"]
    TinyModule().load_state_dict(checkpoint["state_dict"], strict=True)


def test_ddp_ranks_share_quantization_parameters(tmp_path):
    qat = QuantizationAwareTraining()
    _, module = fit([qat, SaveRankState(tmp_path)], strategy="ddp_spawn", devices=2, epochs=1)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_states_equal(rank0, rank1)
    scales = [v for k, v in rank0.items() if k.endswith("input_quant/scale")]
    assert scales and all(s > 0 for s in scales)
    # As the README says: the launching process gets rank 0's weights back, not the prepared model.
    trained = {k.split("/", 1)[1]: v for k, v in rank0.items() if k.startswith("model/")}
    assert trained and all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())
    assert not is_prepared(module) and qat.state_dict()["quantizers"] == {}


def test_the_export_is_checked_on_at_least_1000_validation_samples(tmp_path, monkeypatch):
    import lightning_accel.export.onnx as export_module

    checks = []
    original = export_module.check_onnx
    monkeypatch.setattr(export_module, "check_onnx", lambda *a: checks.append(original(*a)) or checks[-1])
    module = module_with_example()
    qat = QuantizationAwareTraining(start_step=0, export_path=str(tmp_path / "m.onnx"), on_mismatch="raise")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1, limit_train_batches=4, limit_val_batches=0), callbacks=[qat])
    trainer.fit(module, datamodule=RandomImages(n=1200, batch_size=100))
    (check,) = checks
    assert check.samples == 1 + 1000  # the example input, then validation batches up to 1,000 samples
    assert check.agreement >= 0.99


class RankDifferentData(RandomImages):
    """Each DDP rank sees data of a different scale, so un-reduced ranges would differ between ranks."""

    def train_dataloader(self):
        rank = self.trainer.global_rank
        self.x = self.x * (1 + 3 * rank)
        return super().train_dataloader()


def test_ddp_ranges_are_reduced_over_ranks_not_taken_from_one(tmp_path):
    trainer = Trainer(
        **fast_trainer_kwargs(strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=1),
        callbacks=[QuantizationAwareTraining(), SaveRankState(tmp_path)],
        use_distributed_sampler=False,
    )
    data = RankDifferentData()
    trainer.fit(module_with_example(), datamodule=data)
    state = torch.load(tmp_path / "rank0.pt", weights_only=True)
    key = next(k for k in state if k.endswith("net.conv.input_quant/running_max"))
    # The first batch on rank 1 is 4x rank 0's: the shared maximum is rank 1's.
    assert state[key] == pytest.approx(4 * RandomImages().x[:8].max().item(), rel=1e-5)


@pytest.mark.parametrize("order", ["qat_first", "pruning_first"])
def test_pruned_weights_stay_zero_in_qat_and_in_the_int8_export(tmp_path, order):
    path = tmp_path / "pruned.int8.onnx"
    pruning = MagnitudePruning(0.75, end_step=6, every_n_steps=2)
    qat = QuantizationAwareTraining(export_path=str(path))
    check = CheckZerosAfterEveryStep(pruning)
    callbacks = [qat, pruning, check] if order == "qat_first" else [pruning, qat, check]
    fit(callbacks, epochs=2)
    assert check.violations == 0
    graph = onnx.load(path).graph
    fc1 = next(numpy_helper.to_array(i) for i in graph.initializer if i.dims == [16, 128])
    assert fc1.dtype == np.int8
    assert (fc1 == 0).mean() >= (~pruning.masks["net.fc1.weight"]).float().mean().item()


def test_qat_under_bf16_autocast_with_pruning(tmp_path):
    path = tmp_path / "bf16.int8.onnx"
    pruning = MagnitudePruning(0.5, end_step=4, every_n_steps=2)
    fit([MixedPrecision("bf16-mixed"), QuantizationAwareTraining(export_path=str(path)), pruning], epochs=1)
    fc1 = next(numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if i.dims == [16, 128])
    assert (fc1 == 0).mean() >= 0.5 * (16 * 128 - 1) / (16 * 128) - 0.05


def test_logs_phase_and_activation_scales(tmp_path):
    fit([QuantizationAwareTraining(start_step=1)], logger=CSVLogger(tmp_path), log_every_n_steps=1, epochs=1)
    with open(next(tmp_path.rglob("metrics.csv"))) as metrics:
        rows = list(csv.DictReader(metrics))
    phases = [float(r["qat/phase"]) for r in rows if r.get("qat/phase")]
    assert phases[0] == 0.0 and phases[-1] == 1.0
    assert any(r.get("qat/scale/net.conv.input_quant") for r in rows)


def test_post_training_quantization_exports_without_touching_the_trained_model(tmp_path):
    path = tmp_path / "ptq.int8.onnx"
    _trainer, module = fit([PostTrainingQuantization(str(path), calibration_batches=4)], epochs=1)
    assert path.exists() and not is_prepared(module)
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(path).graph.node)


@pytest.mark.parametrize(
    ("make", "argument", "error"),
    [
        (lambda: QuantizationAwareTraining(start_step=-1), "start_step", ValueError),
        (
            lambda: QuantizationAwareTraining(start_step=10, freeze_observers_step=10),
            "freeze_observers_step",
            ValueError,
        ),
        (lambda: QuantizationAwareTraining(freeze_observers_step=-3), "freeze_observers_step", ValueError),
        (lambda: QuantizationAwareTraining(freeze_bn_step=1.5), "freeze_bn_step", ValueError),
        (lambda: QuantizationAwareTraining(fold_bn="yes"), "fold_bn", TypeError),
        (lambda: QuantizationAwareTraining(export_path="model.pt"), "export_path", ValueError),
        (lambda: QuantizationAwareTraining(include="net.*"), "include", TypeError),
        (lambda: PostTrainingQuantization("m.onnx", calibration_batches=0), "calibration_batches", ValueError),
        (lambda: PostTrainingQuantization(None), "export_path", ValueError),
    ],
)
def test_bad_arguments_name_the_argument(make, argument, error):
    with pytest.raises(error, match=f"`{argument}`"):
        make()


def test_no_selected_module_and_missing_example_input_fail_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder\.\*' matches no module"):
        fit([QuantizationAwareTraining(include=["encoder.*"])])
    with pytest.raises(ValueError, match="example_input_array"):
        fit([QuantizationAwareTraining(export_path=str(tmp_path / "m.onnx"))], module=TinyModule())


class _TokenModule(TinyModule):
    """A Hugging Face-style module: dict batches with input_ids, attention_mask and labels; forward takes two."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Identity()  # TinyModule's CNN is not used here
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 4)
        self.example_input_array = {
            "input_ids": torch.zeros(1, 6, dtype=torch.long),
            "attention_mask": torch.ones(1, 6),
        }

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(hidden.mean(1))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.training_step(batch, batch_idx)


class _TokenData(RandomImages):
    def _loader(self):
        generator = torch.Generator().manual_seed(0)
        rows = [
            {
                "input_ids": torch.randint(0, 16, (6,), generator=generator),
                "attention_mask": torch.ones(6),
                "labels": torch.randint(0, 4, (), generator=generator),
            }
            for _ in range(32)
        ]
        return torch.utils.data.DataLoader(rows, batch_size=8)


@pytest.mark.parametrize("model_input", [None, ["input_ids", "attention_mask"]])
def test_dict_batches_with_labels_pass_the_keys_the_forward_takes(tmp_path, model_input):
    path = tmp_path / "tokens.int8.onnx"
    ptq = PostTrainingQuantization(str(path), calibration_batches=2, model_input=model_input, on_mismatch="raise")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=[ptq])
    trainer.fit(_TokenModule(), datamodule=_TokenData())
    assert path.exists()


def test_model_input_keys_are_validated():
    with pytest.raises(TypeError, match=r"a list of dict keys.*got \[1, 2\]"):
        PostTrainingQuantization("m.onnx", model_input=[1, 2])


def test_qat_scores_the_int8_model_when_it_starts_and_at_the_end(tmp_path):
    qat = QuantizationAwareTraining(start_step=0.5)
    fit_tiny([qat], module_with_example(), epochs=2)
    assert qat.int8_at_start["metric"] == qat.int8_at_end["metric"] == "accuracy"
    assert 0.0 <= qat.int8_at_start["value"] <= 1.0 and 0.0 <= qat.int8_at_end["value"] <= 1.0
    assert qat.state_dict()["int8_at_start"] == qat.int8_at_start  # a resumed fit keeps the original start


def test_qat_that_ends_below_its_start_warns(monkeypatch):
    from lightning_accel.quantization import progress

    scores = iter([0.90, 0.50])  # PTQ of the starting weights, then the QAT model at the end
    monkeypatch.setattr(progress.QualityProbe, "score", lambda self, model: next(scores))
    qat = QuantizationAwareTraining(start_step=0.5)
    with pytest.warns(UserWarning, match=r"ended worse than it started: int8 accuracy: 0.9000 at QAT start"):
        fit_tiny([qat], module_with_example(), epochs=2)
    assert qat.int8_at_end["value"] == 0.5


def _training_ids(directory, callbacks, num_workers, **trainer_kwargs) -> list[str]:
    directory.mkdir()
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1, **trainer_kwargs), callbacks=callbacks)
    trainer.fit(IdRecordingModule(str(directory)), datamodule=IdImages(num_workers=num_workers))
    return [path.read_text() for path in sorted(directory.glob("ids*.txt"))]


@pytest.mark.parametrize("ddp", [False, True], ids=["single", "ddp_spawn"])
def test_qat_start_never_moves_the_data_the_fit_trains_on(tmp_path, ddp):
    # The start-of-QAT probe runs mid-epoch (step 1); it must not touch the training loader's iterator, which
    # persistent workers share between every `iter()` of the loader (rank 0 alone would then skip batches).
    # One worker per rank under ddp_spawn: each worker costs seconds to start and stop there, and one shows it.
    kwargs = dict(strategy="ddp_spawn", devices=2, num_workers=1) if ddp else dict(num_workers=2)
    plain = _training_ids(tmp_path / "plain", [], **kwargs)
    with_qat = _training_ids(tmp_path / "qat", [QuantizationAwareTraining(start_step=1)], **kwargs)
    assert len(plain) == (2 if ddp else 1) and all(plain)
    assert with_qat == plain


def test_int8_settings_are_validated_once_and_saved_whole_in_the_state():
    from lightning_accel.quantization.settings import Int8Settings

    with pytest.raises(ValueError, match="weight_bits"):
        Int8Settings(weight_bits=4)
    with pytest.raises(TypeError, match="include"):
        Int8Settings(include="net.fc1")
    qat = QuantizationAwareTraining(include=["net.fc*"], weight_bits=8, activations="dynamic")
    state = qat.state_dict()["settings"]
    assert state == {
        "include": ["net.fc*"],
        "exclude": None,
        "fold_bn": True,
        "weight_bits": 8,
        "outputs": "graph",
        "activations": "dynamic",
        "embeddings": "float",
    }
    assert Int8Settings.from_state(state) == qat.settings
    other = QuantizationAwareTraining(include=["net.fc*"], weight_bits=7, activations="dynamic")
    assert other.settings.differences(qat.settings) == ["weight_bits=8"]


def test_a_state_from_an_earlier_pre_release_is_refused_in_one_line():
    qat = QuantizationAwareTraining()
    old = {"version": 2, "quantizers": {}, "weight_bits": 7}  # before the settings were saved whole
    with pytest.raises(ValueError, match=r"format version 2, written by an earlier pre-release.*reads version 3"):
        qat.load_state_dict(old)

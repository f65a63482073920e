"""Portability of the int8 export: what ONNX Runtime computes on x86 without VNNI, emulated bit for bit.

The machine running the suite may have VNNI or AMX, whose int8 dot products never saturate; users' AVX2 machines
saturate pairs of products to int16. These tests emulate that kernel (tests/int8_emulation.py), so they hold on
every CPU, and they pass or fail the same way on every machine.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lightning_accel import calibrate_, export_onnx
from lightning_accel.quantization import quantized_modules, to_deployable
from tests.helpers import TinyNet
from tests.int8_emulation import INT16_MAX, emulated, integer_weight, worst_pair_sum
from tests.quant_models import ResidualNet, WideCNN, snr_db

MODELS = {"TinyNet": TinyNet, "WideCNN": WideCNN, "ResidualNet": ResidualNet}
SAMPLES = 1024


def calibrated_model(make, weight_bits=7, seed=0):
    torch.manual_seed(seed)
    model = make()
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(32, 1, 8, 8, generator=generator),) for _ in range(4)]
    return calibrate_(model, batches, num_batches=4, weight_bits=weight_bits).eval()


def inputs(count=SAMPLES, seed=1):
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def onnx_integer_weights(path):
    graph = onnx.load(path).graph
    return [numpy_helper.to_array(i) for i in graph.initializer if numpy_helper.to_array(i).dtype == np.int8]


@pytest.mark.parametrize("name", list(MODELS))
def test_default_export_can_never_saturate_the_avx2_kernel(tmp_path, name):
    model = calibrated_model(MODELS[name])
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    weights = onnx_integer_weights(path)
    deploy = to_deployable(model)
    # The file holds exactly the integers the PyTorch model computes with, all within 7 bits.
    expected = sorted((integer_weight(m).numpy() for m in quantized_modules(deploy).values()), key=np.size)
    assert [w.tolist() for w in sorted(weights, key=np.size)] == [e.tolist() for e in expected]
    assert max(int(np.abs(w).max()) for w in weights) <= 63
    # No uint8 input can push a pair of products out of int16 with these weights...
    assert all(worst_pair_sum(torch.tensor(w.reshape(w.shape[0], -1), dtype=torch.int32)) <= INT16_MAX for w in weights)
    # ...and forming every pair sum on real calibrated activations confirms it.
    with emulated(deploy, force_pairs=True) as kernel:
        deploy(inputs(64))
    assert kernel.saturated and kernel.total == 0


def test_full_range_export_saturates_and_disagrees_on_avx2(tmp_path):
    model = calibrated_model(ResidualNet, weight_bits=8)
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    assert max(int(np.abs(w).max()) for w in onnx_integer_weights(path)) == 127
    deploy = to_deployable(model)
    x = inputs()
    with torch.no_grad():
        reference = model(x)
    with emulated(deploy) as kernel:
        avx2 = deploy(x)
    assert kernel.total > 0  # the failure users saw on AVX2 EPYCs: sums clip
    assert (avx2.argmax(1) == reference.argmax(1)).float().mean() < 0.99
    with emulated(deploy, saturate=False):  # the same file on VNNI/AMX/ARM (int32 accumulation) is fine
        vnni = deploy(x)
    assert (vnni.argmax(1) == reference.argmax(1)).float().mean() >= 0.995


@pytest.mark.parametrize("name", list(MODELS))
def test_default_export_agrees_with_fake_quant_on_every_cpu(tmp_path, name):
    """>= 99.5% argmax agreement and >= 35 dB over 1,024 seeded inputs, by the AVX2 emulation and in ORT here."""
    model = calibrated_model(MODELS[name])
    x = inputs()
    with torch.no_grad():
        fake_quant = model(x)
    deploy = to_deployable(model)
    with emulated(deploy) as kernel:
        avx2 = deploy(x)
    assert kernel.total == 0
    assert (avx2.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.995
    assert snr_db(fake_quant, avx2) >= 35
    # Modelling the runtime's int32 bias makes nearly every output element identical, not just the argmax
    # (without it: 82% of WideCNN's elements).
    assert (avx2 == fake_quant).float().mean() >= 0.999

    import onnxruntime as ort

    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runtime = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert (runtime.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.995
    assert snr_db(fake_quant, runtime) >= 35


def test_export_stores_the_bias_as_int32_on_the_input_times_weight_scale(tmp_path):
    model = calibrated_model(WideCNN)
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    biases = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if "bias_int32" in i.name}
    assert len(biases) == 3 and all(b.dtype == np.int32 for b in biases.values())
    deploy = to_deployable(model)
    fc = deploy.fc
    expected = torch.round(fc.bias / (fc.input_quant.scale * fc.weight_quant.scale)).to(torch.int32)
    assert biases["/fc/Gemm_bias_int32"].tolist() == expected.tolist()

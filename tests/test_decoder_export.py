"""A decoder exported with its KV cache: ORT generates PyTorch's greedy tokens, float and int4, Llama and GPT-2."""

from __future__ import annotations

import onnx
import pytest
import torch

from lightning_accel.export.check import ort_session
from lightning_accel.export.decoder import export_decoder_onnx, generation_speed, ort_greedy, torch_greedy
from lightning_accel.quantization.weight_only import quantize_weights
from tests.lm_models import tiny_gpt2, tiny_llama, token_batches


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2-conv1d"])
@pytest.mark.parametrize("int4", [False, True], ids=["fp32", "int4"])
def test_the_exported_decoder_generates_pytorchs_greedy_tokens_with_its_cache(tmp_path, build, int4):
    torch.manual_seed(0)
    model = build()
    if int4:
        model = quantize_weights(model, method="gptq", calibration=token_batches(2), model_input=None)
    prompt = token_batches(1, batch=3)[0][:, :6]
    path, check = export_decoder_onnx(model, tmp_path / "decoder.onnx", prompt=prompt, steps=6, on_mismatch="raise")
    assert check.tokens_equal and check.min_snr_db > 60, check
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "past.0.key"]
    assert [o.name for o in graph.output][:2] == ["logits", "present.0.key"]
    assert ("MatMulNBits" in [n.op_type for n in graph.node]) == int4
    # One graph, both phases, any batch: a batch of 1 with another prompt length also agrees.
    session = ort_session(path)
    single = token_batches(1, batch=1, seed=5)[0][:, :4]
    torch_tokens, _ = torch_greedy(model, single, 4)
    ort_tokens, _, seconds = ort_greedy(session, model.config, single, 4)
    assert torch.equal(torch_tokens, ort_tokens) and len(seconds) == 5
    speed = generation_speed(session, model.config, single, steps=3, repeats=1)
    assert speed.prefill_ms > 0 and speed.decode_tokens_per_s > 0


def test_a_decoder_that_does_not_reproduce_its_model_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    import lightning_accel.export.decoder as decoder

    model = tiny_llama()
    monkeypatch.setattr(decoder, "MIN_DECODER_SNR_DB", 1e9)  # no file can reach it
    with pytest.raises(RuntimeError, match="was not written"):
        export_decoder_onnx(model, tmp_path / "decoder.onnx", on_mismatch="raise")
    assert not (tmp_path / "decoder.onnx").exists()
    with pytest.raises(ValueError, match="on_mismatch"):
        export_decoder_onnx(model, tmp_path / "decoder.onnx", on_mismatch="maybe")

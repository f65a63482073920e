"""Int4 QAT (weight-only groups): the trained weights are the deployed integers; LoRA on a quantized base."""

from __future__ import annotations

import pytest
import torch

from lightning_accel.quantization.groupwise_qat import (
    group_qat_layers,
    group_qat_to_deployable,
    prepare_group_qat_,
    strip_group_qat,
)
from lightning_accel.quantization.weight_only import WeightOnlySettings, export_weight_only_onnx
from tests.lm_models import Logits, lm_trainer, tiny_gpt2, tiny_llama, token_batches


def _loss(model, batch):
    logits = model(batch)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _train(model, batches, lr, parameters=None):
    optimizer = torch.optim.AdamW(parameters or model.parameters(), lr=lr)
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2-conv1d"])
def test_prepared_layers_keep_their_parameters_and_the_deployable_copy_computes_what_is_evaluated(tmp_path, build):
    torch.manual_seed(0)
    model = Logits(build())
    parameters = dict(model.named_parameters())
    keys = set(model.state_dict())
    prepared = prepare_group_qat_(model, WeightOnlySettings(bits=4, group_size=32))
    assert prepared and set(group_qat_layers(model)) == set(prepared)
    assert all(p is parameters[n] for n, p in model.named_parameters()) and set(model.state_dict()) == keys
    batch = token_batches(1)[0]
    _loss(model, batch).backward()  # the straight-through gradient reaches every prepared weight
    assert all(module.weight.grad is not None and module.weight.grad.abs().sum() > 0 for module in prepared.values())
    model.eval()
    deployable = group_qat_to_deployable(model)
    with torch.no_grad():
        torch.testing.assert_close(deployable(batch), model(batch), rtol=0, atol=1e-6)
        assert not torch.allclose(strip_group_qat(model)(batch), model(batch))  # the rounding is really applied
    _, check = export_weight_only_onnx(deployable, tmp_path / "qat.int4.onnx", batch, check_inputs=token_batches(2))
    assert check.snr_db > 80, check


def test_qat_recovers_part_of_what_round_to_nearest_int4_lost():
    torch.manual_seed(0)
    model = Logits(tiny_llama())
    batches = token_batches(4, batch=8, seed=3)
    _train(model, batches * 3, lr=3e-3)  # a little float training, so the model is not at chance
    model.eval()
    with torch.no_grad():
        float_loss = sum(_loss(model, b) for b in batches).item()
    prepare_group_qat_(model, WeightOnlySettings(bits=4, group_size=32))
    with torch.no_grad():
        ptq_loss = sum(_loss(model, b) for b in batches).item()
    model.train()
    _train(model, batches * 2, lr=1e-3)
    model.eval()
    with torch.no_grad():
        qat_loss = sum(_loss(group_qat_to_deployable(model), b) for b in batches).item()
    assert ptq_loss > float_loss  # int4 costs something here
    assert qat_loss < ptq_loss - 0.5 * (ptq_loss - float_loss), (float_loss, ptq_loss, qat_loss)


def test_lora_adapters_train_float_on_an_int4_base_and_the_merged_export_is_what_is_evaluated(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    prepared = prepare_group_qat_(peft_model, WeightOnlySettings(bits=4, group_size=32))
    assert not [name for name in prepared if "lora_" in name]  # adapters stay float
    assert any(name.endswith("q_proj.base_layer") for name in prepared)
    model = Logits(peft_model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _train(model, token_batches(3, seed=4), lr=1e-2, parameters=trainable)
    merged = Logits(peft_model.merge_and_unload()).eval()
    assert group_qat_layers(merged)  # merging keeps the base layers prepared: the merged weights are rounded
    deployable = group_qat_to_deployable(merged)
    batch = token_batches(1, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(deployable(batch), merged(batch), rtol=0, atol=1e-6)
    _, check = export_weight_only_onnx(deployable, tmp_path / "lora.int4.onnx", batch)
    assert check.snr_db > 80, check


def test_qat_int4_with_distillation_in_a_trainer_exports_what_validate_scores(tmp_path):
    from lightning_accel import Distillation, QuantizationAwareTraining
    from lightning_accel._core.stage import built_deployment
    from tests.lm_models import TinyCausalLM

    model = TinyCausalLM("llama")
    qat = QuantizationAwareTraining(weight_bits=4, group_size=32, start_step=1, export_path="lm.int4.onnx")
    distillation = Distillation(weight=1.0, temperature=2.0)
    trainer = lm_trainer(tmp_path, [qat, distillation], 4, limit_val_batches=1)
    trainer.fit(model)
    teacher = distillation._teacher if hasattr(distillation, "_teacher") else None
    if teacher is not None:  # the teacher is the float model: no rounded layer in it
        assert not group_qat_layers(teacher)
    artifact = built_deployment(trainer).artifacts["int4 ONNX"]
    assert artifact.path == tmp_path / "lm.int4.onnx" and artifact.check.snr_db > 80, artifact.check
    scored = trainer.validate(model, verbose=False)[0]["val_loss"]
    deployable = group_qat_to_deployable(model).eval()
    batch = next(iter(model.val_dataloader()))["input_ids"]
    with torch.no_grad():
        expected = _loss(deployable, batch).item()
    assert abs(scored - expected) < 1e-5  # validate scores the deployed integers
    state = qat.state_dict()
    assert state["quantized"] is True and state["weight_only"]["bits"] == 4


def test_qat_int4_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    from lightning_accel import QuantizationAwareTraining
    from tests.lm_models import TinyCausalLM

    def callbacks():
        return [QuantizationAwareTraining(weight_bits=4, start_step=1)]

    # Two batches per epoch, so the checkpoint falls on an epoch boundary (a plain DataLoader restarts its epoch).
    whole = TinyCausalLM("gpt2")
    lm_trainer(tmp_path / "a", callbacks(), 4, limit_train_batches=2).fit(whole)
    first = TinyCausalLM("gpt2")
    trainer = lm_trainer(tmp_path / "b", callbacks(), 2, limit_train_batches=2)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=True)  # plain values only
    assert any("QuantizationAwareTraining" in key for key in checkpoint["callbacks"])
    resumed = TinyCausalLM("gpt2")
    lm_trainer(tmp_path / "c", callbacks(), 4, limit_train_batches=2).fit(resumed, ckpt_path=tmp_path / "half.ckpt")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_qat_int4_options_are_checked_and_a_checkpoint_of_other_groups_is_refused():
    from lightning_accel import QuantizationAwareTraining

    with pytest.raises(ValueError, match="group_size"):
        QuantizationAwareTraining(weight_bits=4, group_size=100)
    qat = QuantizationAwareTraining(weight_bits=4, group_size=64)
    other = QuantizationAwareTraining(weight_bits=4, group_size=32).state_dict()
    with pytest.raises(ValueError, match="group_size=32"):
        qat.load_state_dict(other)
    with pytest.raises(ValueError, match="int8 quantizers"):
        qat.load_state_dict(QuantizationAwareTraining().state_dict())


def test_qat_8da4w_trains_with_rounded_activations_and_exports_them_at_accuracy_level_4(tmp_path):
    import onnx

    from lightning_accel import QuantizationAwareTraining
    from lightning_accel._core.stage import built_deployment
    from tests.lm_models import TinyCausalLM

    model = TinyCausalLM("gpt2")
    qat = QuantizationAwareTraining(weight_bits=4, activations="dynamic", start_step=1, export_path="lm.onnx")
    trainer = lm_trainer(tmp_path, [qat], 3, limit_val_batches=1)
    trainer.fit(model)
    artifact = built_deployment(trainer).artifacts["int4 ONNX"]
    levels = {
        attribute.i
        for node in onnx.load(str(artifact.path)).graph.node
        if node.op_type == "MatMulNBits"
        for attribute in node.attribute
        if attribute.name == "accuracy_level"
    }
    assert levels == {4} and artifact.check.agreement >= 0.99, artifact.check
    # The prepared layers round their inputs per token and group, as the deployable copy does.
    name, layer = next(iter(group_qat_layers(model).items()))
    x = torch.randn(2, 16, 64) * torch.linspace(0.1, 10, 64)
    deployed = group_qat_to_deployable(model).get_submodule(name)
    with torch.no_grad():
        trained = layer(x)
        torch.testing.assert_close(trained, deployed(x), rtol=0, atol=1e-5)
        layer._group_settings = (*layer._group_settings[:3], "float")
        assert (layer(x) - trained).abs().max() > 1e-3  # rounding the activations really changed the output


def test_qat_int4_scores_perplexity_when_the_rounding_starts_and_at_the_end(tmp_path):
    import math

    from lightning_accel import QuantizationAwareTraining
    from lightning_accel._core.stage import built_deployment
    from lightning_accel.quantization.weight_only import quantize_weights
    from tests.lm_models import TinyCausalLM

    model = TinyCausalLM("llama")
    qat = QuantizationAwareTraining(weight_bits=4, start_step=2, export_path="lm.onnx")
    trainer = lm_trainer(tmp_path, [qat], 4, limit_val_batches=1)
    start_model = {}  # round to nearest of the float weights at the step the rounding starts
    from lightning import Callback

    class Remember(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not start_model:
                start_model["rtn"] = quantize_weights(strip_group_qat(pl_module).net, bits=4, group_size=32)

    trainer.callbacks.insert(0, Remember())
    trainer.fit(model)
    driver = qat.weight_only
    assert driver.at_start["metric"] == "perplexity" and driver.at_end["metric"] == "perplexity"
    batches = [batch["input_ids"] for batch, _ in zip(model.val_dataloader(), range(8), strict=False)]
    with torch.no_grad():  # round to nearest of the weights at step 2, over the probe's 8 validation batches
        losses = [_loss(start_model["rtn"], batch).item() * batch[:, 1:].numel() for batch in batches]
    expected = math.exp(sum(losses) / sum(batch[:, 1:].numel() for batch in batches))
    assert driver.at_start["value"] == pytest.approx(expected, rel=1e-5)
    deployed = group_qat_to_deployable(model).eval()
    with torch.no_grad():  # the end score is the deployable copy of the trained weights, on the same batches
        losses = [_loss(deployed, batch).item() * batch[:, 1:].numel() for batch in batches]
    expected = math.exp(sum(losses) / sum(batch[:, 1:].numel() for batch in batches))
    assert driver.at_end["value"] == pytest.approx(expected, rel=1e-5) != driver.at_start["value"]
    notes = built_deployment(trainer).notes
    assert any("int4 perplexity (next token, validation batches)" in note for note in notes), notes
    assert qat.state_dict()["at_start"] == driver.at_start

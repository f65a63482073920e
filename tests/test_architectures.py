"""Models as users build them: layers created in configure_model are pruned and quantized like any other."""

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_accel import MagnitudePruning, QuantizationAwareTraining
from lightning_accel.quantization import quantized_modules
from tests.helpers import EXAMPLE, SaveRankState, TinyModule, assert_states_equal, fit_tiny


class LazyCNN(TinyModule):
    """Builds every layer in configure_model (idempotently, as Lightning asks), none in __init__."""

    def __init__(self):
        super().__init__()
        del self.net
        self.net = None
        self.example_input_array = EXAMPLE

    def configure_model(self):
        if self.net is not None:
            return
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 16),
            nn.ReLU(),
            nn.Linear(16, 4),
        )

    def forward(self, x):
        return self.net(x)


def callbacks():
    return [MagnitudePruning(0.5, end_step=10, every_n_steps=2), QuantizationAwareTraining(start_step=4)]


def test_layers_built_in_configure_model_are_pruned_and_quantized():
    prune, qat = callbacks()
    _, module = fit_tiny([prune, qat], LazyCNN(), epochs=2)
    assert set(prune.masks) == {"net.0.weight", "net.5.weight", "net.7.weight"}
    assert set(quantized_modules(module)) == {"net.0", "net.5", "net.7"}
    weights = [module.net[i].weight for i in (0, 5, 7)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.5) < 1e-3


def test_configure_model_layers_resume_bit_identically(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    fit_tiny([*callbacks(), checkpoints, SaveRankState(tmp_path / "a")], LazyCNN(), epochs=3, enable_checkpointing=True)
    fit_tiny([*callbacks(), SaveRankState(tmp_path / "b")], LazyCNN(), epochs=3, ckpt_path=tmp_path / "epoch=0.ckpt")
    a = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    ours = ("callback/MagnitudePruning", "callback/QuantizationAwareTraining")
    callback_state = {k: v for k, v in a.items() if k.startswith(ours)}
    assert any("/masks/" in k for k in callback_state) and any("/quantizers/" in k for k in callback_state)
    assert_states_equal(callback_state, {k: b[k] for k in callback_state})
    assert_states_equal(
        {k: a[k] for k in a if k.startswith("model/")}, {k: b[k] for k in a if k.startswith("model/")}, atol=1e-6
    )


class TwoOptimizers(TinyModule):
    """Manual optimization with two optimizers (a GAN-like pair): every batch calls optimizer.step() twice."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        for optimizer in (first, second):
            loss = torch.nn.functional.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        features = list(self.net.conv.parameters()) + list(self.net.bn.parameters())
        head = list(self.net.fc1.parameters()) + list(self.net.fc2.parameters())
        return torch.optim.SGD(features, lr=0.01), torch.optim.SGD(head, lr=0.01)


class RecordSchedule(Callback):
    def __init__(self, pruning, qat):
        self.pruning, self.qat, self.sparsity, self.observing = pruning, qat, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        index = trainer.current_epoch * 8 + batch_idx
        self.sparsity[index] = self.pruning.masks and float(
            sum(int((~m).sum()) for m in self.pruning.masks.values())
            / sum(m.numel() for m in self.pruning.masks.values())
        )
        self.observing[index] = pl_module.net.fc1.input_quant.observe


def test_several_optimizers_schedules_count_training_steps_not_optimizer_calls():
    pruning = MagnitudePruning(0.5, schedule="one_shot", start_step=0.5, every_n_steps=1)
    qat = QuantizationAwareTraining(start_step=0.75)
    record = RecordSchedule(pruning, qat)
    trainer, _ = fit_tiny([pruning, qat, record], TwoOptimizers(), epochs=2)  # 16 batches, 32 optimizer calls
    assert trainer.global_step == 32
    assert record.sparsity[7] == 0.0 and abs(record.sparsity[8] - 0.5) < 0.01  # half-way through the batches
    assert not record.observing[11] and record.observing[12]  # 3/4 of the batches


def test_transformer_blocks_keep_float_linear_outputs_by_default_and_ort_still_runs_int8_kernels(tmp_path):
    import onnx
    import onnxruntime as ort

    from lightning_accel import calibrate_, export_onnx
    from tests.slim_models import TransformerClassifier

    def prepared(outputs):
        torch.manual_seed(0)
        model = TransformerClassifier().eval()
        batches = [torch.randn(4, 5, 16) for _ in range(2)]
        return calibrate_(model, batches, model_input=lambda batch: batch, outputs=outputs)

    auto, every, graph = prepared("auto"), prepared("all"), prepared("graph")
    inside = ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "encoder.layers.1.linear2"]
    modules = dict(auto.named_modules())
    assert all(modules[name].output_quant is None for name in inside)
    assert modules["embed"].output_quant is not None and modules["head"].output_quant is not None
    assert all(dict(every.named_modules())[name].output_quant is not None for name in inside)
    # From the traced graph, without knowing the module types: the same float outputs inside the blocks (ReLU,
    # residual adds and attention consume them), the head's output quantized (it is the model's output), and the
    # embedding's float too (attention and a residual add consume it).
    traced = dict(graph.named_modules())
    assert all(traced[name].output_quant is None for name in inside)
    assert traced["head"].output_quant is not None and traced["embed"].output_quant is None
    assert "add" in traced["encoder.layers.0.linear2"].float_output_reason

    path = export_onnx(auto, tmp_path / "auto.onnx", torch.zeros(1, 5, 16), on_mismatch="raise")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # the four feed-forward Linears (and the embedding) still run as int8 kernels with a float output
    assert ops.count("MatMulIntegerToFloat") >= 4, ops


def test_outputs_setting_is_validated_and_a_checkpoint_of_another_setting_is_refused():
    from lightning_accel import QuantizationAwareTraining

    with pytest.raises(ValueError, match=r"`outputs` must be one of \['graph', 'auto', 'all'\].*'some'"):
        QuantizationAwareTraining(outputs="some")
    callback = QuantizationAwareTraining()
    settings = {**callback.settings.as_state(), "outputs": "all"}  # trained with every output quantized
    state = {"version": 3, "quantizers": {"x": {}}, "settings": settings}
    with pytest.raises(ValueError, match=r"prepared with outputs='all', which this callback sets otherwise"):
        callback.load_state_dict(state)


# --- Hugging Face models, built from small configs with random weights ------------------------------------------


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return BertModel(config).eval()


def _token_batch(vocab=100, batch=4, length=16):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_hf_bert_layers_get_float_outputs_from_the_traced_graph_not_from_their_types(tmp_path):
    from lightning_accel import calibrate_, export_onnx
    from lightning_accel.quantization import as_evaluated
    from lightning_accel.quantization.coverage import left_in_float

    batch = _token_batch()
    graph = calibrate_(_tiny_bert(), [batch], model_input=lambda b: b)
    layers = dict(graph.named_modules())
    for name in ("query", "key", "value"):
        assert layers[f"encoder.layer.0.attention.self.{name}"].output_quant is None
    assert "gelu" in layers["encoder.layer.0.intermediate.dense"].float_output_reason
    assert "add" in layers["encoder.layer.1.output.dense"].float_output_reason
    assert "encoder.layer.0.intermediate.dense (consumed by gelu)" in left_in_float(graph)
    # The type rule knew only torch's own blocks: every BertLayer output was quantized before softmax and GELU.
    typed = calibrate_(_tiny_bert(), [batch], model_input=lambda b: b, outputs="auto")
    assert dict(typed.named_modules())["encoder.layer.0.intermediate.dense"].output_quant is not None
    reference = _tiny_bert()(**batch).last_hidden_state
    with torch.no_grad():
        errors = {
            name: (as_evaluated(model)(**batch).last_hidden_state - reference).pow(2).mean().item()
            for name, model in (("graph", graph), ("auto", typed))
        }
    assert errors["graph"] < errors["auto"]
    example = {k: v[:1] for k, v in batch.items()}
    export_onnx(graph, tmp_path / "bert.int8.onnx", example, check_inputs=[batch], on_mismatch="raise")


def test_gpt2_conv1d_layers_are_pruned_and_quantized_by_default():
    from transformers import GPT2Config, GPT2Model

    from lightning_accel._core.modules import default_weight_names, select_weights, unpruned_weight_holders
    from lightning_accel.quantization import prepare_qat_
    from lightning_accel.quantization.coverage import selection_summary

    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    model = GPT2Model(config)
    # A Conv1D computes x @ W + b with W stored in x out: recognised from what it computes, so pruning takes it...
    expected = {f"h.0.{layer}.weight" for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert expected <= default_weight_names(model) and expected <= set(select_weights(model))
    assert "c_attn" not in unpruned_weight_holders(model, default_weight_names(model))
    # ...and so does int8 quantization, under its own parameter names and layout.
    selected = prepare_qat_(model, exclude=["h.0.mlp.c_proj"])
    assert {f"{layer}.weight" for layer in selected} == expected - {"h.0.mlp.c_proj.weight"}
    assert model.h[0].attn.c_attn.weight.shape == (32, 96)  # stored in x out, as before
    summary = selection_summary(model)
    assert summary.startswith("3 selected") and "left out by include/exclude: h.0.mlp.c_proj" in summary
    assert "other weight-holding" not in summary


@pytest.mark.parametrize("quantized", [False, True])
def test_token_models_export_with_a_dynamic_sequence_axis_and_run_at_two_lengths_in_ort(tmp_path, quantized):
    import onnxruntime as ort

    from lightning_accel import calibrate_, export_onnx
    from lightning_accel.quantization import as_evaluated

    model = _tiny_bert()
    if quantized:
        calibrate_(model, [_token_batch(length=16)], model_input=lambda b: b)
    # on_mismatch="raise": the check once failed on a correct fp32 file (it compared with the copy the tracer ran)
    example = {k: v[:1] for k, v in _token_batch(length=16).items()}
    path = export_onnx(model, tmp_path / "bert.onnx", example, on_mismatch="raise")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    for length in (16, 24):  # ORT refused every length but the example's before
        batch = _token_batch(batch=3, length=length)
        names = {i.name for i in session.get_inputs()}
        (hidden, *_) = session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})
        with torch.no_grad():
            expected = as_evaluated(model)(**batch).last_hidden_state
        assert hidden.shape == (3, length, 32)
        assert torch.allclose(torch.from_numpy(hidden), expected, atol=1e-3 if quantized else 1e-4)


def test_dynamic_axes_can_be_named_and_bad_names_are_refused(tmp_path):
    from lightning_accel import export_onnx

    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"`dynamic_axes` names \['inputs'\].*\['input', 'output'\]"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 4), dynamic_axes={"inputs": {0: "n"}})
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 4), dynamic_axes={"input": {0: "n"}})
    import onnxruntime as ort

    assert ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape == ["n", 4]


class _QuietModule(TinyModule):
    """TinyModule without ``self.log`` in its steps (Lightning's logging does not trace under torch.compile)."""

    def __init__(self):
        super().__init__()
        from tests.helpers import EXAMPLE

        self.example_input_array = EXAMPLE

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        return None


def test_a_compiled_module_is_pruned_quantized_and_exported(tmp_path):
    """``trainer.fit(torch.compile(model))``: selection on the original module, masks and fake quantization in the
    compiled training, exports and checks from the uncompiled module (copies had run the original's forward)."""
    from lightning import Trainer
    from torch._dynamo.utils import counters

    from lightning_accel import MagnitudePruning, QuantizationAwareTraining, tensor_sparsity
    from tests.helpers import RandomImages, fast_trainer_kwargs

    module = _QuietModule()
    pruning = MagnitudePruning(0.5, end_step=4, every_n_steps=2)
    path = tmp_path / "compiled.int8.onnx"
    qat = QuantizationAwareTraining(start_step=2, export_path=str(path), on_mismatch="raise")
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=1), callbacks=[pruning, qat])
    torch._dynamo.reset()
    counters.clear()
    trainer.fit(torch.compile(module), datamodule=RandomImages())
    # Setup's traces run eagerly: compiled under a tracing mode they broke the graph and made dynamo skip the
    # model's forward for the whole fit ("Reconstruction of FakeIdVariable").
    assert not counters["unimplemented"] and not counters["graph_break"], dict(counters["unimplemented"])
    assert counters["frames"]["total"] <= 8  # was 24: each module compiled on its own once the forward was skipped
    parameters = dict(module.named_parameters())
    assert tensor_sparsity({name: parameters[name] for name in pruning.masks}) == pytest.approx(0.5, abs=1e-3)
    assert path.exists() and all(q.calibrated for q in qat._quantizers.values())


def _slim_half(model, example):
    """Find and check the groups, zero half of each, slim: returns the masked model, the slim one and the groups."""
    from lightning_accel import find_channel_groups
    from lightning_accel.pruning import group_masks
    from lightning_accel.pruning.slim import removable_groups, slim_checked

    groups = removable_groups(model, example, find_channel_groups(model, example))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in group_masks(parameters, groups, 0.5).items():
            parameters[name].mul_(mask)
    return model, slim_checked(model, example, groups), groups  # raises if the slim model computed something else


def test_bert_heads_and_ffn_units_are_removed_and_the_slim_model_computes_the_masked_one():
    """Heads are found from the traced forward (query/key/value viewed as (batch, tokens, -1, head_dim)); slimming
    them as plain channels broke heads before (cosine 0.880 on MiniLM)."""
    example = {k: v[:1] for k, v in _token_batch().items()}
    model, small, groups = _slim_half(_tiny_bert(), example)
    heads = {g.owner: g for g in groups.groups if g.kind == "heads"}
    assert set(heads) == {f"encoder.layer.{i}.attention" for i in (0, 1)}
    assert {m.module.rsplit(".", 1)[-1] for m in heads["encoder.layer.0.attention"].members} == {
        "query",
        "key",
        "value",
        "dense",
    }
    attention = small.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (2, 16, 16)
    assert small.encoder.layer[0].attention.output.dense.in_features == 16
    assert small.encoder.layer[0].intermediate.dense.out_features == 32
    batch = _token_batch()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        torch.testing.assert_close(small(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def test_gpt2_fused_c_attn_heads_and_conv1d_ffn_units_are_removed_and_slim_exactly(tmp_path):
    """GPT-2's `pattern="channels"` crashed ("unsupported operand type(s) for +: 'int' and 'NoneType'"); its Conv1D
    layers are traced as the Linears they compute, and one head is a slice of each third of the fused c_attn."""
    import onnxruntime as ort
    from transformers import GPT2Config, GPT2Model

    from lightning_accel import export_onnx

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    example = {"input_ids": torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))}
    model, small, groups = _slim_half(gpt2, example)
    heads = next(g for g in groups.groups if g.kind == "heads" and g.owner == "h.0.attn")
    query, key, value = (m for m in heads.members if m.module == "h.0.attn.c_attn")
    assert [int(m.indices.min()) for m in (query, key, value)] == [0, 32, 64]  # one slice of each third
    assert {g.root for g in groups.groups if g.kind == "channels"} == {"h.0.mlp.c_fc", "h.1.mlp.c_fc"}
    attention = small.h[0].attn
    assert (attention.num_heads, attention.split_size, tuple(attention.c_attn.weight.shape)) == (2, 16, (32, 48))
    assert (small.h[0].mlp.c_fc.nf, small.h[0].mlp.c_proj.nx) == (64, 64)
    with torch.no_grad():
        expected = model(**example).last_hidden_state
        torch.testing.assert_close(small(**example).last_hidden_state, expected, atol=1e-5, rtol=1e-4)
    path = export_onnx(small, tmp_path / "gpt2.slim.onnx", example, on_mismatch="raise")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got, *_) = session.run(None, {"input_ids": example["input_ids"].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-3)


def test_multihead_attention_heads_are_removed_and_the_slim_layer_exports(tmp_path):
    from lightning_accel import HeadPrunedMultiheadAttention, export_onnx
    from tests.slim_models import TransformerClassifier

    torch.manual_seed(0)
    example = torch.randn(2, 6, 16)
    model, small, groups = _slim_half(TransformerClassifier(heads=4).eval(), example)
    assert {g.owner for g in groups.groups if g.kind == "heads"} == {f"encoder.layers.{i}.self_attn" for i in (0, 1)}
    attention = small.encoder.layers[0].self_attn
    assert isinstance(attention, HeadPrunedMultiheadAttention) and attention.num_heads == 2
    assert tuple(attention.in_proj_weight.shape) == (24, 16) and attention.out_proj.in_features == 8
    small.train()  # the training-mode path too (torch's layers take their fused kernel only in eval)
    with torch.no_grad():
        torch.testing.assert_close(small(example), model(example), atol=1e-5, rtol=1e-4)
    export_onnx(small.eval(), tmp_path / "mha.slim.onnx", example[:1], on_mismatch="raise")


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_channels=1,
    )
    return ViTModel(config).eval(), {"pixel_values": torch.randn(1, 1, 16, 16)}


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=64)).eval()
    return model, {"input_ids": torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("build", [_hf_vit, _distilbert], ids=["hf-vit", "distilbert"])
def test_hf_vit_and_distilbert_heads_and_ffn_units_slim_exactly(build):
    torch.manual_seed(0)
    model, example = build()
    before = sum(p.numel() for p in model.parameters())
    model, small, groups = _slim_half(model, example)
    assert [g.channels for g in groups.groups if g.kind == "heads"] == [4]
    assert any(g.kind == "channels" for g in groups.groups)
    assert sum(p.numel() for p in small.parameters()) < before


def test_t5_self_attention_keeps_its_heads_for_its_position_bias_and_cross_attention_heads_go():
    """T5 (encoder-decoder, tied embeddings, relative attention): `pattern="channels"` crashed at setup ("The size of
    tensor a (2) must match the size of tensor b (4)"); its groups are found and slim exactly."""
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    t5 = T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).eval()
    example = {
        "input_ids": torch.ones(1, 8, dtype=torch.long),
        "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long),
    }
    model, small, groups = _slim_half(t5, example)
    assert [g.owner for g in groups.groups if g.kind == "heads"] == ["decoder.block.0.layer.1.EncDecAttention"]
    reason = groups.left_dense[", ".join(f"encoder.block.0.layer.0.SelfAttention.{p}" for p in "qkvo")]
    assert "does not compute the same without its heads" in reason  # relative_attention_bias has one per head
    assert small.decoder.block[0].layer[1].EncDecAttention.n_heads == 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_multi_block_t5_with_an_attention_mask_loses_cross_attention_heads():
    """Two decoder blocks share one cross-attention bias sized by the first block's head count, so neither block's
    heads could go alone and every group stayed dense, silently; with a padded mask as every real batch has."""
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4)
    t5 = T5Model(config).eval()
    example = {
        "input_ids": torch.randint(1, 64, (1, 8), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]),
        "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long),
    }
    _, small, groups = _slim_half(t5, example)  # slim_checked: the slim model computes the masked one
    cross = [f"decoder.block.{i}.layer.1.EncDecAttention" for i in (0, 1)]
    assert [g.owner for g in groups.groups if g.kind == "heads"] == cross
    assert [small.get_submodule(name).n_heads for name in cross] == [2, 2]
    assert small.get_submodule(cross[1]).q.out_features == 8


def test_channel_pruning_says_plainly_before_training_when_it_cannot_group_a_model(monkeypatch):
    from lightning_accel import find_channel_groups

    lookup = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"Sequential has none \(its weight-holding layers are \['Embedding'\]"):
        find_channel_groups(lookup, torch.zeros(1, 8, dtype=torch.long))
    import torch_pruning

    def failing(*args, **kwargs):  # what torch-pruning raised on GPT-2's concatenations
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", failing)
    with pytest.raises(ValueError, match=r"the trace failed \(TypeError: unsupported operand.*pattern='unstructured'"):
        find_channel_groups(_tiny_bert(), {k: v[:1] for k, v in _token_batch().items()})


class TinyGAN(TinyModule):
    """Generator and discriminator in one module, manual optimization; the forward and the example: the generator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        del self.net
        self.generator = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.example_input_array = torch.zeros(1, 16)

    def forward(self, noise):
        return self.generator(noise)

    def training_step(self, batch, batch_idx):
        real = batch[0].flatten(1)[:, :8]  # RandomImages' pixels stand in for 8-feature samples
        generator_opt, discriminator_opt = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 16))
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        discriminator_opt.zero_grad()
        self.manual_backward(d_loss)
        discriminator_opt.step()
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        generator_opt.zero_grad()
        self.manual_backward(g_loss)
        generator_opt.step()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), 1e-3),
            torch.optim.Adam(self.discriminator.parameters(), 1e-3),
        )


def test_a_gan_quantizes_both_networks_and_exports_the_generator_its_example_drives(tmp_path):
    import onnxruntime as ort

    qat = QuantizationAwareTraining(export_path=tmp_path / "generator.int8.onnx")
    _, module = fit_tiny([qat], TinyGAN())  # the setup dry run failed: the example never runs the discriminator
    for name in ("generator.0", "generator.2", "discriminator.0", "discriminator.2"):
        layer = module.get_submodule(name)
        assert layer.input_quant.calibrated, name  # trained in training_step, so both networks have ranges
    session = ort.InferenceSession(str(tmp_path / "generator.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 16] and session.get_outputs()[0].shape == ["batch", 8]

"""Attention heads removed in training (pattern="channels"), Taylor importance, and the slim + int8 files."""

from __future__ import annotations

import onnx
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import MagnitudePruning, QuantizationAwareTraining, find_channel_groups
from lightning_accel.pruning import group_masks
from lightning_accel.pruning.importance import TaylorImportance
from tests.helpers import (
    RandomImages,
    SaveRankState,
    TokenClassifier,
    fast_trainer_kwargs,
    fit_tiny,
    module_with_example,
)
from tests.slim_models import MLP


def test_taylor_importance_ranks_by_weight_times_gradient_not_by_weight_size():
    torch.manual_seed(0)
    model = MLP()
    groups = find_channel_groups(model, torch.randn(2, 16))
    group = groups.groups[0]
    parameters = dict(model.named_parameters())
    producer = parameters[f"{group.root}.weight"]
    with torch.no_grad():
        producer[0].mul_(100.0)  # channel 0: the largest weights by far
    gradients = {name: torch.ones_like(p) for name, p in parameters.items()}
    gradients[f"{group.root}.weight"][0].zero_()  # ... and no effect on the loss
    gradients[f"{group.root}.bias"][0] = 0.0
    consumer = next(m for m in group.members if m.role == "in")
    gradients[f"{consumer.module}.weight"][:, 0] = 0.0
    importance = TaylorImportance(groups)
    assert importance.take() is None  # no step yet: the callback ranks by magnitude then
    importance.accumulate(parameters, gradients)
    importance.accumulate(parameters, {n: g * float("inf") for n, g in gradients.items()})  # an overflowing step
    assert importance.steps == 1
    scores = importance.take()
    assert scores[0][0] == 0.0 and importance.steps == 0
    taylor = group_masks(parameters, groups, 0.25, scores=scores)
    magnitude = group_masks(parameters, groups, 0.25)
    bias = f"{group.root}.bias"  # the producer's bias: only this group masks it
    assert not taylor[bias][0] and magnitude[bias][0]


def test_taylor_importance_is_validated():
    with pytest.raises(ValueError, match=r"must be one of \['magnitude', 'taylor', 'wanda'\] or None, got 'fisher'"):
        MagnitudePruning(0.5, pattern="channels", importance="fisher")
    with pytest.raises(ValueError, match="needs pattern='channels', got 'unstructured'"):
        MagnitudePruning(0.5, importance="taylor")


def _pruning(**kwargs):
    return MagnitudePruning(0.5, pattern="channels", start_step=2, end_step=6, every_n_steps=2, **kwargs)


def test_resume_restores_taylor_scores_and_masks_bit_for_bit(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    (tmp_path / "a").mkdir()
    fit_tiny(
        [_pruning(importance="taylor"), checkpoints, SaveRankState(tmp_path / "a")],
        module_with_example(),
        epochs=2,
        enable_checkpointing=True,
    )
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("MagnitudePruning"))
    assert saved["importance_scores"]["steps"] > 0 and all(
        s.dtype == torch.float64 for s in saved["importance_scores"]["scores"]
    )
    (tmp_path / "b").mkdir()
    trainer = Trainer(
        **fast_trainer_kwargs(max_epochs=2), callbacks=[_pruning(importance="taylor"), SaveRankState(tmp_path / "b")]
    )
    trainer.fit(module_with_example(), datamodule=RandomImages(), ckpt_path=tmp_path / "epoch=0.ckpt")
    a, b = (torch.load(tmp_path / run / "rank0.pt", weights_only=True) for run in ("a", "b"))
    masks = [k for k in a if "/masks/" in k]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_a_bert_classifier_loses_half_its_heads_and_ffn_units_and_exports_slim_and_int8(tmp_path, importance):
    slim_path, int8_path = tmp_path / "bert.slim.onnx", tmp_path / "bert.slim.int8.onnx"
    pruning = _pruning(importance=importance, export_path=str(slim_path))
    qat = QuantizationAwareTraining(
        start_step=6, activations="dynamic", export_path=str(int8_path), on_mismatch="raise"
    )
    trainer = Trainer(**fast_trainer_kwargs(max_epochs=2), callbacks=[pruning, qat])
    module = TokenClassifier(heads=4)
    trainer.fit(module)
    heads = [g for g in pruning.channel_groups.groups if g.kind == "heads"]
    assert [g.owner for g in heads] == ["bert.bert.encoder.layer.0.attention"] and heads[0].channels == 4
    assert "1 attention head groups (4 heads" in pruning._selection_summary
    query = pruning.masks["bert.bert.encoder.layer.0.attention.self.query.weight"]
    assert int(query.all(dim=1).sum()) == 8  # 2 of 4 heads (of 4 rows each) kept
    for path in (slim_path, int8_path):
        shapes = _weight_shapes(onnx.load(str(path)).graph)
        assert (8, 16) in shapes or (16, 8) in shapes, (path.name, shapes)  # Q/K/V with 2 heads, out with 8 columns
    assert any(node.op_type == "MatMulInteger" for node in onnx.load(str(int8_path)).graph.node)


def _weight_shapes(graph) -> set[tuple[int, ...]]:
    """The shapes of a graph's initializers and constant tensors."""
    shapes = {tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            shapes |= {tuple(a.t.dims) for a in node.attribute if a.name == "value"}
    return shapes


def test_the_slim_check_of_a_dynamic_int8_model_checks_the_slicing_on_its_float_weights(monkeypatch):
    """Dynamic activations round chaotically (a slimmed MiniLM: 32.7 dB between two correct models), so the
    quantized comparison uses the export check's threshold; a wrong slice must still fail, on the float weights."""
    import importlib

    from lightning_accel.quantization import prepare_qat_

    slim_module = importlib.import_module("lightning_accel.deploy.compose")  # slimming a fake-quantized model

    module = TokenClassifier(heads=4)
    example = module.example_input_array
    groups = find_channel_groups(module, example)
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, mask in group_masks(parameters, groups, 0.5).items():
            parameters[name].mul_(mask)
    prepare_qat_(module, activations="dynamic")
    module(**example)  # the weight quantizers observe once
    small = slim_module.slim_evaluated(module, example, groups)
    assert small.bert.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    original = slim_module.slim

    def wrong_slim(model, example_input, groups=None):
        broken = original(model, example_input, groups)
        with torch.no_grad():
            value = broken.bert.bert.encoder.layer[0].attention.self.value
            value.weight[0] += torch.randn(16)  # random: a LayerNorm output sums to 0, a constant shift is invisible
        return broken

    monkeypatch.setattr(slim_module, "slim", wrong_slim)
    with pytest.raises(RuntimeError, match=r"The slim model \(its float weights\) does not compute"):
        slim_module.slim_evaluated(module, example, groups)


class _GroupedQueryAttention(torch.nn.Module):
    """Four query heads sharing two key/value heads, repeated as Hugging Face's ``repeat_kv`` does."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.head_dim)
        self.k = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.v = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.o = torch.nn.Linear(heads * self.head_dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        batch, kv, tokens, width = x.shape
        repeats = self.heads // kv
        return x[:, :, None].expand(batch, kv, repeats, tokens, width).reshape(batch, kv * repeats, tokens, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._repeat(self._split(self.k(x))), self._repeat(self._split(self.v(x)))
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.o(context.transpose(1, 2).reshape(*x.shape[:2], -1))


def test_grouped_query_attention_heads_are_not_removable_and_the_trace_says_why():
    from lightning_accel._core.graph import run_example
    from lightning_accel.pruning.heads import trace_attention

    model = _GroupedQueryAttention()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    attentions, reasons = trace_attention(model, torch.randn(1, 5, 16), layers, run_example)
    assert attentions == []  # a key/value head serves two query heads: no head can go alone
    assert "grouped-query attention" in reasons["k"] and set(reasons) == {"q", "k", "v"}

"""Per-layer sensitivity and the int8 quality budget: the fragile layer is found first and kept float."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from lightning import LightningModule
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_accel import PostTrainingQuantization
from lightning_accel._core.stage import built_deployment
from lightning_accel.quantization.budget import quantize_within_budget
from lightning_accel.quantization.budget_int4 import BudgetData, weight_only_within_budget
from lightning_accel.quantization.prepare import quantized_modules
from lightning_accel.quantization.sensitivity import int8_sensitivity
from tests.helpers import fast_trainer_kwargs


@functools.cache
def _digits(train: bool) -> TensorDataset:
    digits = load_digits()
    split = slice(0, 1400) if train else slice(1400, None)
    x = torch.tensor(digits.data[split], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(digits.target[split]))


class FragileMLP(LightningModule):
    """A digits MLP whose middle layer is fragile in int8: a dead input column with huge weights in every row.

    The column multiplies an input that is always zero (a unit whose ReLU never opens), so the float model does not
    see it; but it sets every row's int8 scale, and rounds the row's real weights to zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 32)
        self.fragile = nn.Linear(32, 32)
        self.last = nn.Linear(32, 10)
        self.example_input_array = torch.zeros(1, 64)
        self.lr = 1e-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.fragile(torch.relu(self.first(x)))))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(_digits(True), batch_size=100, shuffle=False)

    def val_dataloader(self):
        return DataLoader(_digits(False), batch_size=100)

    @torch.no_grad()
    def make_fragile(self) -> FragileMLP:
        self.first.weight[0] = 0.0
        self.first.bias[0] = -1.0  # unit 0 never opens
        self.fragile.weight[:, 0] = 1000.0
        return self


def _fit_full_batch(model: FragileMLP, steps: int) -> FragileMLP:
    """``steps`` of Adam on every training digit at once, then the fragile weights."""
    torch.manual_seed(0)
    optimizer = model.configure_optimizers()
    x, y = _digits(True).tensors
    for _ in range(steps):
        optimizer.zero_grad()
        model.training_step((x, y), 0).backward()
        optimizer.step()
    return model.make_fragile().eval()


def _trained() -> FragileMLP:
    torch.manual_seed(0)
    return _fit_full_batch(FragileMLP(), 150)  # a second here


def test_sensitivity_finds_the_fragile_layer_first_from_one_calibration():
    model = _trained()
    sensitivity, quantized, probe = int8_sensitivity(
        model, model.train_dataloader(), model.val_dataloader(), progress=False
    )
    assert sensitivity.metric == probe.metric == "accuracy" and sensitivity.float_score > 0.9
    first, *others = sensitivity.costs
    assert first.name == "fragile" and first.cost > 0.3, sensitivity.describe()
    assert all(abs(cost.cost) < 0.05 for cost in others), sensitivity.describe()
    assert set(quantized_modules(quantized)) == {"first", "fragile", "last"}
    assert "most sensitive: fragile" in sensitivity.describe() and sensitivity.seconds > 0


def test_the_budget_keeps_the_fragile_layer_float_and_measures_the_result():
    model = _trained()
    quantized, result = quantize_within_budget(
        model, model.train_dataloader(), model.val_dataloader(), 0.02, progress=False
    )
    assert [name for name, _ in result.kept_float] == ["fragile"] and result.met, result.describe()
    assert set(quantized_modules(quantized)) == {"first", "last"}  # the deployed copy: fragile is plain float
    assert result.loss <= 0.02 and "kept float: fragile (alone" in result.describe()


def test_a_budget_that_cannot_be_met_is_a_warning_with_the_figures():
    model = _trained()
    with pytest.warns(UserWarning, match=r"quality budget 0 \(accuracy\) MISSED: float 0\.\d+, int8 0\.\d+"):
        _, result = quantize_within_budget(
            model, model.train_dataloader(), model.val_dataloader(), 0.0, include=["fragile"], progress=False
        )
    assert not result.met and result.kept_float == []  # one layer: nothing left to keep float


def test_the_budget_on_an_encoder_is_a_cosine_to_the_float_model():
    from transformers import BertConfig, BertModel

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
            self.bert = BertModel(config).eval()

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    torch.manual_seed(0)
    model = Hidden().eval()
    batches = [torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    _, result = quantize_within_budget(model, batches, batches, 0.001, progress=False)
    assert result.metric == "cosine" and result.float_score == pytest.approx(1.0)
    assert result.met and 1 - result.final_score <= 0.001, result.describe()


def test_ptq_with_a_budget_in_a_trainer_notes_what_it_kept_float(tmp_path):
    from lightning import Trainer

    from lightning_accel import AccelerationReport
    from lightning_accel.report.markdown import to_markdown

    model = _trained()
    ptq = PostTrainingQuantization(str(tmp_path / "m.onnx"), calibration_batches=4, max_quality_loss=0.02)
    report = AccelerationReport(directory=tmp_path / "report", latency=False, plots=False)
    trainer = Trainer(**fast_trainer_kwargs(max_steps=1, default_root_dir=tmp_path), callbacks=[ptq, report])
    trainer.fit(model)
    assert ptq.budget is not None and [name for name, _ in ptq.budget.kept_float] == ["fragile"]
    notes = built_deployment(trainer).notes
    assert any("quality budget 0.02 (accuracy) met" in note for note in notes), notes
    budget = report.report["quality_budget"]["PostTrainingQuantization"]
    assert budget["met"] and budget["layers"][0]["name"] == "fragile" and budget["layers"][0]["kept_float"]
    assert re.search(r"\| fragile \| \+0\.\d{4} \| float \|", to_markdown(report.report))
    with pytest.raises(ValueError, match=r"max_quality_loss.*got -1"):
        PostTrainingQuantization("m.onnx", max_quality_loss=-1)
    with pytest.raises(ValueError, match=r"max_quality_loss.*got nan"):
        PostTrainingQuantization("m.onnx", max_quality_loss=float("nan"))


def test_qat_with_a_budget_puts_the_fragile_trained_layer_back_in_float(tmp_path):
    import onnx
    from lightning import Trainer

    from lightning_accel import QuantizationAwareTraining

    model = _trained()
    model.lr = 1e-5  # the steps observe ranges and barely move the weights: the fragile layer stays what it is
    qat = QuantizationAwareTraining(export_path=str(tmp_path / "m.onnx"), max_quality_loss=0.02)
    trainer = Trainer(**fast_trainer_kwargs(max_steps=2, default_root_dir=tmp_path), callbacks=[qat])
    trainer.fit(model)
    kept = [name for name, _ in qat.budget.kept_float]
    # The ranges after the fragile layer were observed on its int8 (broken) outputs, so its float outputs no longer
    # fit them: measured, the greedy choice keeps the layer reading them float too ("last", +0.61 alone here).
    assert kept[0] == "fragile" and qat.budget.met, qat.budget.describe()
    assert set(quantized_modules(model)) == {"first", "fragile", "last"}  # the trained model itself is unchanged
    deployment = built_deployment(trainer)
    assert set(quantized_modules(deployment.evaluated_int8)) == {"first", "fragile", "last"} - set(kept)
    assert any("QAT: quality budget 0.02 (accuracy) met" in note for note in deployment.notes)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    float_products = [n for n in graph.node if n.op_type in ("Gemm", "MatMul") and "fragile" in n.name]
    assert float_products, [n.name for n in graph.node]  # the fragile layer runs in float in the file


def test_int4_qat_with_a_budget_holds_the_fragile_trained_layer_back_and_exports_what_it_scored(tmp_path):
    import onnx
    from lightning import Trainer

    from lightning_accel import AccelerationReport, QuantizationAwareTraining
    from lightning_accel.quantization.weight_only import group_quantized_layers

    model = _trained()
    model.lr = 1e-5  # two steps that barely move the weights: the fragile layer stays fragile
    qat = QuantizationAwareTraining(
        export_path=str(tmp_path / "m.onnx"), weight_bits=4, group_size=16, max_quality_loss=0.03
    )
    report = AccelerationReport(directory=tmp_path / "report", latency=False, plots=False)
    trainer = Trainer(**fast_trainer_kwargs(max_steps=2, default_root_dir=tmp_path), callbacks=[qat, report])
    trainer.fit(model)
    assert qat.budget is not None and qat.budget.label == "int4", qat.budget
    assert [name for name, _ in qat.budget.kept_float] == ["fragile"] and qat.budget.met, qat.budget.describe()
    deployment = built_deployment(trainer)
    assert set(group_quantized_layers(deployment.evaluated_int8)) == {"first", "last"}
    assert any("QAT: quality budget 0.03 (accuracy) met" in note for note in deployment.notes)
    assert report.report["quality_budget"]["QuantizationAwareTraining"]["layers"][0]["kept_float"]
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 2, [n.op_type for n in nodes]


def test_int4_weights_within_a_budget_keep_the_fragile_layer_float():
    from lightning_accel.quantization.weight_only import WeightOnlySettings, group_quantized_layers

    model = _trained()
    settings = WeightOnlySettings(bits=4, group_size=16)
    data = BudgetData(model.train_dataloader(), model.val_dataloader(), progress=False)
    quantized, result = weight_only_within_budget(model, settings, data, 0.03)
    assert result.sensitivity.costs[0].name == "fragile" and result.sensitivity.costs[0].cost > 0.1
    assert result.kept_float[0][0] == "fragile" and result.met, result.describe()
    assert "fragile" not in group_quantized_layers(quantized) and "first" in group_quantized_layers(quantized)
    assert ", int4 " in result.describe()


def test_int4_layers_step_to_8_bits_before_float_and_the_mixed_file_computes_what_was_scored(tmp_path):
    """The fragile layer is broken at 8 bits too (its huge column sets the group's scale) and goes float; a tight
    budget then holds the next layer at 8-bit groups rather than float; what the budget freed goes back to int4."""
    from lightning_accel.quantization.weight_only import (
        WeightOnlySettings,
        export_weight_only_onnx,
        group_quantized_layers,
    )

    model = _trained()
    data = BudgetData(model.train_dataloader(), model.val_dataloader(), progress=False)
    quantized, result = weight_only_within_budget(model, WeightOnlySettings(bits=4, group_size=32), data, 0.003)
    assert [name for name, _ in result.kept_float] == ["fragile"] and result.met, result.describe()
    assert [name for name, _ in result.kept_8bit] == ["first"], result.describe()  # "last" went back to int4
    bits = {name: layer.bits for name, layer in group_quantized_layers(quantized).items()}
    assert bits == {"first": 8, "last": 4}
    assert "held at int8 groups: first (int4 alone +0.0" in result.describe()
    assert result.as_dict()["layers"][1] == {
        "name": "first", "cost": result.kept_8bit[0][1], "kept_float": False, "kept_8bit": True
    }  # fmt: skip
    x = _digits(False).tensors[0][:64]
    _, figures = export_weight_only_onnx(quantized, tmp_path / "m.onnx", x[:1], check_inputs=[x], on_mismatch="raise")
    assert figures.agreement == 1.0 and figures.snr_db > 60, figures
    _, loose = weight_only_within_budget(model, WeightOnlySettings(bits=4, group_size=32), data, 0.05)
    assert loose.kept_8bit == [] and [name for name, _ in loose.kept_float] == ["fragile"], loose.describe()


def test_a_conv_goes_back_to_float_with_its_folded_batchnorm_and_the_export_still_matches(tmp_path):
    from lightning_accel import calibrate_, export_onnx
    from lightning_accel.quantization.budget import strip_layers_
    from tests.helpers import module_with_example

    torch.manual_seed(0)
    model = module_with_example().eval()
    calibrate_(model, [torch.rand(8, 1, 8, 8) for _ in range(2)], model_input=lambda b: b)
    assert model.net.conv.folded_bn is model.net.bn  # the BatchNorm is folded into the conv while prepared
    strip_layers_(model, ["net.conv"])
    assert set(quantized_modules(model)) == {"net.fc1", "net.fc2"}
    assert "output_quant" not in dict(model.net.bn.named_children()) and not model.net.bn._forward_hooks
    checks = [torch.rand(8, 1, 8, 8)]
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8), check_inputs=checks, on_mismatch="raise")


class FragileCNN(FragileMLP):
    """A digits CNN whose second conv is fragile in int8 the same way: huge weights on an input channel never open."""

    def __init__(self) -> None:
        LightningModule.__init__(self)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fragile = nn.Conv2d(8, 16, 3, padding=1)
        self.last = nn.Linear(16 * 16, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.lr = 1e-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.fragile(torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))))
        return self.last(nn.functional.avg_pool2d(features, 2).flatten(1))

    @torch.no_grad()
    def make_fragile(self) -> FragileCNN:
        self.conv1.weight[0] = 0.0
        self.conv1.bias[0] = -1.0  # channel 0 never opens
        self.fragile.weight[:, 0] = 1000.0
        return self


@functools.cache
def _trained_cnn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _fit_full_batch(FragileCNN(), 120).state_dict()  # a few seconds


def _trained_cnn() -> FragileCNN:
    model = FragileCNN()
    model.load_state_dict(_trained_cnn_state())
    return model.eval()


def test_a_cnn_budget_keeps_the_fragile_conv_float_and_an_unmeetable_one_warns():
    model = _trained_cnn()
    quantized, result = quantize_within_budget(
        model, model.train_dataloader(), model.val_dataloader(), 0.02, progress=False
    )
    assert result.metric == "accuracy" and result.float_score > 0.8, result.describe()
    assert result.sensitivity.costs[0].name == "fragile" and result.sensitivity.costs[0].cost > 0.3
    assert [name for name, _ in result.kept_float] == ["fragile"] and result.met, result.describe()
    assert set(quantized_modules(quantized)) == {"conv1", "last"}
    with pytest.warns(UserWarning, match=r"quality budget 0 \(accuracy\) MISSED: float 0\.\d+, int8 0\.\d+"):
        _, missed = quantize_within_budget(
            _trained_cnn(), model.train_dataloader(), model.val_dataloader(), 0.0, include=["fragile"], progress=False
        )
    assert not missed.met and missed.loss > 0.3

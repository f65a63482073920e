"""Models as users build them: layers created in configure_model are pruned and quantized like any other."""

import pytest
import torch
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

    auto, every = prepared("auto"), prepared("all")
    inside = ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "encoder.layers.1.linear2"]
    modules = dict(auto.named_modules())
    assert all(modules[name].output_quant is None for name in inside)
    assert modules["embed"].output_quant is not None and modules["head"].output_quant is not None
    assert all(dict(every.named_modules())[name].output_quant is not None for name in inside)

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

    with pytest.raises(ValueError, match=r"`outputs` must be one of \['auto', 'all'\].*'some'"):
        QuantizationAwareTraining(outputs="some")
    callback = QuantizationAwareTraining()
    state = {"quantizers": {"x": {}}, "weight_bits": 7}  # written before `outputs` existed: every output quantized
    with pytest.raises(ValueError, match=r"outputs='all'.*`outputs`='auto'"):
        callback.load_state_dict(state)

"""Models as users build them: layers created in configure_model are pruned and quantized like any other."""

import torch
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

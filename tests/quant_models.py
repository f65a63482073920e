"""Models for the quantization tests: BatchNorm, a residual add, several and keyword inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import TinyModule


class ResidualNet(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN + skip add), and a head that also takes a mask input."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.block = nn.Conv2d(channels, channels, 3, padding=1)
        self.block_bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * 16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.block_bn(self.block(x)))  # residual add
        x = F.max_pool2d(x, 2).flatten(1)
        logits = self.head(x)
        return logits if mask is None else logits + mask


class ResidualModule(TinyModule):
    """ResidualNet in a LightningModule whose forward takes keyword inputs."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.01)
        self.net = ResidualNet()
        self.example_input_array = {"x": torch.zeros(1, 1, 8, 8), "mask": torch.zeros(1, 4)}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, mask=mask)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x=x, mask=torch.zeros(len(x), 4)), y)
        self.log("train_loss", loss)
        return loss


class WideCNN(nn.Module):
    """A CNN with 64 channels: large enough that weights dominate the ONNX file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approximation`` against ``reference`` in dB."""
    noise = (reference - approximation).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp_min(1e-20)))


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm that applies its activation inside the norm module, as timm's ``BatchNormAct2d`` does."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class NormActNet(nn.Module):
    """EfficientNet/MobileNetV3-style stem (conv + BatchNormAct2d) and a residual conv-BN block."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(F.max_pool2d(x, 2).flatten(1))

"""Small models of the shapes users prune channels in: plain, residual, depthwise-separable CNNs, MLPs, transformers."""

from __future__ import annotations

import torch
from torch import nn


class PlainCNN(nn.Module):
    """Conv-BN-ReLU twice (one conv with a bias and no BN, before a non-ReLU activation), flatten, two Linears."""

    def __init__(self, channels: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * channels, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.sigmoid(self.conv2(x))  # sigmoid(0) != 0: the consumer's columns must be masked too
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, a residual add (with a 1x1 projection when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout (stem, four stages of two basic blocks, pooling, classifier) at a chosen width."""

    def __init__(
        self,
        width: int = 64,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        in_channels: int = 3,
        num_classes: int = 10,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(
                in_channels, width, 7 if stem_stride > 1 else 3, stem_stride, 3 if stem_stride > 1 else 1, bias=False
            ),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.pool = nn.MaxPool2d(3, 2, 1) if stem_stride > 1 else nn.Identity()
        layers, channels = [], width
        for stage, count in enumerate(blocks):
            outputs = width * 2**stage
            for index in range(count):
                layers.append(BasicBlock(channels, outputs, 2 if stage > 0 and index == 0 else 1))
                channels = outputs
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNet(nn.Module):
    """Depthwise-separable blocks (MobileNet-style): depthwise 3x3 conv-BN-ReLU6, pointwise 1x1 conv-BN-ReLU6."""

    def __init__(self, channels: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6()
        )
        blocks = []
        for inputs, outputs in ((channels, 2 * channels), (2 * channels, 2 * channels)):
            blocks += [
                nn.Conv2d(inputs, inputs, 3, padding=1, groups=inputs, bias=False),
                nn.BatchNorm2d(inputs),
                nn.ReLU6(),
                nn.Conv2d(inputs, outputs, 1, bias=False),
                nn.BatchNorm2d(outputs),
                nn.ReLU6(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Three Linears with GELU between them."""

    def __init__(self, features: int = 16, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerClassifier(nn.Module):
    """Token embedding, two ``nn.TransformerEncoderLayer`` blocks, mean pooling and a classifier."""

    def __init__(self, vocab: int = 16, d_model: int = 16, heads: int = 2, ff: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class ConcatCNN(nn.Module):
    """Two conv branches concatenated along channels, one BatchNorm over the concatenation (Inception/DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(1, 6, 3, padding=1)
        self.narrow = nn.Conv2d(1, 4, 1)
        self.bn = nn.BatchNorm2d(10)
        self.conv = nn.Conv2d(10, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.wide(x), self.narrow(x)], dim=1)))
        return self.head(self.conv(y).mean(dim=(2, 3)))


class FusedQKVAttention(nn.Module):
    """timm's ``Attention``: one Linear makes Q, K and V, reshaped into heads, then scaled dot-product attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class ViTBlock(nn.Module):
    """Pre-norm transformer block as timm writes it: attention and an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusedQKVAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TimmStyleViT(nn.Module):
    """A small timm-style ViT: conv patch embedding, class token, position embedding, fused-QKV blocks."""

    def __init__(self, dim: int = 32, heads: int = 4, num_classes: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.Sequential(ViTBlock(dim, heads), ViTBlock(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])

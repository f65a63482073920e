"""A small transformer encoder for the digits: each image row is a token (example code, not library API)."""

from __future__ import annotations

import math

import torch
from torch import nn

from examples.digits.model import DigitsClassifier

PIXELS_PER_TOKEN = 8


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The fixed sine/cosine position encoding of Vaswani et al. (2017), ``(length, width)``."""
    position = torch.arange(length).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class DigitsTransformer(nn.Module):
    """Token embedding, fixed positions, ``layers`` post-norm encoder layers, mean pooling and a linear head.

    Any sequence length up to ``max_length`` works, so the same weights can be timed at sequence 128.
    """

    def __init__(
        self, width: int = 64, heads: int = 4, layers: int = 2, feedforward: int = 128, max_length: int = 256
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(PIXELS_PER_TOKEN, width)
        self.register_buffer("positions", sinusoidal_positions(max_length, width), persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images ``(B, 1, 8, 8)`` or token sequences ``(B, T, 8)``."""
        tokens = images.reshape(images.shape[0], -1, PIXELS_PER_TOKEN)
        hidden = self.embed(tokens) + self.positions[: tokens.shape[1]]
        return self.head(self.encoder(hidden).mean(dim=1))


class DigitsTransformerClassifier(DigitsClassifier):
    """The digits classifier of ``examples.digits`` with the transformer instead of the CNN.

    Args:
        width: Token width (``d_model``).
        heads: Attention heads.
        layers: Encoder layers.
        feedforward: Width of each layer's feed-forward block.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = DigitsTransformer(width, heads, layers, feedforward)

"""A small CNN for the 8x8 digits, with torchmetrics accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from lightning import LightningModule
from torch import nn


class DigitsCNN(nn.Module):
    """Two conv blocks (conv, batch norm, ReLU) and a linear classifier for 1 x 8 x 8 images."""

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        return self.classifier(self.features(images))


class DigitsClassifier(LightningModule):
    """Classifies 8x8 digits; logs loss and accuracy for train, val and test.

    Args:
        channels: Width of the first conv layer; the second has twice as many.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        init_weights: Optional checkpoint (Lightning ``.ckpt`` or a plain state dict) to start from, e.g. a trained
            float model to fine-tune with quantization-aware training.
    """

    def __init__(
        self, channels: int = 32, lr: float = 3e-3, weight_decay: float = 0.0, init_weights: str | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitsCNN(channels)
        if init_weights is not None:
            checkpoint = torch.load(init_weights, map_location="cpu", weights_only=True)
            state = checkpoint.get("state_dict", checkpoint)
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("accuracy.")}, strict=False)
        # Lets Lightning show layer shapes, and lets QuantizationAwareTraining trace the model for ONNX export.
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        # Keys carry a suffix because ModuleDict keys may not shadow nn.Module methods such as ``train``.
        self.accuracy = nn.ModuleDict(
            {
                f"{split}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=10)
                for split in ("train", "val", "test")
            }
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.net(images)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = self.accuracy[f"{split}_acc"]
        accuracy(logits, labels)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log validation loss and accuracy."""
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log test loss and accuracy."""
        self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Predicted class per image."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over all parameters."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

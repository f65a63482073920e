"""Scikit-learn's bundled 8x8 digits as a LightningDataModule: 1,797 real images, nothing to download."""

from __future__ import annotations

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all digits as ``(images, labels)``: images ``N x 1 x 8 x 8`` in [0, 1], labels ``N``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits example needs scikit-learn: pip install 'lightning-accel[examples]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Split ``range(n)`` into disjoint train/val/test index tensors with a seeded permutation."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction + test_fraction` must be < 1 so that training data remains, "
            f"got {val_fraction!r} + {test_fraction!r}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


class DigitsDataModule(LightningDataModule):
    """Scikit-learn's 8x8 handwritten digits with a fixed, seeded train/val/test split.

    Args:
        batch_size: Samples per batch for every split.
        val_fraction: Fraction of the 1,797 images held out for validation.
        test_fraction: Fraction of the images held out for the test set.
        split_seed: Seed of the permutation that splits the data; the same seed always gives the same split.
        shuffle: Whether the training loader reshuffles each epoch (seeded by ``seed_everything``).
        num_workers: DataLoader worker processes; the data set is tiny, so 0 is fastest.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the images once and build the three splits."""
        if self.splits:
            return
        images, labels = load_digits_tensors()
        train, val, test = split_indices(len(labels), self.val_fraction, self.test_fraction, self.split_seed)
        self.splits = {
            "train": TensorDataset(images[train], labels[train]),
            "val": TensorDataset(images[val], labels[val]),
            "test": TensorDataset(images[test], labels[test]),
        }

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Return training batches, reshuffled each epoch when ``shuffle`` is set."""
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        """Return validation batches in a fixed order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Return test batches in a fixed order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Return the test images, for ``predict``."""
        return self._loader("test")

"""The digits example: a fixed, seeded split of real data, and a demo config that reaches its accuracy."""

import re

import pytest
import torch

from examples.digits import DigitsClassifier, DigitsDataModule
from examples.digits.datamodule import split_indices


def test_split_is_disjoint_complete_and_seeded():
    train, val, test = split_indices(1797, 0.15, 0.15, seed=0)
    assert (len(train), len(val), len(test)) == (1257, 270, 270)
    every = torch.cat([train, val, test])
    assert torch.equal(every.sort().values, torch.arange(1797))
    again = split_indices(1797, 0.15, 0.15, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    other = split_indices(1797, 0.15, 0.15, seed=1)
    assert not torch.equal(test, other[2])


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "name"),
    [(0.0, 0.1, "val_fraction"), (0.2, 1.5, "test_fraction"), (0.6, 0.5, "val_fraction + test_fraction")],
)
def test_split_rejects_bad_fractions(val_fraction, test_fraction, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        split_indices(100, val_fraction, test_fraction, seed=0)


def test_datamodule_serves_real_digits():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8)
    assert images.min() >= 0 and images.max() <= 1
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() <= 9
    assert len(dm.splits["test"]) == 270


def test_datamodule_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_classifier_logits_shape():
    model = DigitsClassifier(channels=4)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)

"""Shared fixtures and the rule that skips GPU-marked tests on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from lightning import seed_everything

from tests.helpers import RandomImages, TinyModule


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same seed, so results do not depend on test order."""
    seed_everything(0, workers=True, verbose=False)


@pytest.fixture
def tiny_module() -> TinyModule:
    return TinyModule()


@pytest.fixture
def random_images() -> RandomImages:
    return RandomImages()

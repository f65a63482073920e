"""The digits example: scikit-learn's bundled 8x8 digits and a small CNN (example code, not library API)."""

from examples.digits.datamodule import DigitsDataModule
from examples.digits.model import DigitsClassifier, DigitsCNN

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule"]

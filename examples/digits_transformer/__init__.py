"""The transformer example: the 8x8 digits read as 8 tokens of 8 pixels by a small transformer encoder."""

from examples.digits_transformer.model import DigitsTransformer, DigitsTransformerClassifier

__all__ = ["DigitsTransformer", "DigitsTransformerClassifier"]

"""The pretrained MiniLM sentence encoder, distilled from itself while it is quantized or slimmed."""

from examples.minilm.data import DocstringTexts
from examples.minilm.model import SentenceEncoder

__all__ = ["DocstringTexts", "SentenceEncoder"]

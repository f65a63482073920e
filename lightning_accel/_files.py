"""Writing files so that a reader never sees half of one: write under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    If the block raises, ``path`` keeps its previous content (or stays absent) and the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_target(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def resolve_artifact_path(trainer: Any, path: str | os.PathLike) -> Path:
    """An absolute path as given; a relative one under the run's log directory, so that runs never collide.

    ``trainer.log_dir`` is agreed between DDP ranks (a collective call): resolve on every rank, e.g. in ``setup``.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    return Path(trainer.log_dir or trainer.default_root_dir) / path

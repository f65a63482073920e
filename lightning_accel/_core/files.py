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


def probe_writable(owner: str, argument: str, path: str | os.PathLike, directory: bool = False) -> None:
    """Fail now, not after training, unless a file can really be written at ``path`` (or inside it).

    Creates the missing folders (where the artifact will go anyway), writes a small temporary file beside the
    target and removes it. Permission bits are not enough: root may write everywhere by ``os.access``, yet
    ``/proc`` or a read-only mount refuses the actual write. Safe on every DDP rank at once (per-process names).

    Args:
        owner: The callback whose option it is, named in the error.
        argument: The option the path came from, named in the error.
        path: The file that will be written, or with ``directory=True`` the folder files will be written in.
        directory: Whether ``path`` is a folder rather than a file.

    Raises:
        ValueError: naming ``argument``, the path and the operating system's reason.
    """
    target = Path(path)
    folder = target if directory else target.parent
    probe = folder / f".{target.name if not directory else 'probe'}.probe-{os.getpid()}"
    given = f"{owner}: `{argument}` {str(path)!r} cannot be written"
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{given}: {blocker} is a file, not a directory")
    if not directory and target.is_dir():
        raise ValueError(f"{given}: it is a directory; give a file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"lightning_accel write probe")
    except OSError as error:
        raise ValueError(f"{given}: {error.strerror or error} (in {folder})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def resolve_artifact_path(trainer: Any, path: str | os.PathLike) -> Path:
    """An absolute path as given; a relative one under the run's log directory, so that runs never collide.

    ``trainer.log_dir`` is agreed between DDP ranks (a collective call): resolve on every rank, e.g. in ``setup``.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    return Path(trainer.log_dir or trainer.default_root_dir) / path

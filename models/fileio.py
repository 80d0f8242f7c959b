"""Files written whole or not at all, for the data pipeline's outputs.

A writer builds its file at a temporary path beside the target (a rename is
atomic only within one file system), and the temporary file is renamed over
the target once complete, or removed if the write fails: readers see the old
file or the new one, never part of one. (`pserver.fileio` does the same, with
fsyncs, for the training side; `models` may not import it.)
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``, on error it is removed.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by it (matplotlib) still do.
    The directory must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)

"""All-or-nothing outputs: build in a temporary path beside the target, then rename.

A command that fails half-way leaves the target exactly as it was, and readers
never see a half-written file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from models.errors import DataError


def check_replaceable(out: Path, marker: str) -> None:
    """Refuse to overwrite a file, or a non-empty directory we did not write (no `marker` in it)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise DataError(f"--out {out}: directory has other files and no {marker}; pass a new or empty directory")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh directory beside `out`; on success it replaces `out`, on error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)  # two renames: the window without `out` is microseconds
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


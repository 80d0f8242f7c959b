"""Files written whole or not at all.

A reader (a restarted shard, a script waiting for a ready file) must see the
previous complete file or the new one, never part of one, even if the writer
crashes. So every write goes to a temporary file in the same directory (a
rename is atomic only within one file system), is flushed and fsynced, is
renamed over the target, and the directory is fsynced so that the rename
itself survives a power cut. A temporary file is removed if the write fails;
one left by a crash is named ``NAME.<random>.tmp`` (`atomic_path`: ``.NAME.<random>.tmpSUFFIX``).

This module and `pserver.errors` import only the standard library: they are
the foundation every layer may use, `models` included.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir"]


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` durable (where the platform can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Replace ``path`` with what ``write(file)`` writes to a binary file. The directory must exist."""
    path = Path(path)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that opens files by name (np.save, Parquet,
    matplotlib); once the block ends it is fsynced and renamed over ``path``, or removed if the block raised.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by it still do. The directory
    must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """``value`` as JSON (``json.dumps(value, **dumps)``, UTF-8)."""
    return atomic_write_text(path, json.dumps(value, **dumps))

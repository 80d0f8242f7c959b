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



def _named(option: str, out: Path) -> str:
    """How a message names the output: `--out run/` on a command line, `out='run/'` from Python."""
    return f"{option} {out}" if option.startswith("-") else f"{option}={str(out)!r}"


def check_file_out(out: Path, example: str, option: str = "--out") -> None:
    """Refuse an output file path that is a directory, or whose parent is a file, before any work is done."""
    if out.is_dir():
        raise DataError(f"{_named(option, out)}: is a directory; pass a file path such as {out / example}")
    check_parent(out, option, f"pass a path such as {example}")


def check_parent(out: Path, option: str, hint: str) -> None:
    """Refuse `out` when its nearest existing parent is a file (nothing could be written below it)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{_named(option, out)}: {parent} is a file, not a directory; {hint}")
            break


# What a training run writes into its RUN directory. One of the markers (files only a run writes) tells a
# previous run from a directory of other files; the stale files are the ones the next run must not inherit.
RUN_MARKERS = ("summary.json", "history.jsonl", ".pserver.json", "logs/evaluator.log", "logs/pserver.log",
               "initial_weights.npz")
RUN_STALE_FILES = ("history.jsonl", "summary.json", "report.png", ".finish", ".pserver.json")
RUN_STALE_DIRS = ("checkpoints",)  # a shard must never restart from another run's slice


def is_previous_run(out: Path) -> bool:
    return any((out / marker).exists() for marker in RUN_MARKERS)


def check_run_out(out: Path, overwrite: bool = False, option: str = "--out") -> None:
    """A RUN directory must be absent, empty, or a previous run; any other directory only with `overwrite`.

    Nothing is written or deleted here: it runs before any work, so that a refusal leaves `out` as it was.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{_named(option, out)}: is a file; pass a directory for the run (absent, empty, or a previous run)")
    check_parent(out, option, "pass another path")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not is_previous_run(out):
        shown = sorted(p.name for p in out.iterdir())
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        raise DataError(f"{_named(option, out)}: directory holds other files ({', '.join(shown[:3])}{more}) and no previous "
                        "run; pass a new or empty directory, or add "
                        f"{'--overwrite' if option.startswith('-') else 'overwrite=True'} to write into it")


def start_run_dir(out: Path, overwrite: bool = False) -> None:
    """Check `out` (`check_run_out`), then clear a previous run's state from it and create it."""
    check_run_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in RUN_STALE_FILES:
        (out / stale).unlink(missing_ok=True)
    for stale in RUN_STALE_DIRS:
        shutil.rmtree(out / stale, ignore_errors=True)

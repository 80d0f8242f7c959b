"""The data pipeline's errors, under one base class.

`models` imports nothing of the training side, so its errors live here; the
`notpu` command line turns a `DataError` into one line on stderr and exit
code 2, as it does pserver's `NotpuError`.
"""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(Exception):
    """A user's file, column or option cannot be used as given (what, where, and what to try)."""

"""The data pipeline's error: a user's file, column or option that cannot be used as given.

It derives from `pserver.errors.NotpuError`, the one root of every error notpu raises on purpose, which
the command lines turn into one line on stderr and exit code 2.
"""
from __future__ import annotations

from pserver.errors import NotpuError

__all__ = ["DataError"]


class DataError(NotpuError):
    """A user's file, column or option cannot be used as given (what, where, and what to try)."""

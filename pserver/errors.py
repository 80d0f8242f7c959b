"""Every exception notpu raises, under one base class.

`NotpuError` is the one root: the data pipeline's `models.errors.DataError`
derives from it too, so a command line catches one class. This module imports
only the standard library, so every layer may use it.

Messages name what was wrong, where (host:port, shard, file, column, option),
what was waited for and for how long, and what to try.
"""
from __future__ import annotations


class NotpuError(Exception):
    """Base of every error notpu raises on purpose."""


class ProtocolError(NotpuError):
    """A message on the wire is malformed, truncated, oversized or of another version.

    ``code`` is one of ``pserver.protocol.ERROR_CODES``; it travels back to the
    sender in the error reply and is counted in the server's stats.
    """

    def __init__(self, code: str, reason: str | None = None) -> None:
        if reason is None:
            code, reason = "malformed", code
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


class RemoteError(NotpuError):
    """A server answered a request with an error reply."""

    def __init__(self, endpoint: str, op: str, code: str, reason: str) -> None:
        self.endpoint = endpoint
        self.op = op
        self.code = code
        self.reason = reason
        super().__init__(f"{endpoint} refused {op}: [{code}] {reason}")


class ServerUnreachable(NotpuError):
    """A server did not answer within the retry budget."""


class WaitTimeout(NotpuError):
    """Something waited for (a file, a process) did not happen within its time limit."""


class ProcessExited(NotpuError):
    """A process exited before doing what it was waited for."""


class LayoutMismatch(NotpuError):
    """A model's weight layout differs from the one the server holds."""


class CheckpointError(NotpuError):
    """A checkpoint is torn, missing, or belongs to another model."""


class ConfigError(NotpuError):
    """A command-line option or configuration value is invalid."""


class TrainingFailed(NotpuError):
    """A run ended without training: every worker failed, or the centre received no update.

    The message names the first worker's error and the log that holds it; RUN/summary.json says
    `"status": "failed"` with the same `"reason"`.
    """


class RunWarning(UserWarning):
    """A run finished but may not have learned what it should (summary.json's `warnings`), as `fit` warns it."""

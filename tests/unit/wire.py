"""A stand-in for a ROUTER socket, for driving a shard's or the coordinator's `handle()` in process."""
from __future__ import annotations

from pserver import protocol


class Wire:
    """Records every reply as (identity, message) when it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, protocol.Message]] = []

    def send_multipart(self, frames, copy=True, track=False):
        identity, *body = [bytes(f) for f in frames]  # copied now, as ZeroMQ reads a zero-copy frame later
        self.sent.append((identity, protocol.decode(body)))
        return None

    def take(self) -> list[tuple[bytes, protocol.Message]]:
        out, self.sent = self.sent, []
        return out

"""The client's path to each shard: a push re-sent after the shared memory was mapped anew keeps the pieces it
cut for the half-precision wire, so the error-feedback residual counts that push's rounding once."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pserver import client as module
from pserver import precision, protocol
from pserver.client import Client, ClientConfig, _Frames, _SharedMemory
from pserver.errors import RemoteError


class _FakeSegments(_SharedMemory):
    """A shared-memory path without segments: a push area in memory, and a token."""

    def __init__(self, shard) -> None:
        _Frames.__init__(self, shard, "float32")
        self.push = SimpleNamespace(buffers=[np.zeros(shard.end - shard.start, np.float32)], token=7)
        self.centre = None

    def close(self) -> None:
        pass


def test_a_push_resent_after_remapping_keeps_its_half_precision_pieces(monkeypatch):
    client = Client("127.0.0.1:1", ClientConfig(wire="float16", timeout_s=0.1, retries=0))
    try:
        client.rank, client.world = 0, 1
        client.use_shards([{"index": 0, "endpoint": "127.0.0.1:2", "start": 0, "end": 4},
                           {"index": 1, "endpoint": "192.0.2.1:3", "start": 4, "end": 8}])
        client._paths = [_FakeSegments(client.shards[0]), _Frames(client.shards[1], "float16")]
        sent: list[list[list]] = []

        def fake_fan_out(peers, requests, config, what, timeout_s=None):
            if what == "SHM":  # asked again after the refusal: granted nothing, so frames from now on
                raise RemoteError("127.0.0.1:2", "SHM", "shm", "no segments here")
            sent.append(requests)
            if len(sent) == 1:
                raise RemoteError("127.0.0.1:2", "PUSH", "shm", "no push segment 0x7 (restarted?)")
            return [protocol.decode(protocol.encode(protocol.ok(version=1, staleness=0, applied=True)))
                    for _ in requests]

        monkeypatch.setattr(module, "fan_out", fake_fan_out)
        delta = np.linspace(-1, 1, 8, dtype=np.float32) / 3  # values float16 cannot hold exactly
        client.push(delta)

        first, again = sent
        assert [bytes(f) for f in first[1]] == [bytes(f) for f in again[1]]  # the wire piece, cut once
        expected = precision.ErrorFeedback(8, "float16")
        piece = expected.encode(delta[4:8], 4, 8)
        np.testing.assert_array_equal(client.residual, expected.residual)  # one rounding, not two
        np.testing.assert_array_equal(np.frombuffer(bytes(again[1][1]), np.float16), piece.view(np.float16))
        assert "shm" in protocol.decode(first[0]).header  # the first try went through the push area
        shard0 = protocol.decode(again[0])  # the second over frames: the plain float32 range
        assert "shm" not in shard0.header
        np.testing.assert_array_equal(shard0.arrays[0], delta[:4])
        assert client.shared_memory == [False, False]
    finally:
        client.close()

"""12,000 malformed or hostile messages to a live shard and coordinator, with and without CurveZMQ.

The generator, the run and the checks live in tests/integration/fuzzing.py
(its docstring lists what is asserted), shared with the 100,000-message
benchmark bench/test_bench_fuzz.py. Here: at least 10,000 messages, every
one that expects an answer answered with an error, both processes alive and
not restarted, the centre's checksum unchanged, each shard's RSS growth
bounded. Under CurveZMQ the fuzzer holds a listed worker key, and a peer with
an unlisted key gets no reply at all.
"""
import sys
from pathlib import Path

import pytest

from pserver.security import client_curve, create_keys

sys.path.insert(0, str(Path(__file__).parent))
import fuzzing  # noqa: E402

pytestmark = pytest.mark.integration
MESSAGES = 12_000


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_fuzz_shard_and_coordinator(pserver, tmp_path, curve):
    keys = create_keys(tmp_path / "keys", workers=2) if curve else None
    outsider = create_keys(tmp_path / "other", workers=1) if curve else None
    server = pserver("--max-message-mb", str(fuzzing.MAX_MESSAGE_MB), "--shards", "2",
                     *(["--keys", str(keys)] if curve else []))
    honest = client_curve(keys, "worker0") if curve else None
    base = fuzzing.baseline(server.address, honest)
    try:
        run = fuzzing.fuzz(server.address, base, MESSAGES,
                           curve=client_curve(keys, "worker1") if curve else None,
                           outsider=dict(client_curve(outsider, "worker0"), server=honest["server"]) if curve else None)
        print("\n" + run.summary())
        assert run.total >= 10_000
        fuzzing.verify(base, run)
        assert server.proc.poll() is None
    finally:
        base.client.close()

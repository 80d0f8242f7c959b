"""Push+pull round trip of the talk's model through one shard, against bare pyzmq.

    python -m pytest -q -s bench/test_bench_transport.py           # 100 rounds
    python -m pytest -q -s bench/test_bench_transport.py --quick   # 5 rounds

Both sides are real processes on TCP loopback: `pserver start` (a coordinator
and one shard process) and `bench.echo_server`, a bare ROUTER that sends every
message straight back. The client side of both runs in this process, in turn,
round after round. Each side moves the same bytes: a 2,447,562-float32 delta
(9.8 MB) out and as many floats back. The shard also applies the delta
(one pass of `kernels.add`); `kernel_ms` and `copy_ms` time that pass and one
copy of the vector alone, so the overhead over bare ZeroMQ can be read off.
The reply's centre is used where it lands (a view on the received frame), as
a worker sets its model's weights from it.

The same run also times the co-located fast path: a worker on this host (of a
second server, started alike), whose client maps the shard's shared memory (`pserver.shm`), so ZeroMQ
carries only the headers. The delta is computed in the worker's push area, as
a worker does, so it is not copied; the shard's one pass writes the new centre
into its own buffer and into the worker's reply area, and the worker uses it
there, as over TCP it uses the received frame (`shm_out_*`: copied out into a
buffer of the worker's own as well; `shm_copy_*`: a delta computed elsewhere,
copied in). `shm_ratio_vs_bare_tcp` divides the push+pull by the bare echo,
and `ratio_vs_memcpy` by two plain copies of the vector (out and back), timed
in the same rounds.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from bench._procs import QUICK, TALK_LAYOUT, echo_servers, pserver
from bench._timing import interleave, median_time
from pserver import kernels, protocol
from pserver import shm
from pserver.client import Client, ClientConfig

ROUNDS, WARMUP = (5, 2) if QUICK else (100, 10)
TIMEOUT_MS = 30_000


class BareEcho:
    """A DEALER that sends the bytes of a PUSH and waits for them to come back, nothing else."""

    def __init__(self, endpoint: str, payload: np.ndarray) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"tcp://{endpoint}")
        self.header = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 1,
                                     "mode": "add", "scale": 1.0, "pull": True, "arrays": [["<f4", payload.size]]})
        self.payload = memoryview(payload).cast("B")

    def round_trip(self) -> None:
        self.socket.send_multipart([self.header, self.payload], copy=False)
        if not self.socket.poll(TIMEOUT_MS):
            raise TimeoutError(f"the echo server did not answer within {TIMEOUT_MS} ms")
        frames = self.socket.recv_multipart(copy=False)
        assert len(frames[1]) == len(self.payload)

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.mark.timeout(1800)
def test_transport_round_trip(benchmark) -> None:
    n = TALK_LAYOUT.total
    rng = np.random.default_rng(0)
    initial = rng.standard_normal(n).astype(np.float32)  # (n,)
    delta = (rng.standard_normal(n) * 1e-7).astype(np.float32)  # (n,) small: the centre stays finite for ever
    out = np.empty(n, np.float32)  # (n,) the worker's copy of the centre

    scratch = np.empty_like(out)  # (n,)

    def two_memcpys() -> None:
        np.copyto(scratch, delta)
        np.copyto(out, scratch)

    # Two servers: a shard whose centre is shared with a co-located worker sends TCP replies as copies (its
    # buffers are rewritten two updates on), which is not what a TCP-only shard pays.
    with pserver() as address, pserver() as local_address, echo_servers(1) as (echo,):
        client = Client(address, ClientConfig(shared_memory=False))
        local = Client(local_address)  # the same host: shared memory
        bare = BareEcho(echo, delta)
        try:
            client.join("bench-transport")
            client.init(initial, TALK_LAYOUT)
            client.pull()
            local.join("bench-transport-shm")
            local.init(initial, TALK_LAYOUT)
            local.pull(out=out)
            assert local.shared_memory == [True], "the co-located worker did not get shared memory"

            area = local.delta_buffer()  # a worker computes its delta here (DOWNPOUR does): no copy at push
            np.copyto(area, delta)

            def shm_push_pull() -> None:  # the new centre is a view on the worker's reply area
                local.push(area, pull=True)

            def shm_out_push_pull() -> None:  # ... copied out into the worker's buffer
                local.push(area, pull=True, out=out)

            def shm_copy_push_pull() -> None:  # a delta computed elsewhere, copied into the segment by push
                local.push(delta, pull=True)

            # As a worker does: the reply's centre is what the model's weights are set from, so the client
            # hands back a view on the received frame, with no copy into a buffer of its own.
            def push_pull() -> None:
                client.push(delta, pull=True)

            def push_then_pull() -> None:
                client.push(delta)
                client.pull()

            ps_s, others = interleave(benchmark, push_pull, {"bare": bare.round_trip, "separate": push_then_pull,
                                                             "shm": shm_push_pull, "shm_out": shm_out_push_pull,
                                                             "shm_copy": shm_copy_push_pull,
                                                             "memcpy": two_memcpys},
                                      ROUNDS, WARMUP)
            updates = client.stats()["shards"][0]["version"]
            local_updates = local.stats()["shards"][0]["version"]
            local_pid = local.stats()["shards"][0]["pid"]
        finally:
            bare.close()
            client.close()
            local.close()
    left = shm.wait_gone([local_pid])  # the shard removes its segment as it exits
    assert not left, f"shared-memory segments left behind: {left}"

    # The two pieces of work the shard and the client do that bare ZeroMQ does not.
    kernel_s = median_time(lambda: kernels.add(out, delta, scratch), ROUNDS * 2)
    copy_s = median_time(lambda: np.copyto(scratch, out), ROUNDS * 2)

    bare_s, separate_s, shm_s, memcpy_s = others["bare"], others["separate"], others["shm"], others["memcpy"]
    shm_copy_s, shm_out_s = others["shm_copy"], others["shm_out"]
    mb = 2 * n * 4 / 1e6  # both ways
    info = {
        "floats": n,
        "push_pull_ms": round(ps_s * 1e3, 3),
        "push_then_pull_ms": round(separate_s * 1e3, 3),
        "bare_zmq_ms": round(bare_s * 1e3, 3),
        "ratio_vs_bare_zmq": round(ps_s / bare_s, 3),
        "ratio_separate_vs_bare_zmq": round(separate_s / bare_s, 3),
        "overhead_ms": round((ps_s - bare_s) * 1e3, 3),
        "kernel_ms": round(kernel_s * 1e3, 3),
        "copy_ms": round(copy_s * 1e3, 3),
        "push_pull_gb_per_s": round(mb / 1e3 / ps_s, 2),
        "bare_gb_per_s": round(mb / 1e3 / bare_s, 2),
        "shm_push_pull_ms": round(shm_s * 1e3, 3),
        "shm_out_push_pull_ms": round(shm_out_s * 1e3, 3),
        "shm_copy_push_pull_ms": round(shm_copy_s * 1e3, 3),
        "two_memcpys_ms": round(memcpy_s * 1e3, 3),
        "shm_out_ratio_vs_bare_tcp": round(shm_out_s / bare_s, 3),
        "shm_copy_ratio_vs_bare_tcp": round(shm_copy_s / bare_s, 3),
        "shm_ratio_vs_bare_tcp": round(shm_s / bare_s, 3),
        "ratio_vs_memcpy": round(shm_s / memcpy_s, 3),
        "rounds": ROUNDS,
        "target": "ratio_vs_bare_zmq <= 1.10, shm_ratio_vs_bare_tcp <= 0.25, ratio_vs_memcpy <= 4",
    }
    benchmark.extra_info.update(info)
    print(f"\ntransport: push+pull of {n} float32 {ps_s * 1e3:.2f} ms, push then pull {separate_s * 1e3:.2f} ms, "
          f"bare zmq {bare_s * 1e3:.2f} ms: {ps_s / bare_s:.2f}x bare (separate {separate_s / bare_s:.2f}x); "
          f"overhead {(ps_s - bare_s) * 1e3:.2f} ms of which kernel {kernel_s * 1e3:.2f} ms + copy {copy_s * 1e3:.2f} ms "
          f"(median of {ROUNDS})")
    print(f"shared memory: push+pull {shm_s * 1e3:.2f} ms = {shm_s / bare_s:.3f}x bare tcp, "
          f"{shm_s / memcpy_s:.2f}x two memcpys ({memcpy_s * 1e3:.2f} ms); the centre copied out "
          f"{shm_out_s * 1e3:.2f} ms = {shm_out_s / bare_s:.3f}x, the delta copied in "
          f"{shm_copy_s * 1e3:.2f} ms = {shm_copy_s / bare_s:.3f}x bare tcp")
    # Every push was applied once: warm-up and timed rounds of the five PS sides, nothing lost or doubled.
    assert updates == 2 * (ROUNDS + WARMUP) and local_updates == 3 * (ROUNDS + WARMUP)

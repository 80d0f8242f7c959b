"""100,000 malformed or hostile messages to a live shard and coordinator, with and without CurveZMQ.

    python -m pytest -q -s bench/test_bench_fuzz.py           # 100,000 messages per mode
    python -m pytest -q -s bench/test_bench_fuzz.py --quick   # 2,000 per mode (CI)

The CI test tests/integration/test_fuzz.py at scale: the same generator, run
and checks (tests/integration/fuzzing.py; its docstring lists every kind of
message and every assertion), against `pserver start --shards 2` with and
without `--keys`. 60% of the messages go to shard 0, the rest to the
coordinator, every op each serves among them, one in flight per socket; then
frames above MAXMSGSIZE, and under CurveZMQ a peer with an unlisted key.

Asserted, as in CI: every message that expects an answer got exactly one
error reply whose code the endpoint also counted, no stray replies, both
processes alive and not restarted, the centre's SHA-256 and versions
unchanged, each shard's RSS growth after the first 1,000 messages at most
4 MiB. Figures (extra_info["fuzz"]): messages, seconds (all of it, and the messages
alone: the oversized frames and the unlisted peer wait out timeouts),
messages/s of the messages alone, each
shard's RSS growth, the error codes per endpoint.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest

from bench._procs import QUICK, pserver
from bench._timing import numbers
from pserver.security import client_curve, create_keys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
import fuzzing  # noqa: E402

MESSAGES = 2_000 if QUICK else 100_000
WARMUP = 500 if QUICK else fuzzing.WARMUP


def figures(run: fuzzing.FuzzRun) -> dict:
    return {
        "curve": run.curve, "messages": run.total, "oversized": run.oversized, "seconds": round(run.seconds, 2),
        "loop_seconds": round(run.loop_seconds, 2), "messages_per_s": round(run.messages / run.loop_seconds, 1),
        "rss_growth_mib": {str(k): round(g / 2**20, 2) for k, g in run.rss_growth().items()},
        "rss_end_mib": {str(k): round(r / 2**20, 1) for k, r in run.rss_after.items()},
        "to_shard": sum(run.sent["shard"].values()), "to_coordinator": sum(run.sent["coordinator"].values()),
        "codes": {name: dict(c) for name, c in run.codes.items()}, "regenerated": run.regenerated,
    }


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_fuzz_at_scale(benchmark, curve: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="notpu-fuzz-") as tmp:
        keys = create_keys(Path(tmp) / "keys", workers=2) if curve else None
        outsider = create_keys(Path(tmp) / "other", workers=1) if curve else None
        with pserver("--max-message-mb", str(fuzzing.MAX_MESSAGE_MB), "--shards", "2",
                     *(["--keys", str(keys)] if curve else [])) as address:
            honest = client_curve(keys, "worker0") if curve else None
            base = fuzzing.baseline(address, honest)
            try:
                run = benchmark.pedantic(
                    fuzzing.fuzz, args=(address, base, MESSAGES), rounds=1, iterations=1,
                    kwargs={"curve": client_curve(keys, "worker1") if curve else None, "warmup": WARMUP,
                            "outsider": dict(client_curve(outsider, "worker0"), server=honest["server"])
                            if curve else None})
                print("\n" + run.summary())
                fuzzing.verify(base, run)
            finally:
                base.client.close()
    f = figures(run)
    benchmark.extra_info["fuzz"] = f
    assert all(x is not None and math.isfinite(x) for x in numbers(f))
    print(f"fuzz{' curve' if curve else ''}: {f['messages']} messages in {f['seconds']:.1f} s = "
          f"{f['messages_per_s']:.0f}/s; shard RSS growth {f['rss_growth_mib']} MiB")

"""Updates/s that 1 and 2 shards absorb from 8 simulated workers, against bare pyzmq.

    python -m pytest -q -s bench/test_bench_capacity.py           # 3 × 4 s per side
    python -m pytest -q -s bench/test_bench_capacity.py --quick   # 1 × 0.3 s per side

8 `bench.sim_worker` processes do no compute: each pushes the talk's model
(2,447,562 float32) and pulls it back (`Client.push(pull=True)`) as fast as it
can. The same 8 processes take turns, phase by phase, against `pserver start`
with 1 and with 2 shards and against 1 and 2 bare echo servers
(`bench.echo_server`) that move the same bytes split the same way; the order
of the two sides alternates between repetitions. The figure is the ratio of
the median updates/s. Both sides go over TCP: the simulated workers do not use
the co-located fast path (`pserver.shm`), so the figure stays the cost of the
parameter server against the same bytes on the same wire.

Where the time goes (extra_info["account"]): the CPU seconds of the servers
(coordinator and shards, or the echo processes) and of the 8 senders in each
phase, per update, read from /proc at the phase's start and end; and from the
shards' own counters, the time their thread spends per update handling a
request and, of that, in the update kernel. The machine's cores are the
budget: when servers and senders together use them all, updates/s is the
cores divided by the CPU one update costs, and the ratio is the two sides'
CPU per update.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench._procs import QUICK, TALK_LAYOUT, echo_servers, pserver
from pserver.client import Client
from pserver.procs import stop_tree

WORKERS = 8
REPS, PHASE_S, GAP_S = (1, 0.3, 0.3) if QUICK else (3, 4.0, 0.5)
SHARDS = (1, 2)


def _phases() -> list[dict]:
    phases, offset = [], 0.0
    for rep in range(REPS):
        for shards in SHARDS:
            sides = ["bare", "ps"] if rep % 2 == 0 else ["ps", "bare"]
            for side in sides:
                phases.append({"target": f"{side}{shards}", "offset_s": offset, "duration_s": PHASE_S})
                offset += PHASE_S + GAP_S
    return phases


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _run_workers(plan: dict, tmp: Path, timeout_s: float,
                 servers: dict[str, list[int]]) -> tuple[list[list[int]], list[dict[str, float]]]:
    """Counts per worker and phase, and per phase the CPU seconds of its target's servers and of the senders."""
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan))
    ready = [tmp / f"ready{i}" for i in range(WORKERS)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.sim_worker", str(plan_path), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in ready]
    try:
        deadline = time.monotonic() + 120
        while not all(r.is_file() for r in ready):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"simulated worker exited with {dead[0].returncode}:\n"
                                   f"{dead[0].stderr.read().decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("simulated workers were not ready within 120 s")
            time.sleep(0.02)
        start = time.time() + GAP_S
        Path(plan["go_file"]).write_text(json.dumps({"start": start}))
        senders = [p.pid for p in procs]
        cpu = []
        for phase in plan["phases"]:  # a reading at each phase's edges (a measurement, not a synchronisation)
            readings = []
            for edge in (phase["offset_s"], phase["offset_s"] + phase["duration_s"]):
                time.sleep(max(start + edge - time.time(), 0))
                readings.append((_cpu_s(servers[phase["target"]]), _cpu_s(senders), time.time()))
            (s0, w0, t0), (s1, w1, t1) = readings
            cpu.append({"server_s": s1 - s0, "senders_s": w1 - w0, "wall_s": t1 - t0})
        counts = []
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"simulated worker exited with {p.returncode}:\n{err.decode(errors='replace')[-3000:]}")
            counts.append(json.loads(out.decode().strip().splitlines()[-1])["counts"])
        return counts, cpu
    finally:
        for p in procs:
            stop_tree(p, grace_s=2.0)


@pytest.mark.timeout(1800)
def test_capacity_eight_workers(benchmark) -> None:
    n = TALK_LAYOUT.total
    initial = np.random.default_rng(0).standard_normal(n).astype(np.float32)  # (n,)
    phases = _phases()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="notpu-capacity-")))
        addresses = {s: stack.enter_context(pserver("--shards", str(s), workers=WORKERS)) for s in SHARDS}
        echoes = stack.enter_context(echo_servers(max(SHARDS)))
        for address in addresses.values():
            driver = Client(address)
            driver.init(initial, TALK_LAYOUT)
            driver.close()
        targets = [{"name": f"ps{s}", "kind": "ps", "address": a} for s, a in addresses.items()]
        targets += [{"name": f"bare{s}", "kind": "bare", "endpoints": echoes[:s]} for s in SHARDS]
        plan = {"floats": n, "targets": targets, "phases": phases, "go_file": str(tmp / "go.json"),
                "shared_memory": False}
        run_s = phases[-1]["offset_s"] + PHASE_S + GAP_S
        servers = {}
        for s, a in addresses.items():
            c = Client(a)
            stats = c.stats()
            c.close()
            servers[f"ps{s}"] = [stats["coordinator"]["pid"], *(sh["pid"] for sh in stats["shards"])]
        echo_pids = {e: p.pid for p in psutil.Process().children(recursive=True) for e in echoes
                     if "bench.echo_server" in " ".join(p.cmdline()) and _listens_on(p, e)}
        for s in SHARDS:
            servers[f"bare{s}"] = [echo_pids[e] for e in echoes[:s]]
        counts, cpu = benchmark.pedantic(lambda: _run_workers(plan, tmp, timeout_s=run_s + 120, servers=servers),
                                         rounds=1, iterations=1)
        versions, shard_times = {}, {}
        for s, a in addresses.items():
            c = Client(a)
            shards = c.stats()["shards"]
            c.close()
            versions[s] = [sh["version"] for sh in shards]
            shard_times[s] = [(sh["handle_s"], sh["apply_s"]) for sh in shards]

    per_phase = [sum(w[i] for w in counts) / PHASE_S for i in range(len(phases))]  # updates/s, all workers
    info: dict[str, object] = {"workers": WORKERS, "floats": n, "phase_s": PHASE_S, "reps": REPS,
                               "target": "ratio_vs_bare_zmq >= 0.8"}
    lines = []
    for s in SHARDS:
        ps = statistics.median(r for r, p in zip(per_phase, phases) if p["target"] == f"ps{s}")
        bare = statistics.median(r for r, p in zip(per_phase, phases) if p["target"] == f"bare{s}")
        info[f"updates_per_s_{s}_shard"] = round(ps, 1)
        info[f"bare_updates_per_s_{s}_shard"] = round(bare, 1)
        info[f"ratio_vs_bare_zmq_{s}_shard"] = round(ps / bare, 3)
        info[f"gb_per_s_{s}_shard"] = round(ps * 2 * n * 4 / 1e9, 2)
        lines.append(f"{s} shard(s) {ps:.1f} updates/s ({ps * 2 * n * 4 / 1e9:.2f} GB/s) vs bare {bare:.1f}: {ps / bare:.2f}x")
        # Every push was applied exactly once: the timed ones plus one warm-up per worker and phase.
        pushed = sum(w[i] for w in counts for i, p in enumerate(phases) if p["target"] == f"ps{s}")
        pushed += WORKERS * sum(1 for p in phases if p["target"] == f"ps{s}")
        assert versions[s] == [pushed] * s, (versions[s], pushed)
    info["account"] = _account(phases, per_phase, cpu, shard_times, versions)
    for s in SHARDS:
        a = info["account"][f"{s}_shard"]
        lines.append(f"{s} shard(s), CPU ms per update: servers {a['ps']['server_cpu_ms']:.2f} (bare "
                     f"{a['bare']['server_cpu_ms']:.2f}), senders {a['ps']['senders_cpu_ms']:.2f} (bare "
                     f"{a['bare']['senders_cpu_ms']:.2f}), cores busy {a['ps']['cores_busy']:.2f} (bare "
                     f"{a['bare']['cores_busy']:.2f}); a shard's thread {a['shard_handle_ms']:.2f} ms per update, "
                     f"{a['shard_apply_ms']:.2f} in the kernel")
    benchmark.extra_info.update(info)
    print(f"\ncapacity, {WORKERS} simulated workers, {REPS} × {PHASE_S:g} s per side:\n  " + "\n  ".join(lines))


def _listens_on(proc: psutil.Process, endpoint: str) -> bool:
    port = int(endpoint.rsplit(":", 1)[1])
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp"))


def _account(phases: list[dict], per_phase: list[float], cpu: list[dict[str, float]],
             shard_times: dict[int, list[tuple[float, float]]], versions: dict[int, list[int]]) -> dict[str, object]:
    """Per shard count and side: CPU ms per update of the servers and of the senders, and the cores kept busy
    (medians over the side's phases); and the shards' own thread time per update (handling, of it the kernel)."""
    account: dict[str, object] = {}
    for s in SHARDS:
        entry: dict[str, object] = {}
        for side in ("ps", "bare"):
            rows = [(u, c) for u, c, p in zip(per_phase, cpu, phases) if p["target"] == f"{side}{s}" and u > 0]
            entry[side] = {
                "server_cpu_ms": round(statistics.median(c["server_s"] / (u * c["wall_s"]) for u, c in rows) * 1e3, 3),
                "senders_cpu_ms": round(statistics.median(c["senders_s"] / (u * c["wall_s"]) for u, c in rows) * 1e3, 3),
                "cores_busy": round(statistics.median((c["server_s"] + c["senders_s"]) / c["wall_s"] for _, c in rows), 2),
            }
        updates = max(versions[s])  # every shard applies every update
        entry["shard_handle_ms"] = round(max(h for h, _ in shard_times[s]) / updates * 1e3, 3)
        entry["shard_apply_ms"] = round(max(a for _, a in shard_times[s]) / updates * 1e3, 3)
        account[f"{s}_shard"] = entry
    return account

"""Run the benchmark suite and write bench/RESULTS.md and bench/auc_vs_time.png.

    python -m bench.report                  # the full suite (~20-30 min on 2 cores)
    python -m bench.report --quick          # the small versions (what CI runs), a smoke test of the report
    python -m bench.report --from-json F    # rewrite the report from an earlier --benchmark-json file
    python -m bench.report --from-json F G  # F's results with G's benchmarks in place of F's of the same name
                                            # (a benchmark re-run alone); the header names each run's commit

The suite runs as `python -m pytest bench/ --benchmark-json F`; every figure
is read back from pytest-benchmark's `extra_info`, so the report shows what
the benchmarks measured and nothing else.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_suite(json_path: Path, quick: bool, extra: list[str]) -> tuple[list[str], int]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "bench/",
           f"--benchmark-json={json_path}", *(["--quick"] if quick else []), *extra]
    print("running:", " ".join(cmd), flush=True)
    return cmd, subprocess.call(cmd, cwd=ROOT)


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b["extra_info"] for b in data["benchmarks"]}


def _f(x: Any, fmt: str = "{:.2f}", none: str = "–") -> str:
    return none if x is None else fmt.format(x)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's results with each later run's benchmarks in place of those of the same name."""
    merged = dict(runs[0])
    by_name = {b["name"]: b for b in runs[0]["benchmarks"]}
    # a file that is itself a merge keeps the runs it was made of
    sections = [dict(s, benchmarks=list(s["benchmarks"])) for s in runs[0].get("sections", [])]
    for run in runs[1:] if sections else runs:
        names = [b["name"] for b in run["benchmarks"]]
        by_name.update({b["name"]: b for b in run["benchmarks"]})
        sections.append({"benchmarks": names, "commit": run.get("commit_info", {}).get("id", "?"),
                         "dirty": bool(run.get("commit_info", {}).get("dirty")), "date": run.get("datetime", "?")[:19]})
    for section in sections[:-1]:  # a benchmark re-run later is reported from that run only
        section["benchmarks"] = [n for n in section["benchmarks"]
                                 if not any(n in later["benchmarks"] for later in sections[sections.index(section) + 1:])]
    merged["benchmarks"] = list(by_name.values())
    merged["sections"] = [s for s in sections if s["benchmarks"]]
    return merged


def _provenance(data: dict[str, Any]) -> list[str]:
    if len(data.get("sections", [])) < 2:
        return []
    return ["", "Benchmarks from separate runs:"] + [
        f"- {', '.join(s['benchmarks'])}: commit {s['commit'][:10]}"
        + (" (uncommitted changes)" if s["dirty"] else "") + f", {s['date']} UTC" for s in data["sections"]]


def write_markdown(data: dict[str, Any], command: str, out: Path, plot: Path | None) -> None:
    b = _by_name(data)
    lines = [
        "# notpu benchmark results",
        "",
        f"Machine: {os.cpu_count()} cores ({_cpu_model()}), "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"Python {platform.python_version()}, shared with other work (see load averages below).",
        f"Date: {data.get('datetime', dt.datetime.now(dt.timezone.utc).isoformat())[:19]} UTC; "
        f"commit {data.get('commit_info', {}).get('id', '?')[:10]}"
        + (" (uncommitted changes)" if data.get("commit_info", {}).get("dirty") else "") + ".",
        f"Command: `{command}`",
        *_provenance(data),
        "",
        "Every figure is a ratio of medians measured side by side in one run; absolute times on this",
        "shared 2-core machine move by ±30% from minute to minute. Targets are the project's performance goals.",
        "",
    ]
    demo = b.get("test_demo_end_to_end")
    if demo:
        lines += _demo_section(demo)
    conv = b.get("test_convergence_rules")
    if conv:
        k = conv["keras"]
        ttt = [t for t in k["time_to_target_s"] if t is not None]
        kt = statistics.median(ttt) if ttt else None  # as the benchmark computes its speed-ups
        lines += [
            "## The talk's table",
            "",
            f"{conv['players']:,} generated players, {conv['days']} days, GRU {conv['hidden']}, {conv['epochs']} epochs, "
            f"batch 64. Score = test ROC AUC of the final model. Time = seconds from start (start-up included) "
            f"to a val AUC of {conv['target_val_auc']:.4f} = {conv['target_fraction']:.0%} of plain Keras' final "
            f"val AUC, then the whole run's wall time. Speed-up = plain Keras' time to the target / the rule's.",
            "",
            "| type | workers | rule | score (test AUC) | Δ AUC | time to target (s) | wall (s) | samples/s | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| plain Keras | 1 × {k['threads']} threads | Adam | {k['test_auc']:.4f} | – | "
            f"{' / '.join(_f(t, '{:.1f}') for t in k['time_to_target_s'])} | {' / '.join(_f(w, '{:.1f}') for w in k['wall_s'])} | "
            f"{' / '.join(_f(s, '{:.0f}') for s in k['samples_per_s'])} | 1.00 |",
        ]
        for rule, r in conv["rules"].items():
            lines.append(f"| notpu | {r['workers']} × 1 thread | {rule} | {r['test_auc']:.4f} | {r['auc_delta']:+.4f} | "
                         f"{_f(r['time_to_target_s'], '{:.1f}', 'not reached')} | {r['wall_s']:.1f} | "
                         f"{r['samples_per_s']:.0f} | {_f(r['speedup_time_to_auc'])} |")
        ran = "first and last (the two figures in its row)" if len(k["wall_s"]) > 1 else "once"
        free = [t for t in k.get("time_to_target_without_eval_s", []) if t is not None]
        lines += ["", f"Plain Keras ran {ran}; its time to target is the median ({_f(kt, '{:.1f}')} s). It evaluates "
                      f"in line, pausing training ({' / '.join(_f(e, '{:.1f}') for e in k.get('eval_s', []))} s in "
                      f"all), where notpu's evaluator shares the cores with the workers. Without its evaluation time "
                      f"plain Keras reaches the target in {' / '.join(_f(t, '{:.1f}') for t in free) or '–'} s; "
                      f"speed-ups against that: " + ", ".join(
                          f"{r} {_f(v.get('speedup_vs_keras_without_eval'))}" for r, v in conv["rules"].items()) + ".",
                  "Start-up (time to the first evaluation, TensorFlow import included): plain "
                  f"{' / '.join(_f(t, '{:.1f}') for t in k.get('first_eval_s', []))} s, rules "
                  + ", ".join(f"{r} {_f(v.get('first_eval_s'), '{:.1f}')}" for r, v in conv["rules"].items()) + " s.",
                  "Load average (1 min) at the end of each run: plain "
                  f"{k['loadavg']}, " + ", ".join(f"{r} {v['loadavg']}" for r, v in conv["rules"].items()) + ".",
                  "Target: speedup_time_to_auc ≥ 1.3."]
        if conv.get("errors"):
            lines += ["", "Runs that failed: " + "; ".join(f"{r}: {e}" for r, e in conv["errors"].items())]
        if plot is not None:
            lines += ["", f"![val AUC against wall time]({plot.name})"]
        lines.append("")

    sm = b.get("test_samples_to_target")
    if sm:
        lines += _samples_section(sm)
    bk = b.get("test_buckets_daily_vs_weekly", {}).get("buckets")
    if bk:
        lines += _buckets_section(bk)
    fz = [b[n]["fuzz"] for n in ("test_fuzz_at_scale[plain]", "test_fuzz_at_scale[curve]") if "fuzz" in b.get(n, {})]
    if fz:
        lines += _fuzz_section(fz)
    sk = b.get("test_soak", {}).get("soak")
    if sk:
        lines += _soak_section(sk)
    t = b.get("test_transport_round_trip")
    if t:
        lines += [
            "## Transport: push+pull of the talk's model through one shard",
            "",
            f"{t['floats']:,} float32 (9.8 MB) each way over TCP loopback, client in the benchmark process, "
            f"shard and bare echo each in their own process; median of {t['rounds']} interleaved rounds.",
            "",
            "| | ms | × bare zmq |",
            "| --- | --- | --- |",
            f"| `Client.push(delta, pull=True)` (the reply's centre as a view, no copy) | {t['push_pull_ms']:.2f} | "
            f"**{t['ratio_vs_bare_zmq']:.2f}** |",
            f"| `push(delta)` then `pull()` | {t['push_then_pull_ms']:.2f} | {t['ratio_separate_vs_bare_zmq']:.2f} |",
            f"| bare pyzmq DEALER → ROUTER echo | {t['bare_zmq_ms']:.2f} | 1.00 |",
            *([f"| co-located worker, shared memory: delta computed in the push area, the new centre used in the "
               f"reply area | {t['shm_push_pull_ms']:.2f} | **{t['shm_ratio_vs_bare_tcp']:.2f}** |",
               *([f"| the same, the new centre copied out into the worker's buffer | {t['shm_out_push_pull_ms']:.2f} | "
                  f"{t['shm_out_ratio_vs_bare_tcp']:.2f} |"] if "shm_out_push_pull_ms" in t else []),
               f"| the same, delta copied in | {t['shm_copy_push_pull_ms']:.2f} | "
               f"{t['shm_copy_ratio_vs_bare_tcp']:.2f} |",
               f"| two memcpys of the vector | {t['two_memcpys_ms']:.2f} | "
               f"{t['two_memcpys_ms'] / t['bare_zmq_ms']:.2f} |"] if "shm_push_pull_ms" in t else []),
            "",
            f"Overhead {t['overhead_ms']:.2f} ms per round trip over TCP; alone, the shard's kernel pass takes "
            f"{t['kernel_ms']:.2f} ms and a copy of the vector {t['copy_ms']:.2f} ms. "
            + (f"Shared memory: {t['ratio_vs_memcpy']:.2f}× two memcpys. " if "ratio_vs_memcpy" in t else "")
            + "Targets: ratio_vs_bare_zmq ≤ 1.10, shm_ratio_vs_bare_tcp ≤ 0.25, ratio_vs_memcpy ≤ 4.",
            "",
        ]
    wt, wc = b.get("test_transport_half_precision_wire"), b.get("test_transport_wire_convergence")
    if wt or wc:
        lines += ["## Half-precision wire between hosts", ""]
    if wt:
        lines += [
            f"Push+pull of {wt['floats']:,} floats between two network namespaces joined by a veth pair shaped with "
            f"tc tbf; median of {wt['rounds']} rounds per cell; pushes carry the worker's rounding residual "
            f"(error feedback), the centre stays float32.",
            "",
            "| link | float32 (ms) | float16 (ms) | bfloat16 (ms) | float16 × float32 | bfloat16 × float32 |",
            "| --- | --- | --- | --- | --- | --- |",
            *[f"| {rate.replace('gbit', ' Gbit/s').replace('mbit', ' Mbit/s')} | {wt[f'{rate}_float32_ms']:.0f} | "
              f"{wt[f'{rate}_float16_ms']:.0f} | {wt[f'{rate}_bfloat16_ms']:.0f} | "
              f"**{wt[f'{rate}_float16_vs_float32']:.2f}** | {wt[f'{rate}_bfloat16_vs_float32']:.2f} |"
              for rate in ("1gbit", "100mbit") if f"{rate}_float32_ms" in wt],
            "",
        ]
    if wc:
        lines += [
            "The default run (3,000 generated players, 2 workers in the other namespace, one run per wire), test AUC: "
            + ", ".join(f"{w} {wc[f'test_auc_{w}']:.4f}" for w in ("float32", "float16", "bfloat16")
                        if f"test_auc_{w}" in wc)
            + ". Target: a half-precision wire loses at most 0.005.",
            "",
        ]
    c = b.get("test_capacity_eight_workers")
    if c:
        lines += [
            f"## Capacity: {c['workers']} simulated workers (no compute), push+pull as fast as they can",
            "",
            f"{c['reps']} × {c['phase_s']:g} s per side, sides alternating; the same {c['workers']} processes against "
            f"bare echo servers splitting the bytes the same way.",
            "",
            "| shards | updates/s | GB/s (both ways) | bare zmq updates/s | ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for s in (1, 2):
            if f"updates_per_s_{s}_shard" in c:
                lines.append(f"| {s} | {c[f'updates_per_s_{s}_shard']:.1f} | {c[f'gb_per_s_{s}_shard']:.2f} | "
                             f"{c[f'bare_updates_per_s_{s}_shard']:.1f} | **{c[f'ratio_vs_bare_zmq_{s}_shard']:.2f}** |")
        lines += ["", "Target: ratio_vs_bare_zmq ≥ 0.8.", ""]
        acc = c.get("account")
        if acc:
            lines += [
                "Where the time goes: CPU milliseconds per update (user + system, from /proc at each phase's "
                "edges; medians over phases) of the servers (coordinator and shards, or the echo processes) and of "
                "the 8 senders, the cores they kept busy together, and a shard's own thread time per update "
                "(a request from receipt to the reply handed to ZeroMQ; of it, the update kernel).",
                "",
                "| shards | servers, PS | servers, bare | senders, PS | senders, bare | cores busy, PS | "
                "cores busy, bare | shard thread | of it kernel |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for s in (1, 2):
                a = acc.get(f"{s}_shard")
                if a:
                    lines.append(f"| {s} | {a['ps']['server_cpu_ms']:.2f} | {a['bare']['server_cpu_ms']:.2f} | "
                                 f"{a['ps']['senders_cpu_ms']:.2f} | {a['bare']['senders_cpu_ms']:.2f} | "
                                 f"{a['ps']['cores_busy']:.2f} | {a['bare']['cores_busy']:.2f} | "
                                 f"{a['shard_handle_ms']:.2f} | {a['shard_apply_ms']:.2f} |")
            lines.append("")
    ks = [v for n, v in b.items() if n.startswith("test_kernel_vs_numpy")]
    if ks:
        lines += [
            f"## Kernels on {ks[0]['floats']:,} floats against numpy",
            "",
            "numpy computes the same results (new centre and the float64 norm and finiteness of the update) the "
            "obvious way with `out=` buffers; 'op only' leaves the check out.",
            "",
            "| kernel | ms | GB/s | numpy ms | GB/s | × numpy | numpy op only ms | × op only |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in ks:
            lines.append(f"| {v['kernel']} | {v['kernel_ms']:.3f} | {v['kernel_gb_per_s']:.1f} | {v['numpy_ms']:.3f} | "
                         f"{v['numpy_gb_per_s']:.1f} | **{v['ratio_vs_numpy']:.2f}** | {v['numpy_op_only_ms']:.3f} | "
                         f"{v['ratio_vs_numpy_op_only']:.2f} |")
        lines.append("")
    ov = [v for n, v in b.items() if n.startswith(("test_overhead_one_worker", "test_overhead_overlap_between_hosts"))]
    if ov:
        lines += [
            "## Overhead: one worker through the PS against plain Keras",
            "",
            "Same model, data, batches and threads, trained block by block in turn in one process; DOWNPOUR λ = 5. "
            "With overlap (`--overlap`), a third copy's exchange runs beside its next window's steps (its own "
            "server); gain = its samples/s ÷ the plain exchange's. Link: loopback (the server on the same host, "
            "blocks of 2 windows), or the worker in another network namespace behind a veth pair shaped to that "
            "rate (blocks of 4 windows; the last exchange of a block is waited for in the block).",
            "",
            "| GRU | floats | link | threads | blocks | through the PS (samples/s) | plain Keras (samples/s) | ratio | "
            "ms per exchange | with overlap (samples/s) | ratio | overlap gain |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in ov:
            overlap = (f"{v['overlap_samples_per_s']:.0f} | {v['overlap_ratio_vs_keras']:.3f} | "
                       f"**{v['overlap_gain']:.3f}**" if "overlap_gain" in v else "– | – | –")
            lines.append(f"| {v['hidden']} | {v['floats']:,} | {v.get('link', 'loopback')} | {v['threads']} | "
                         f"{v.get('blocks', '–')} | "
                         f"{v['ps_samples_per_s']:.0f} | {v['keras_samples_per_s']:.0f} | **{v['ratio_vs_keras']:.3f}** | "
                         f"{v['exchange_ms']:.1f} | {overlap} |")
        lines += ["", "Target: ratio_vs_keras ≥ 0.97 on loopback (GRU 512, the talk's model: `ratio_vs_keras_talk`); "
                      "across a link the rows show what overlap wins back. (ms per "
                      "exchange is the difference of two noisy medians; a negative value means it was lost in the "
                      "noise.)", ""]
    tw = b.get("test_overhead_two_workers_talk")
    if tw:
        lines += [f"At the talk's size (GRU {tw['hidden']}, {tw['features']} features), one epoch each, in turn: "
                  f"`notpu train --workers 2 --rule adag` {tw['notpu_samples_per_s']:.1f} samples/s against one plain "
                  f"Keras process with {tw['threads']} threads {tw['keras_samples_per_s']:.1f}: **{tw['speedup']:.2f}×** "
                  f"(test AUC {tw['notpu_test_auc']:.4f} and {tw['keras_test_auc']:.4f} after one epoch of "
                  f"2,000 players, about 20 steps: a speed figure, not a trained model).", ""]
    be = [v["backends"] for n, v in b.items() if n.startswith("test_backend_steps") and "backends" in v]
    if be:
        lines += _backends_section(be)
    st = b.get("test_staleness_histograms")
    if st:
        lines += [
            "## Staleness",
            "",
            "Pushes per staleness (bin k: the shard had applied k other updates since this worker's pull), summed "
            f"over workers, from the shards' counts. 2 workers: the runs above; 4 workers: "
            f"{st['epochs_4_workers']} epoch per rule.",
            "",
            "| rule | workers | mean | histogram (bin 0, 1, 2, …) |",
            "| --- | --- | --- | --- |",
        ]
        for v in st["staleness"].values():
            lines.append(f"| {v['rule']} | {v['workers']} | {v['mean']:.2f} | {' '.join(map(str, v['histogram']))} |")
        lines += ["", "AEASGD and EAMSGD never pull the centre: the shard computes E = α(W − C) against its "
                      "current centre, and the version in its reply is the one the worker has then seen, so their "
                      "staleness counts the other workers' pushes since their own last exchange. EASGD and averaging "
                      "are synchronous rounds: always 0."]
        lines.append("")
    p = b.get("test_prepare_throughput")
    if p:
        lines += [
            "## prepare",
            "",
            f"{p['events']:,} events: {p['events_per_s']:,} events/s, peak RSS {p['peak_rss_mb']} MiB; "
            f"plain pandas {p['pandas_s']} s (peak {p['pandas_peak_rss_mb']} MiB): **{p['ratio_vs_pandas']}×**.",
            "",
        ]
    sp = b.get("test_spark_prepare_throughput")
    if sp:
        lines += [
            "## prepare on Spark",
            "",
            f"{sp['events']:,} events, `--engine spark --master {sp['master']}` against the local path in one run: "
            f"local {sp['local_s']} s ({sp['local_events_per_s']:,} events/s), Spark {sp['spark_s']} s "
            f"({sp['spark_events_per_s']:,} events/s, its JVM's start included): **{sp['spark_vs_local']}×** the "
            "local speed; both outputs equal. On one machine the local engine is the one to use; Spark is for "
            "logs that outgrow it or already live on a cluster.",
            "",
        ]
    sp = b.get("test_spark_predict_throughput")
    if sp:
        lines += _spark_predict_section(sp)
    defaults = HERE / "defaults.md"  # hand-written: the measurements behind each default, named in the code
    if defaults.is_file():
        lines += [defaults.read_text().rstrip(), ""]
    out.write_text("\n".join(lines))


def _samples_section(sm: dict[str, Any]) -> list[str]:
    """bench/test_bench_samples.py: samples to the target per rule × workers, as a ratio to plain Keras'."""
    k, workers = sm["keras"], [str(n) for n in sm["workers"]]
    head = "| rule | " + " | ".join(f"{n} worker{'s' if n != '1' else ''}" for n in workers) + " |"
    rule_line = "| --- |" + " --- |" * len(workers)

    def cell(rule: str, n: str) -> str:
        run = sm["runs"].get(rule, {}).get(n)
        if run is None:
            return "failed" if f"{rule}-{n}" in sm.get("errors", {}) else "–"
        ratio = sm["samples_ratio_vs_keras"].get(rule, {}).get(n)
        if ratio is None and run["samples_to_target"] is None:
            return f"not reached (best {run['best_val_auc']:.4f})"
        if ratio is None:  # plain Keras was at the target before it trained (a tiny --quick model)
            return f"– ({run['samples_to_target']:,.0f})"
        return f"**{ratio:.2f}** ({run['samples_to_target']:,.0f})"

    lines = [
        "## Statistical efficiency: samples to the target past 2 workers",
        "",
        f"{sm['players']:,} generated players, {sm['days']} days, GRU {sm['hidden']}, {sm['epochs']} epochs, batch 64; "
        f"each rule with its default settings, 1 thread per worker. Figure = training samples (over all workers) "
        f"until the centre's val AUC reaches {sm['target_val_auc']:.4f} = {sm['target_fraction']:.0%} of plain "
        f"Keras' final val AUC, {sm['interpolation']}, divided by plain Keras' samples to the same target "
        f"({_f(k['samples_to_target'], '{:,.0f}')} of {k['samples']:,}; 1 process × {k['threads']} threads, "
        f"val AUC {k['val_auc']:.4f}, test AUC {k['test_auc']:.4f}). Samples to target in parentheses. Wall time is "
        f"not the figure: up to 8 workers share the 2 cores.",
        "",
        head, rule_line,
        *(f"| {rule} | " + " | ".join(cell(rule, n) for n in workers) + " |" for rule in sm["rules"]),
        "",
        "Final test AUC of each run (plain Keras " + f"{k['test_auc']:.4f}):",
        "",
        head, rule_line,
        *(f"| {rule} | " + " | ".join(_f(sm["runs"].get(rule, {}).get(n, {}).get("test_auc"), "{:.4f}")
                                      for n in workers) + " |" for rule in sm["rules"]),
        "",
        f"Evaluations every {sm['eval_interval_s']:g} s: plain Keras every {_f(k['samples_between_evals'], '{:,.0f}')} "
        f"samples (median), the rules every " + ", ".join(
            f"{rule} " + "/".join(_f(sm["runs"].get(rule, {}).get(n, {}).get("samples_between_evals"), "{:,.0f}")
                                  for n in workers) for rule in sm["rules"]) + f" (at {'/'.join(workers)} workers). "
        "notpu's samples come from the workers' heartbeats, read after each evaluation: read a figure as ± about "
        "1 s plus one evaluation of training (see bench/test_bench_samples.py).",
    ]
    lost = [f"{rule} × {n}: {run['lost_workers']}" for rule, per in sm["runs"].items() for n, run in per.items()
            if run.get("lost_workers")]
    if lost:
        lines.append("Runs that lost workers: " + "; ".join(lost) + ".")
    met = [rule for rule in sm["rules"] if (x := sm["samples_ratio_vs_keras"].get(rule, {}).get("8")) is not None
           and x <= 1.5]
    lines.append("Goal: the rule the README recommends needs ≤ 1.5× plain Keras' samples at 8 workers"
                 + (f"; within it at 8 workers: {', '.join(met) or 'none'}." if "8" in workers else "."))
    if sm.get("errors"):
        lines += ["", "Runs that failed: " + "; ".join(f"{r}: {e}" for r, e in sm["errors"].items())]
    return lines + [""]



def _backends_section(runs: list[dict[str, Any]]) -> list[str]:
    """bench/test_bench_backends.py: a worker's local samples/s per Keras backend, threads and way of driving it."""
    first = runs[0]
    windows = first["windows"]
    lines = [
        "## Keras backends: a worker's local steps",
        "",
        f"Each cell (backend × threads) is its own process; all of a model's cells start together, then "
        f"round-robin rounds ask each in turn for one timing per mode (medians). Batches of {first['batch']}, the "
        f"same made-up data and starting weights in every cell. `train_on_batch`: today's path, "
        f"λ = {first['window']} calls each followed by `float(loss)`; one call, λ = n: the n steps of a window in "
        "one compiled call (TensorFlow a `tf.function` loop, JAX `jax.lax.scan` over Keras' stateless API, PyTorch "
        "the plain loop); exchange: `flatten(get_weights())` + `set_weights(unflatten(...))`, once per window. "
        f"In parentheses: × {_BACKEND_LABELS.get(first['reference'], first['reference'])} `train_on_batch` at the "
        "same threads, same model. Cores: CPU ÷ wall "
        "seconds of `train_on_batch` / of the longest one-call window.",
        "",
    ]
    head = ("| backend | threads | train_on_batch (samples/s) | "
            + " | ".join(f"one call, λ = {n} (samples/s)" for n in windows)
            + " | exchange (ms) | cores | set-up (s) | loss before training |")
    for f in runs:
        lines += [f"### {_backends_model(f)}", "", f"{f['rounds']} round{'s' if f['rounds'] != 1 else ''}; load "
                  f"average {f['loadavg'][0]} at the start, {f['loadavg'][-1]} at the end.", "",
                  head, "|" + " --- |" * (7 + len(windows))]
        for c in f["cells"].values():
            sps, ratio = c["samples_per_s"], c["ratio_vs_tf"]
            modes = ["train_on_batch", *(f"window{n}" for n in windows)]
            cells = " | ".join(_backends_rate(sps.get(m), ratio.get(m)) for m in modes)
            cores = " / ".join(_f(c["cores"].get(m)) for m in (modes[0], modes[-1]))
            lines.append(f"| {_BACKEND_LABELS.get(c['backend'], c['backend'])} | {c['threads']} | {cells} | "
                         f"{c['exchange_ms']:.2f} | {cores} | {c['first_steps_s'] + c['compile_s']:.1f} | "
                         f"{c['check_loss']:.7f} |")
        lines.append("")
        if f.get("errors"):
            lines += ["Cells that failed: " + "; ".join(f"{k}: {e[:300]}" for k, e in f["errors"].items()), ""]
    missing = {b: why for f in runs for b, why in sorted(f.get("unavailable", {}).items(),
                                                          key=lambda kv: list(_BACKEND_LABELS).index(kv[0]))}
    methods = {f"{_BACKEND_LABELS.get(c['backend'], c['backend'])} × {c['threads']}": c["thread_method"]
               for f in runs for c in f["cells"].values()}
    if missing:
        lines += ["not installed: " + ", ".join(f"{_BACKEND_LABELS.get(b, b)} ({why})" for b, why in missing.items()),
                  ""]
    lines += ["Threads: " + "; ".join(f"{k}: {v}" for k, v in methods.items()) + ".",
              "Set-up: the first steps and each window's compilation, while all the model's cells started at once. "
              "Loss before training: the same weights and first batch in every cell (inference mode); spread "
              + ", ".join(f"{_backends_model(f)} {_f(f['check_loss_spread'], '{:.1e}')}" for f in runs) + ".", ""]
    return lines


_BACKEND_LABELS = {"tensorflow": "TensorFlow", "tensorflow-xla": "TensorFlow + XLA", "jax": "JAX", "torch": "PyTorch"}


def _backends_model(f: dict[str, Any]) -> str:
    what = f"GRU {f['hidden']}" if f["kind"] == "gru" else "user Conv1D"
    return f"{what} on {f['steps']} × {f['features']} ({_f(f['floats'], '{:,}')} floats)"


def _backends_rate(sps: float | None, ratio: float | None) -> str:
    if sps is None:
        return "–"
    r = _f(ratio, "{:.2f}×")
    return f"{sps:,.0f} ({f'**{r}**' if ratio is not None and ratio >= 1.1 else r})"


def _spark_predict_section(sp: dict[str, Any]) -> list[str]:
    """bench/test_bench_spark_predict.py: scoring customers, local `notpu predict` against Spark."""
    return [
        "## Scoring customers: local against Spark",
        "",
        f"{sp['customers']:,} customers ({sp['events']:,} events of {sp['players']:,} generated players) scored by the "
        f"default GRU, each engine as `notpu predict` from the interpreter's start to its exit (TensorFlow's import "
        f"and Spark's JVM included), on this one machine; the scores equal per id (max abs difference "
        f"{sp['max_abs_diff']:.1g}).",
        "",
        "| engine | seconds | customers/s | customers/s per core |",
        "| --- | --- | --- | --- |",
        f"| local (1 process, {sp['local_cores']} TensorFlow threads) | {sp['local_s']} | "
        f"{sp['local_customers_per_s']:,} | {sp['local_customers_per_s_per_core']:,} |",
        f"| Spark `{sp['master']}` | {sp['spark_s']} | {sp['spark_customers_per_s']:,} | "
        f"{sp['spark_customers_per_s_per_core']:,} |",
        f"| the talk: 10,000 customers a minute | – | {sp['talk_customers_per_s']} | – |",
        "",
        f"Spark / local speed: **{sp['spark_vs_local']}×** (load average {sp['load_1min']} at the end). On one "
        "machine the local engine is the one to use; Spark scores logs that live on a cluster or outgrow a machine.",
        "",
    ]


def _demo_section(d: dict[str, Any]) -> list[str]:
    """bench/test_bench_demo.py: `notpu demo` end to end, the figures README.md quotes."""
    return [
        "## The demo",
        "",
        f"`{d['command']}` from the interpreter's start to its exit: {d['players']:,} generated players "
        f"({d['customers']:,} customers after the newcomer filter), log generated, prepared, the baseline fitted, "
        f"the GRU trained ({d['gru']}) and the report drawn, in **{d['wall_s']:.0f} s** "
        f"(training {d['train_wall_s']:.0f} s of it, {d['samples_per_s']:,.0f} samples/s; load average "
        f"{d['load_1min']} at the end). Test AUC: baseline **{d['baseline_test_auc']:.4f}**, "
        f"GRU **{d['gru_test_auc']:.4f}**. The run's report:",
        "",
        "![notpu demo's report.png](demo_report.png)",
        "",
    ]


def _buckets_section(bk: dict[str, Any]) -> list[str]:
    """bench/test_bench_buckets.py: daily against weekly time steps, time to the target and test AUC."""
    lines = [
        "## Daily against weekly time steps on a retail log",
        "",
        f"{bk['customers']:,} generated retail customers ({_f(bk.get('kept'), '{:,}')} kept), "
        f"a {bk['window_days']}-day window prepared twice: one time step a day (`--bucket-days 1`) and one a week (`--bucket-days 7`); same "
        f"customers, labels and split. GRU {bk['hidden']}, {bk['epochs']} epochs, batch 64; plain Keras with all "
        f"{bk['cores']} cores, the PS with {bk['workers']} workers and {bk['rule']} at its defaults. Time = seconds "
        f"from start (start-up included) to a val AUC of {_f(bk['target'], '{:.4f}')} = {bk['target_fraction']:.0%} "
        f"of the best final val AUC of the four runs, then the whole run's wall time.",
        "",
        "| training | workers | steps | time to target (s) | wall (s) | val AUC | test AUC |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in bk["runs"].values():
        threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
        days = f"{r['bucket_days']} day{'s' if r['bucket_days'] != 1 else ''}"
        lines.append(f"| {r['training']} | {r['workers']} × {threads} | {r['steps']} × {days} | "
                     f"{_f(r['time_to_target_s'], '{:.1f}', 'not reached')} | {r['wall_s']:.1f} | "
                     f"{r['val_auc']:.4f} | {r['test_auc']:.4f} |")
    sp, wall = bk["speedup_weekly_over_daily"], bk["wall_ratio_daily_over_weekly"]
    lines += [
        "",
        "Speed-up of weekly over daily steps (daily time to target / weekly): plain Keras "
        f"{_f(sp.get('keras'), '**{:.2f}×**')}, PS {_f(sp.get('ps'), '**{:.2f}×**')}; wall time daily / weekly: "
        f"plain Keras {_f(wall.get('keras'), '{:.2f}×')}, PS {_f(wall.get('ps'), '{:.2f}×')}. A week a step reads "
        f"a seventh of the sequence, so each epoch costs about a seventh of the GRU's work; the figure says how much "
        f"sooner that reaches the same quality, and the test AUCs whether anything is lost by aggregating the days of a "
        f"week. A PS run's final evaluation counts at its wall time; a speed-up is '–' when a run never reached "
        f"the target.",
    ]
    if bk.get("errors"):
        lines += ["", "Runs that failed: " + "; ".join(f"{r}: {e}" for r, e in bk["errors"].items())]
    return lines + [""]


def _fuzz_section(runs: list[dict[str, Any]]) -> list[str]:
    """bench/test_bench_fuzz.py: malformed and hostile messages to a shard and the coordinator."""
    lines = [
        "## Fuzzing at scale",
        "",
        "Malformed or hostile messages (tests/integration/fuzzing.py: random bytes, truncated and bit-flipped "
        "headers, wrong frame counts, sizes, versions and field types, unknown ops, NaN/Inf deltas, frames above "
        "MAXMSGSIZE) to shard 0 and the coordinator of `pserver start --shards 2`, one in flight per socket. "
        "Every message that expects an answer got one error reply, counted by the endpoint; both processes alive and "
        "not restarted; the centre's checksum unchanged. RSS growth: each shard, after the first messages, to the end.",
        "",
        "| CurveZMQ | messages | to shard / coordinator | seconds (messages alone) | messages/s | shard RSS growth (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in runs:
        growth = ", ".join(f"{k}: {v:+.2f}" for k, v in f["rss_growth_mib"].items())
        lines.append(f"| {'yes' if f['curve'] else 'no'} | {f['messages']:,} | {f['to_shard']:,} / "
                     f"{f['to_coordinator']:,} | {f['seconds']:.1f} ({f['loop_seconds']:.1f}) | "
                     f"{f['messages_per_s']:.0f} | {growth} |")
    return lines + [""]


def _soak_section(sk: dict[str, Any]) -> list[str]:
    """bench/test_bench_soak.py: a long run with workers and a shard killed, against an undisturbed one."""
    d, u = sk["disturbed"], sk["undisturbed"]
    lines = [
        "## Soak",
        "",
        f"{sk['workers']} workers × 1 thread, {sk['shards']} shards, ADAG, GRU {sk['hidden']} on "
        f"{sk['players']:,} generated players × {sk['days']} days; the disturbed run lasts {d['duration_s']:.0f} s "
        f"with a random worker SIGKILLed and restarted with its rank every {sk['kill_every_s']:.0f} s and shard 1's "
        f"process SIGKILLed once (restarted from its checkpoint by `pserver start`); the undisturbed run "
        f"{u['duration_s']:.0f} s. Test AUC of each run's best centre: disturbed {d['test_auc']:.4f}, undisturbed "
        f"{u['test_auc']:.4f} (Δ {sk['auc_delta']:+.4f}).",
        "",
        "| kill | at (s) | recovered in (s) |",
        "| --- | --- | --- |",
        *[f"| {r['what']} | {r['at_s']:.0f} | {r['recovery_s']:.1f} |" for r in d["recoveries"]],
        "",
        "| run | shard | RSS (MiB) | growth (MiB) over (s) | slope (MiB/h) | processes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in (("disturbed", d), ("undisturbed", u)):
        for k, s in run["shards"].items():
            lines.append(f"| {name} | {k} | {_f(s['rss_start_mib'], '{:.1f}')} → {_f(s['rss_end_mib'], '{:.1f}')} | "
                         f"{s['rss_growth_mib']:+.2f} over {s['span_s']:.0f} | {s['rss_slope_mib_per_h']:+.2f} | "
                         f"{s['processes']} |")
    return lines + ["", "Recovery: a worker's, from the kill to its restarted process's first update (TensorFlow's "
                        "import included); the shard's, from the kill to the restored shard's first new update. The "
                        "slope is over each shard's longest-lived process after its first minute.", ""]


def write_plot(data: dict[str, Any], out: Path) -> bool:
    conv = _by_name(data).get("test_convergence_rules")
    if not conv or not conv.get("curves"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colours = plt.get_cmap("tab10")
    for i, (name, pts) in enumerate(sorted(conv["curves"].items(), key=lambda kv: kv[0] != "keras")):
        if not pts:
            continue
        xs, ys = zip(*pts)
        if name == "keras":
            ax.plot(xs, ys, color="black", lw=2.5, ls="--", marker="o", ms=3,
                    label=f"plain Keras, 1 × {conv['keras']['threads']} threads")
        else:
            ax.plot(xs, ys, color=colours(i - 1), lw=1.6, marker=".", ms=4, label=f"{name}, 2 workers × 1 thread")
    ax.axhline(conv["target_val_auc"], color="grey", lw=1, ls=":")
    ax.text(ax.get_xlim()[1], conv["target_val_auc"], f" target {conv['target_val_auc']:.3f}", va="center",
            ha="right", fontsize=8, color="grey", backgroundcolor="white")
    lo = min(y for pts in conv["curves"].values() for _, y in pts[1:] or pts)
    ax.set_ylim(max(lo - 0.01, 0.5), None)
    ax.set_xlabel("wall time since start (s), start-up included")
    ax.set_ylabel("validation ROC AUC")
    ax.set_title(f"val AUC against time, GRU {conv['hidden']}, {conv['players']:,} players, {conv['epochs']} epochs, "
                 f"{os.cpu_count()} cores")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("--quick", action="store_true", help="run the small versions")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="do not run; report these --benchmark-json files (later ones replace benchmarks of the same name)")
    p.add_argument("--json", default=str(HERE / "results.json"), help="where pytest-benchmark writes its JSON")
    p.add_argument("--out", default=str(HERE), help="directory for RESULTS.md and auc_vs_time.png")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the command shown with --from-json
    args, extra = p.parse_known_args(argv)
    if args.from_json:
        json_path = Path(args.from_json[0])
        command = args.command or "python -m bench.report"
        code = 0
    else:
        json_path = Path(args.json)
        cmd, code = run_suite(json_path, args.quick, extra)
        command = "python -m bench.report" + (" --quick" if args.quick else "") + f"  (ran: {' '.join(cmd[1:])})"
        if not json_path.is_file():
            print(f"the suite wrote no {json_path} (exit {code})", file=sys.stderr)
            return code or 1
    data = json.loads(json_path.read_text())
    if args.from_json and len(args.from_json) > 1:
        data = merge([data] + [json.loads(Path(f).read_text()) for f in args.from_json[1:]])
        Path(args.json).write_text(json.dumps(data, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "auc_vs_time.png"
    has_plot = write_plot(data, plot)
    write_markdown(data, command, out / "RESULTS.md", plot if has_plot else None)
    print(f"wrote {out / 'RESULTS.md'}" + (f" and {plot}" if has_plot else ""))
    return code


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python bench/report.py`: make `bench` importable as a package
        sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""`pserver`: start a parameter server, or read its statistics.

    pserver start --port 5555 --shards 2 --workers 4 --rule adag
    pserver stats 127.0.0.1:5555 [--json]

The command line builds the same `ServerConfig` the Python API takes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from optimizers import RECOMMENDED_RULE, RULES, rule_config
from pserver.client import Client, ClientConfig
from pserver.errors import NotpuError
from pserver.server import ServerConfig, run_server
from pserver.stats import histogram_summary, mean_staleness

log = logging.getLogger(__name__)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options that describe the run; shared with `notpu train`."""
    p.add_argument("--rule", default=RECOMMENDED_RULE,
                   help=f"{', '.join(RULES)} (default {RECOMMENDED_RULE})")
    p.add_argument("--window", type=int, default=None, help="λ, local steps between exchanges (default: the rule's)")
    p.add_argument("--alpha", type=float, default=None, help="elastic coefficient of the EASGD family (default: the rule's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64, help="GRU width (the talk's model: 512)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="the rate one plain Keras process would use (default: Adam 0.001, SGD 0.01); the rule scales "
                        "it: ADAG × λ, the elastic rules and averaging × workers")


def run_config_from(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    cfg = rule_config(args.rule, args.window, args.alpha, args.learning_rate, workers)
    cfg.update(epochs=int(args.epochs), batch_size=int(args.batch_size), hidden=int(args.hidden))
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or cfg["hidden"] < 1:
        raise NotpuError("--epochs, --batch-size and --hidden must be positive")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pserver", description="notpu's ZeroMQ parameter server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("start", help="run a coordinator and its shards in the foreground")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=5555, help="the coordinator's port; 0 picks a free one")
    s.add_argument("--shards", type=int, default=1, help="shard processes (default 1)")
    s.add_argument("--workers", type=int, default=1, help="world size: how many workers will join")
    add_run_options(s)
    s.add_argument("--max-message-mb", type=float, default=2048, help="ZeroMQ drops peers sending larger frames")
    s.add_argument("--max-delta-norm", type=float, default=0.0, help="refuse updates with a larger L2 norm (0: off)")
    s.add_argument("--round-timeout-s", type=float, default=60.0,
                   help="a synchronous round closes without missing workers after this long")
    s.add_argument("--worker-timeout-s", type=float, default=0.0, help="declare a silent worker lost (0: never)")
    s.add_argument("--ready-file", default=None, help="write {address, pid} here as JSON once ready")
    s.add_argument("--exit-when-done", action="store_true", help="stop once every worker is done or lost")
    s.add_argument("--insecure", action="store_true", help="allow binding a non-loopback address without keys")
    s.add_argument("--keys", default=None, metavar="DIR",
                   help="CurveZMQ: encrypt, and admit only the public keys in DIR/allowed (see `pserver keys`)")
    s.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="shards save their slice here; a shard that dies is restarted from it")
    s.add_argument("--checkpoint-every-s", type=float, default=30.0, help="seconds between checkpoints (default 30)")
    s.add_argument("--restore", default=None, metavar="DIR", help="resume the model and every shard from DIR")
    s.add_argument("--max-delta-norm-factor", type=float, default=0.0,
                   help="refuse updates whose norm exceeds F × the running median of recent ones (0: off)")
    s.add_argument("--max-staleness", type=int, default=-1,
                   help="SSP: a worker more than K updates ahead of the slowest live one waits (-1: off)")
    s.set_defaults(handler=cmd_start)

    k = sub.add_parser("keys", help="create a server key pair and worker key pairs for --keys")
    k.add_argument("dir", help="directory to create (server.key*, workers/, allowed/)")
    k.add_argument("--workers", type=int, default=1, help="worker key pairs to create (default 1)")
    k.set_defaults(handler=cmd_keys)

    t = sub.add_parser("stats", help="print per-shard versions, updates, bytes, refusals and staleness")
    t.add_argument("address", help="the coordinator's host:port")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.add_argument("--timeout-s", type=float, default=5.0)
    t.set_defaults(handler=cmd_stats)
    return parser


def cmd_start(args: argparse.Namespace) -> int:
    config = ServerConfig(
        host=args.host, port=args.port, shards=args.shards, workers=args.workers,
        run=run_config_from(args, args.workers),
        max_message_bytes=int(args.max_message_mb * (1 << 20)), max_delta_norm=args.max_delta_norm,
        round_timeout_s=args.round_timeout_s, worker_timeout_s=args.worker_timeout_s,
        ready_file=args.ready_file, exit_when_done=args.exit_when_done, insecure=args.insecure,
        keys_dir=args.keys, checkpoint_dir=args.checkpoint_dir, checkpoint_every_s=args.checkpoint_every_s,
        restore=args.restore, max_delta_norm_factor=args.max_delta_norm_factor, max_staleness=args.max_staleness)
    run_server(config, on_ready=lambda address: print(f"pserver ready at {address}", flush=True))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from pserver.security import create_keys

    root = create_keys(args.dir, args.workers)
    print(f"wrote {root}/server.key (give to workers), {root}/server.key_secret (keep on the server), "
          f"{args.workers} worker key pair(s) in {root}/workers/ and the allow-list {root}/allowed/")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    client = Client(args.address, ClientConfig(timeout_s=args.timeout_s, retries=1))
    try:
        reply = client.stats()
    finally:
        client.close()
    if args.json:
        print(json.dumps({"coordinator": reply["coordinator"], "shards": reply["shards"]}, indent=2))
        return 0
    print(format_stats(reply))
    return 0


def format_stats(reply: dict[str, Any]) -> str:
    c = reply["coordinator"]
    lines = [f"world {c['world']}, {len(c['shards'])} shard(s), model {c['total']} floats"
             + ("" if c["initialised"] else " (not initialised)")]
    for rank, w in sorted(c["workers"].items(), key=lambda kv: int(kv[0])):
        state = "lost" if w["lost"] else "done" if w["done"] else "running"
        lines.append(f"  worker {rank} {w['name'] or ''} {state}, {w.get('samples', 0)} samples"
                     + (f", {w['nan_recoveries']} NaN loss(es) recovered" if w.get("nan_recoveries") else ""))
    for s in reply["shards"]:
        if "error" in s:
            lines.append(f"shard {s['shard']} at {s['endpoint']}: {s['error']}")
            continue
        refused = sum(s["refused"].values())
        lines.append(f"shard {s['shard']} at {s['endpoint']} [{s['start']}, {s['end']}): version {s['version']}, "
                     f"in {s['bytes_in'] / 2**20:.1f} MiB, out {s['bytes_out'] / 2**20:.1f} MiB, refused {refused}"
                     + (f" {s['refused']}" if refused else "")
                     + f", mean staleness {mean_staleness(s['staleness']):.2f}"
                     + (f", lost {s['lost']}" if s.get("lost") else ""))
        if "ssp" in s:
            gaps = " ".join(f"{g}:{n}" for g, n in s["ssp"]["gaps"].items()) or "-"
            lines.append(f"  SSP bound {s['ssp']['max_staleness']}: clock gaps {gaps}, {s['ssp']['waits']} push(es) waited")
        for worker in sorted(s["updates"], key=int):
            lines.append(f"  worker {worker}: {s['updates'][worker]} updates, staleness "
                         f"{histogram_summary(s['staleness'].get(worker, []))}")
    return "\n".join(lines)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_command(prog: str, args: argparse.Namespace, log_format: str = LOG_FORMAT) -> int:
    """Run a parsed command of `prog`: logging set up, a NotpuError as one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=log_format, datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except NotpuError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("pserver", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`pserver`'s pieces: the server's options, `keys`, `stats`, and the error handling every notpu program shares.

    pserver start --port 5555 --shards 2 --workers 4 --rule adag
    pserver stats 127.0.0.1:5555 [--json] [--keys KEYS]

`pserver` imports nothing of ours, so it does not know the update rules: the
`pserver` program, whose `start` takes the run options (--rule, --epochs, ...),
is `runner.pserver_cli`; it builds its parser here, with `RunOptions` from the
rule table. Run without them (`build_parser()`), `start` takes the run config
as one JSON document (--run-json), or the whole `ServerConfig` (--config-json,
what `notpu train` passes), and hands it to workers unread.

The command line builds the same `ServerConfig` the Python API takes; every
option's default is that of its `ServerConfig` field.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, NoReturn, Protocol, Sequence

from pserver.client import Client, ClientConfig
from pserver.errors import ConfigError, NotpuError
from pserver.server import ServerConfig, run_server
from pserver.stats import histogram_summary, mean_staleness

log = logging.getLogger(__name__)

MIB = 1 << 20
#: `pserver start` listens on a fixed, well-known port by default (people type it into `worker start --ps`);
#: `ServerConfig.port` is 0 (a free port) for programs, which read the address from the ready file.
DEFAULT_PORT = 5555


class RunOptions(Protocol):
    """The options that describe a run (rule, hyper-parameters, epochs, model), added to `pserver start`."""

    #: Modules every shard imports (`ServerConfig.plugins`): those registering the shard-side applies of the
    #: rules these options choose from (`pserver.applies`).
    plugins: tuple[str, ...]

    def add(self, parser: argparse.ArgumentParser) -> None: ...

    def config(self, args: argparse.Namespace, workers: int) -> dict[str, Any]:
        """The run config workers are handed (checked: a wrong option is a NotpuError)."""
        ...


def package_version() -> str:
    """The installed notpu's version, which `--version` prints on every notpu program."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("notpu")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _shown(value: Any, switch: bool) -> str | None:
    """How help shows a default; None: nothing to show (no value, or an empty list)."""
    if value is None or value is argparse.SUPPRESS or (isinstance(value, (list, tuple)) and not value):
        return None
    if switch:
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help: the value the option was given, which is its config field's,
    so no help text repeats a default by hand. Help that already speaks of its default ("default: the rule's")
    is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # BooleanOptionalAction appends "(default: True)" itself; on/off reads better and is appended below
        text = (action.help or "").replace(" (default: %(default)s)", "")
        if not action.option_strings or action.required or "default" in text.lower():
            return text
        shown = _shown(action.default, switch=action.nargs == 0)
        if shown is None:
            return text
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line, as every other error of ours: what was wrong and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _SubParsers(argparse._SubParsersAction):
    """Subcommands that take the program's common options (-v anywhere) and show their defaults."""

    def __init__(self, *args: Any, common: argparse.ArgumentParser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", ()), self._common]
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().add_parser(name, **kwargs)


def program_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser of a notpu program (notpu, pserver, worker) and its subcommands: -v/--verbose before or after
    the subcommand, --version, and every default in --help."""
    parser = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    # A subcommand's -v sets verbose only when given (SUPPRESS), so it never resets a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, action=_SubParsers, common=common)
    return parser, sub


def add_server_options(s: argparse.ArgumentParser) -> None:
    """`pserver start`'s options other than the run's; defaults are `ServerConfig`'s."""
    d = ServerConfig
    s.add_argument("--host", default=d.host, help="address to bind")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="the coordinator's port; 0 picks a free one")
    s.add_argument("--shards", type=int, default=d.shards, help="shard processes")
    s.add_argument("--workers", type=int, default=d.workers, help="world size: how many workers will join")
    s.add_argument("--max-message-mb", type=float, default=d.max_message_bytes / MIB,
                   help="ZeroMQ drops peers sending larger frames")
    s.add_argument("--max-delta-norm", type=float, default=d.max_delta_norm,
                   help="refuse updates with a larger L2 norm; 0: off")
    s.add_argument("--round-timeout-s", type=float, default=d.round_timeout_s,
                   help="a synchronous round closes without missing workers after this long")
    s.add_argument("--worker-timeout-s", type=float, default=d.worker_timeout_s,
                   help="declare a worker silent this long lost; 0: never")
    s.add_argument("--ready-file", default=d.ready_file, metavar="FILE",
                   help="write {address, pid} here as JSON once ready")
    s.add_argument("--exit-when-done", action="store_true", default=d.exit_when_done,
                   help="stop once every worker is done or lost")
    s.add_argument("--insecure", action="store_true", default=d.insecure,
                   help="allow binding a non-loopback address without keys")
    s.add_argument("--keys", default=d.keys_dir, metavar="KEYS",
                   help="CurveZMQ keys directory: encrypt, and admit only the public keys in KEYS/allowed "
                        "(see `pserver keys`)")
    s.add_argument("--checkpoint-dir", default=d.checkpoint_dir, metavar="CHECKPOINTS",
                   help="shards save their slice here, the coordinator its state; a shard that dies is "
                        "restarted from it, a whole server with --restore CHECKPOINTS")
    s.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s,
                   help="seconds between checkpoints; 0: no checkpoints")
    s.add_argument("--restore", default=d.restore, metavar="CHECKPOINTS",
                   help="resume a lost server's run from its --checkpoint-dir: the coordinator (ranks, model, "
                        "workers done and lost) and every shard, on the same --port, with the same options")
    s.add_argument("--max-delta-norm-factor", type=float, default=d.max_delta_norm_factor,
                   help="refuse updates whose norm exceeds F × the running median of recent ones; 0: off")
    s.add_argument("--max-staleness", type=int, default=d.max_staleness,
                   help="SSP: a worker more than K updates ahead of the slowest live one waits; -1: off")
    s.add_argument("--plugins", nargs="+", default=d.plugins, metavar="MODULE",
                   help="modules every shard imports that register shard-side applies (pserver.applies), "
                        "besides those of the run's rules")
    s.add_argument("--config-json", default=None, metavar="JSON",
                   help="the whole ServerConfig (its run config included) as one JSON object, instead of the "
                        "other options; what `notpu train` passes")


def server_config_from(args: argparse.Namespace, run: dict[str, Any], plugins: Sequence[str] = ()) -> ServerConfig:
    """The options' `ServerConfig`; ``plugins`` (the run options') come before those of --plugins."""
    return ServerConfig(
        host=args.host, port=args.port, shards=args.shards, workers=args.workers, run=run,
        max_message_bytes=int(args.max_message_mb * MIB), max_delta_norm=args.max_delta_norm,
        round_timeout_s=args.round_timeout_s, worker_timeout_s=args.worker_timeout_s,
        ready_file=args.ready_file, exit_when_done=args.exit_when_done, insecure=args.insecure,
        keys_dir=args.keys, checkpoint_dir=args.checkpoint_dir, checkpoint_every_s=args.checkpoint_every_s,
        restore=args.restore, max_delta_norm_factor=args.max_delta_norm_factor, max_staleness=args.max_staleness,
        plugins=tuple(dict.fromkeys([*plugins, *args.plugins])))


class _RunJson:
    """Run options for a `pserver start` that does not know the rules: the run config as one JSON object."""

    plugins: tuple[str, ...] = ()  # the built-in applies only; --plugins adds others

    def add(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--run-json", default="{}", metavar="JSON",
                            help="the run config workers are handed (rule, hyper-parameters, epochs, model), as is")

    def config(self, args: argparse.Namespace, workers: int) -> dict[str, Any]:
        try:
            run = json.loads(args.run_json)
        except ValueError as exc:
            raise ConfigError(f"--run-json: not JSON ({exc})") from None
        if not isinstance(run, dict):
            raise ConfigError(f"--run-json: expected a JSON object, got {type(run).__name__}")
        return run


def build_parser(run_options: RunOptions | None = None, prog: str = "pserver") -> argparse.ArgumentParser:
    """`pserver`'s parser; `start` takes `run_options` (default: the run config as --run-json)."""
    parser, sub = program_parser(prog, "notpu's ZeroMQ parameter server")

    run_options = run_options or _RunJson()
    s = sub.add_parser("start", help="run a coordinator and its shards in the foreground")
    add_server_options(s)
    run_options.add(s)
    s.set_defaults(handler=cmd_start, run_options=run_options, start_parser=s)

    k = sub.add_parser("keys", help="create a server key pair and worker key pairs for --keys")
    k.add_argument("dir", metavar="KEYS", help="directory to create (server.key*, workers/, allowed/)")
    k.add_argument("--workers", type=int, default=1, help="worker key pairs to create")
    k.set_defaults(handler=cmd_keys)

    t = sub.add_parser("stats", help="print per-shard versions, updates, bytes, refusals and staleness")
    t.add_argument("address", metavar="HOST:PORT", help="the coordinator's address")
    t.add_argument("--json", action="store_true", help="print JSON")
    # a person waits at the prompt: shorter than a worker's ClientConfig.timeout_s, and tried twice
    t.add_argument("--timeout-s", type=float, default=5.0, help="how long to wait for a reply, tried twice")
    t.add_argument("--keys", default=None, metavar="KEYS",
                   help="read a server started with --keys, with KEYS/operator.key_secret (see `pserver keys`; "
                        "default: none, for a server without --keys)")
    t.set_defaults(handler=cmd_stats)
    return parser


_NOT_OPTIONS = {"command", "verbose", "handler", "run_options", "start_parser", "config_json"}


def start_config(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` of a parsed `start`: from --config-json, or from the options."""
    if args.config_json is None:
        return server_config_from(args, args.run_options.config(args, args.workers), args.run_options.plugins)
    given = sorted(k for k, v in vars(args).items()
                   if k not in _NOT_OPTIONS and v != args.start_parser.get_default(k))
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise ConfigError(f"--config-json is the whole configuration; drop {flags}")
    return ServerConfig.from_json(args.config_json)


def cmd_start(args: argparse.Namespace) -> int:
    run_server(start_config(args), on_ready=lambda address: print(f"pserver ready at {address}", flush=True))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from pserver.security import create_keys

    root = create_keys(args.dir, args.workers)
    print(f"wrote {root}/server.key (give to workers), {root}/server.key_secret (keep on the server), "
          f"{args.workers} worker key pair(s) in {root}/workers/, an operator's pair {root}/operator.key_secret "
          f"(for `pserver stats --keys`) and the allow-list {root}/allowed/")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pserver.security import operator_curve

    curve = operator_curve(args.keys) if args.keys else None
    client = Client(args.address, ClientConfig(timeout_s=args.timeout_s, retries=1), curve=curve)
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


def run_command(prog: str, args: argparse.Namespace, log_format: str = LOG_FORMAT,
                expected: tuple[type[BaseException], ...] = (NotpuError,)) -> int:
    """Run a parsed command of `prog`: logging set up, an `expected` error (NotpuError, the root of every error
    notpu raises on purpose) as one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=log_format, datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except expected as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """`pserver` without the rule table: `start` takes --run-json or --config-json."""
    return run_command("pserver", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

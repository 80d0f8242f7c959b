"""The data commands of `notpu`: generate, prepare, baseline, predict.

Each handler builds the same frozen config the Python API takes and returns an
exit code; heavy imports (LightGBM, TensorFlow, matplotlib) happen inside the
handlers so `notpu --help` stays fast.
"""
from __future__ import annotations

import argparse
import time

from models.events import EventColumns
from models.features import LONG_WINDOW_BUCKET_DAYS, LONG_WINDOW_DAYS


def _add_columns(p: argparse.ArgumentParser, from_spec: bool) -> None:
    """--id-col/--time-col/--type-col/--value-col; predict defaults to the names saved in the spec."""
    names = EventColumns()
    for flag, role in (("--id-col", "id"), ("--time-col", "time"), ("--type-col", "type"), ("--value-col", "value")):
        p.add_argument(flag, dest=f"{role}_col", default=None if from_spec else getattr(names, role), metavar="NAME",
                       help=f"column with the {role} (default: {'as in the spec' if from_spec else getattr(names, role)})")


def _columns(args: argparse.Namespace) -> EventColumns:
    return EventColumns(id=args.id_col, time=args.time_col, type=args.type_col, value=args.value_col)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.kind == "retail":
        return _generate_retail(args)
    from models.generate import GeneratorConfig, generate_events, write_events

    t0 = time.perf_counter()
    cfg = GeneratorConfig(players=args.players, days=90 if args.days is None else args.days, seed=args.seed,
                          churn_rate=0.3 if args.churn_rate is None else args.churn_rate,
                          signal=1.0 if args.signal is None else args.signal)
    table = generate_events(cfg)
    write_events(table, args.out)
    print(f"{table.num_rows} events of {cfg.players} players over {cfg.days}+{cfg.label_days} days "
          f"-> {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _generate_retail(args: argparse.Namespace) -> int:
    from models.generate import write_events
    from models.generate_retail import RetailConfig, generate_retail_events
    from models.errors import DataError

    given = [flag for flag, value in (("--churn-rate", args.churn_rate), ("--signal", args.signal))
             if value is not None]
    if given:
        verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise DataError(f"{' and '.join(given)} {verb} to --kind mmo only: a retail log's churn follows from its "
                        f"customers' BG/NBD dropout (see models/generate_retail.py); leave {pronoun} out")
    t0 = time.perf_counter()
    cfg = RetailConfig(customers=args.players, seed=args.seed, **({} if args.days is None else {"days": args.days}))
    table = generate_retail_events(cfg)
    write_events(table, args.out)
    print(f"{table.num_rows} events of {cfg.customers} customers over {cfg.days}+{cfg.label_days} days "
          f"-> {args.out} ({time.perf_counter() - t0:.1f} s); prepare with --session-type purchase --min-sessions 1 "
          f"--observation-days {cfg.days} --label-days {cfg.label_days} --min-active-days 0")
    return 0


def _bucket_days(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of days, or auto") from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from models.prepare import PrepareConfig, prepare

    spec = prepare(PrepareConfig(
        events=args.events, out=args.out, cutoff=args.cutoff, observation_days=args.observation_days,
        label_days=args.label_days, session_type=args.session_type, min_sessions=args.min_sessions,
        min_active_days=args.min_active_days, max_types=args.max_types, columns=_columns(args),
        bucket_days=None if args.bucket_days == "auto" else args.bucket_days,
        engine=args.engine, master=args.master, parts=args.parts,
    ))
    c, w = spec["counts"], spec["window"]
    steps = f"{w['steps']} steps of {w['bucket_days']} days" if w["bucket_days"] > 1 else f"{w['steps']} days"
    if args.engine == "spark":
        from models.dataset import num_parts

        where = f"{args.out} ({num_parts(args.out)} parts)"
    else:
        where = args.out
    print(f"{c['customers_kept']} customers x {steps} x {len(spec['features'])} features, "
          f"churn rate {c['churn_rate']:.3f}, {c['customers_dropped_newcomers']} newcomers left out, "
          f"cut-off {spec['window']['cutoff']} -> {where}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from models.baseline import BaselineConfig, baseline

    result = baseline(BaselineConfig(data_dir=args.dir, n_jobs=args.threads))
    print(f"baseline test AUC {result['test_auc']:.4f} (val {result['val_auc']:.4f}, "
          f"{result['best_iteration']} rounds) -> {args.dir}/baseline.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from models.predict import PredictConfig, predict

    cols = None
    if any(getattr(args, f"{r}_col") for r in ("id", "time", "type", "value")):
        from models.predict import load_spec, model_file

        spec_cols = EventColumns(**load_spec(model_file(args.model), args.spec)["columns"])
        cols = EventColumns(**{r: getattr(args, f"{r}_col") or getattr(spec_cols, r) for r in ("id", "time", "type", "value")})
    cfg = PredictConfig(model=args.model, events=args.events, out=args.out, spec=args.spec, cutoff=args.cutoff,
                        columns=cols, custom_modules=tuple(args.custom_module), engine=args.engine, master=args.master)
    if cfg.engine == "spark":
        from models.spark_predict import predict_spark

        scored = predict_spark(cfg)
    else:
        scored = len(predict(cfg))
    print(f"{scored} customers scored -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add generate, prepare, baseline and predict to the `notpu` parser; defaults are the configs' fields."""
    from models.baseline import BaselineConfig
    from models.generate import GeneratorConfig as g
    from models.generate_retail import RetailConfig
    from models.predict import PredictConfig as d
    from models.prepare import ENGINES, PrepareConfig as r

    p = sub.add_parser("generate", help="write a synthetic MMO game log or retail purchase log with churners")
    p.add_argument("--kind", choices=("mmo", "retail"), default="mmo",
                   help="mmo: game sessions; retail: BG/NBD purchases, visits, returns, email opens")
    p.add_argument("--players", type=int, required=True, help="players (mmo) or customers (retail) in the log")
    p.add_argument("--observation-days", dest="days", type=int, default=None, metavar="DAYS",
                   help=f"days before the cut-off (default: mmo {g.days}, {g.label_days} label days follow; "
                        f"retail {RetailConfig.days}, {RetailConfig.label_days} follow)")
    p.add_argument("--seed", type=int, default=g.seed, help="the same seed writes the same log")
    p.add_argument("--churn-rate", type=float, default=None,
                   help=f"mmo only: share of churners (default: {g.churn_rate:g})")
    p.add_argument("--signal", type=float, default=None,
                   help=f"mmo only: strength of churners' fading patterns (0: none; default: {g.signal:g})")
    p.add_argument("--out", required=True, metavar="EVENTS", help="the log to write: a .parquet or .csv file")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("prepare", help="event log -> X.npy, y.npy, ids.npy, spec.json")
    p.add_argument("events", metavar="EVENTS",
                   help="CSV or Parquet event log (--engine spark: also a directory, glob or URI)")
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared DIR to write (replaced atomically)")
    p.add_argument("--cutoff", metavar="DATE", help="ISO date (UTC); default: --label-days before the end of the log")
    p.add_argument("--observation-days", type=int, default=r.observation_days, metavar="DAYS",
                   help="days before the cut-off")
    p.add_argument("--label-days", type=int, default=r.label_days, metavar="DAYS",
                   help="days after the cut-off in which a customer must come back")
    p.add_argument("--session-type", default=r.session_type, help="event type that marks a session")
    p.add_argument("--min-sessions", type=int, default=r.min_sessions,
                   help="churn = fewer sessions than this in the label window")
    p.add_argument("--min-active-days", type=int, default=r.min_active_days,
                   help="leave out customers with fewer active days")
    p.add_argument("--max-types", type=int, default=r.max_types, help="kept types incl. 'other'")
    p.add_argument("--bucket-days", type=_bucket_days, default="auto", metavar="N|auto",
                   help=f"days per time step; auto (default): 1 up to a {LONG_WINDOW_DAYS}-day window, "
                        f"{LONG_WINDOW_BUCKET_DAYS} beyond")
    p.add_argument("--engine", default=r.engine, choices=ENGINES,
                   help="local: numpy on this machine; spark: Spark SQL, DIR written as parts/part-K, which needs "
                        "pip install 'notpu[spark]' and Java 17+")
    p.add_argument("--master", default=r.master, metavar="URL", help="--engine spark: Spark master (default: local[*])")
    p.add_argument("--parts", type=int, default=r.parts, metavar="N",
                   help="--engine spark: files under DIR/parts/, one per worker (default: Spark's parallelism)")
    _add_columns(p, from_spec=False)
    p.set_defaults(handler=cmd_prepare)

    p = sub.add_parser("baseline", help="LightGBM on period aggregates; writes DIR/baseline.json")
    p.add_argument("dir", metavar="DIR", help="a prepared DIR (from `notpu prepare`)")
    p.add_argument("--threads", type=int, default=BaselineConfig.n_jobs, help="LightGBM threads; 0: all cores")
    p.set_defaults(handler=cmd_baseline)

    p = sub.add_parser("predict", help="score new events with RUN/model.keras")
    p.add_argument("model", metavar="MODEL", help="RUN/model.keras")
    p.add_argument("events", metavar="EVENTS",
                   help="CSV or Parquet event log (--engine spark: also a directory, glob or URI)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="scores to write (id,churn_probability); --engine spark: a path not ending .csv is "
                        "written as a Parquet directory")
    p.add_argument("--spec", metavar="SPEC", help="DIR/spec.json (default: the one next to MODEL)")
    p.add_argument("--cutoff", metavar="DATE", help="end of the observation window, ISO date (default: end of the log)")
    p.add_argument("--custom-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE (its registered custom layers) before loading the model; repeatable. "
                        "The modules the run recorded in RUN/summary.json are tried too")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="local: numpy and Keras on this machine; spark: features and scores on Spark executors, "
                        "which needs pip install 'notpu[spark]' and Java 17+")
    p.add_argument("--master", default=d.master, metavar="URL", help="--engine spark: Spark master (default: local[*])")
    _add_columns(p, from_spec=True)
    p.set_defaults(handler=cmd_predict)

"""report.png (every run) and report.txt (the demo): how a run learned, and how good its scores are.

The figure is drawn from a run directory's files alone: history.jsonl (val AUC
per evaluation, seconds since the launch), summary.json (the rule, workers,
test AUC, which evaluation was best), test_scores.csv (the test split's
labels and churn probabilities) and the prepared DIR's baseline.json when
`notpu baseline` has run on it. No TensorFlow: the driver draws it.

Top: val AUC against wall time from the launch, start-up shaded (no
evaluation exists before the server, the workers and TensorFlow are up), the
best evaluation marked, the baseline's val AUC as a line. Bottom, on the test
split: the cumulative gains chart (what share of the churners the top-scored
customers hold: whom to contact first) and the calibration curve (whether a
probability of 0.3 means 30% churn: what a budget or a retention offer's
expected value rests on).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from pserver.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Equal-width probability bins of the calibration curve: ten keeps a few hundred test customers per bin readable.
CALIBRATION_BINS = 10
#: The share of customers the gains chart's annotation is read at: a retention campaign's usual first decile.
TOP_SHARE = 0.1


def read_history(run_dir: Path) -> list[dict]:
    """RUN/history.jsonl as a list of dicts; a torn last line (run still writing) is skipped."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line %r", path, line[:80])
    return [r for r in rows if r.get("val_auc") is not None and r.get("wall_s") is not None]


def cumulative_gains(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of customers contacted, share of all churners among them), highest scores first, from (0, 0) to (1, 1).

    Point k is the top k customers; equal scores keep their order in the input (a stable sort).
    """
    y = np.asarray(labels, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    caught = np.concatenate([[0.0], np.cumsum(y[order])])  # (customers + 1,)
    if caught[-1] == 0:
        raise ValueError("cumulative gains need at least one churner among the labels")
    return np.arange(len(y) + 1) / len(y), caught / caught[-1]


def gain_at(labels: np.ndarray, scores: np.ndarray, share: float) -> float:
    """The share of all churners among the top `share` of customers by score (rounded down to whole customers)."""
    contacted, caught = cumulative_gains(labels, scores)
    return float(caught[int(np.floor(share * (len(contacted) - 1) + 1e-9))])


def calibration_bins(labels: np.ndarray, scores: np.ndarray,
                     bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin of probability: (mean predicted probability, observed churn rate, customers).

    Bin i holds [i/bins, (i+1)/bins); a probability of exactly 1 falls in the last bin.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    keep = counts > 0
    mean_p = np.bincount(which, weights=p, minlength=bins)[keep] / counts[keep]
    rate = np.bincount(which, weights=y, minlength=bins)[keep] / counts[keep]
    return mean_p, rate, counts[keep]


def brier(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared error of the probabilities: 0 perfect; the churn rate times one minus it for a constant."""
    return float(np.mean((np.asarray(scores, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def best_evaluation(history: list[dict], summary: dict | None) -> int | None:
    """The index of the best evaluation: the monitored one when callbacks kept one (summary's `best`), else the
    highest val AUC."""
    best = (summary or {}).get("best") or {}
    if isinstance(best.get("evaluation"), int) and 0 <= best["evaluation"] < len(history):
        return best["evaluation"]
    return int(np.argmax([h["val_auc"] for h in history])) if history else None


def read_test_scores(run_dir: Path, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, churn probabilities) of the test split, from RUN/test_scores.csv (its labels, else the DIR's)."""
    import pandas as pd

    frame = pd.read_csv(run_dir / "test_scores.csv", dtype={"id": str})
    column = "churn_probability" if "churn_probability" in frame else "score"
    scores = frame[column].to_numpy(np.float64)
    if "label" in frame:
        return frame["label"].to_numpy(np.int8), scores
    from models.dataset import load_dataset, split_indices

    if data_dir is None:
        raise ValueError(f"{run_dir / 'test_scores.csv'} has no label column and no DIR was given for the labels")
    data = load_dataset(data_dir)
    test = split_indices(len(data.y)).test
    if not np.array_equal(data.ids[test].astype(str), frame["id"].to_numpy(str)):
        raise ValueError(f"{run_dir / 'test_scores.csv'}: its ids are not {data_dir}'s test split")
    return np.asarray(data.y[test], dtype=np.int8), scores


def run_title(summary: dict, run_dir: Path, data_dir: Path | None) -> str:
    """'adag × 2 workers, 10 epochs · data name · test AUC 0.912'."""
    data = "?" if data_dir is None else _data_name(Path(data_dir), run_dir)
    model = "your model" if (summary.get("run_config") or {}).get("architecture") else f"GRU {summary.get('hidden')}"
    test_auc = summary.get("test_auc")
    auc = f"test AUC {test_auc:.3f}" if isinstance(test_auc, (int, float)) else "not scored"
    return (f"{model}, {summary.get('rule')} × {summary.get('workers')} workers, {summary.get('epochs')} epochs"
            f" · {data} · {auc}")


def _data_name(data_dir: Path, run_dir: Path) -> str:
    """A DIR as a title names it: its name, with its parent's when the name alone says nothing ("demo/data")."""
    path = data_dir.resolve()
    if path == (run_dir / "data").resolve():
        return "(X, y) arrays"  # fit() wrote them there
    return f"{path.parent.name}/{path.name}" if path.name in GENERIC_NAMES else path.name


#: DIR names that say nothing of the data: the title adds the parent's name.
GENERIC_NAMES = ("data", "prepared", "dir", "out")


def plot_report(history: list[dict], summary: dict, baseline: dict | None, test: tuple[np.ndarray, np.ndarray] | None,
                title: str, out_png: Path) -> None:
    """The three charts in one PNG, written atomically."""
    import matplotlib.pyplot as plt

    fig = draw_report(history, summary, baseline, test, title)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def draw_report(history: list[dict], summary: dict, baseline: dict | None, test: tuple[np.ndarray, np.ndarray] | None,
                title: str):
    """The figure: val AUC over time on top, gains and calibration on the test split below."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 8.5), dpi=110, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.05, 1])
    _plot_auc(fig.add_subplot(grid[0, :]), history, summary, baseline)
    gains, calib = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    if test is not None and 0 < test[0].sum() < len(test[0]):
        _plot_gains(gains, *test)
        _plot_calibration(calib, *test)
    else:
        why = "no test_scores.csv in the run" if test is None else "the test split holds one class only"
        for ax in (gains, calib):
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=12)
    return fig


def _below(ax, ncol: int) -> None:
    """The legend under the axes, where it can cover no curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=8.5, frameon=False)


def _plot_auc(ax, history: list[dict], summary: dict, baseline: dict | None) -> None:
    if history:
        wall = [h["wall_s"] for h in history]
        auc = [h["val_auc"] for h in history]
        ax.axvspan(0, wall[0], color="0.8", label=f"start-up ({wall[0]:.0f} s): server, workers, TensorFlow")
        idle = [h["wall_s"] for h in history if not h.get("samples")]  # evaluated before any worker trained
        if idle:
            ax.axvspan(wall[0], idle[-1], color="0.92",
                       label=f"no sample trained yet (until {idle[-1]:.0f} s): workers finishing start-up")
        ax.plot(wall, auc, marker=".", color="tab:blue", label="val AUC of the centre")
        i = best_evaluation(history, summary)
        monitor = ((summary.get("best") or {}).get("monitor")) or "val_auc"
        ax.plot(wall[i], auc[i], marker="*", markersize=15, color="tab:orange", linestyle="none",
                label=f"best evaluation by {monitor} (val AUC {auc[i]:.3f} at {wall[i]:.0f} s)")
        ax.set_xlim(0, max(wall) * 1.02)
    if baseline is not None:
        ax.axhline(baseline["val_auc"], color="tab:red", linestyle="--",
                   label=f"LightGBM baseline: val AUC {baseline['val_auc']:.3f} (test {baseline['test_auc']:.3f})")
        low, high = ax.get_ylim()  # autoscaling ignores the line: keep it off the frame
        ax.set_ylim(min(low, baseline["val_auc"] - 0.01), max(high, baseline["val_auc"] + 0.01))
    ax.set_xlabel("seconds since the launch")
    ax.set_ylabel("val ROC AUC")
    ax.grid(alpha=0.3)
    _below(ax, 2)


def _plot_gains(ax, labels: np.ndarray, scores: np.ndarray) -> None:
    contacted, caught = cumulative_gains(labels, scores)
    rate = float(labels.mean())
    top = gain_at(labels, scores, TOP_SHARE)
    ax.plot(contacted, caught, color="tab:blue", label="model")
    ax.plot([0, rate, 1], [0, 1, 1], color="tab:green", linestyle=":", label="perfect")
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="random")
    ax.plot([TOP_SHARE], [top], marker="o", color="tab:orange", linestyle="none",
            label=f"top {TOP_SHARE:.0%}: {top:.0%} of churners (lift {top / TOP_SHARE:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share of test customers contacted, highest score first")
    ax.set_ylabel("share of churners reached")
    ax.set_title(f"cumulative gains ({len(labels)} test customers, churn rate {rate:.1%})", fontsize=10)
    ax.grid(alpha=0.3)
    _below(ax, 2)


def _plot_calibration(ax, labels: np.ndarray, scores: np.ndarray) -> None:
    mean_p, rate, counts = calibration_bins(labels, scores)
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="perfectly calibrated")
    ax.plot(mean_p, rate, marker="o", color="tab:blue", label=f"model (Brier {brier(labels, scores):.3f})")
    for x, y, n in zip(mean_p, rate, counts):  # a point on a handful of customers is noise: say how many
        ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(0, 7 if y < 0.9 else -13), ha="center",
                    fontsize=7.5, color="0.3")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)  # a bin at exactly 0 or 1 stays visible
    ax.set_xlabel("predicted churn probability (bin mean)")
    ax.set_ylabel("observed churn rate")
    ax.set_title(f"calibration ({CALIBRATION_BINS} equal-width bins; customers beside each point)", fontsize=10)
    ax.grid(alpha=0.3)
    _below(ax, 2)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_run_report(run_dir: Path, data_dir: Path | None, out_png: Path | None = None) -> Path:
    """Draw RUN/report.png (or `out_png`) from the run's files and DIR/baseline.json; returns its path."""
    run_dir = Path(run_dir)
    summary = _json(run_dir / "summary.json") or {}
    baseline = _json(Path(data_dir) / "baseline.json") if data_dir is not None else None
    test = read_test_scores(run_dir, data_dir) if (run_dir / "test_scores.csv").is_file() else None
    out_png = out_png or run_dir / "report.png"
    plot_report(read_history(run_dir), summary, baseline, test, run_title(summary, run_dir, data_dir), out_png)
    return out_png


def summary_text(spec: dict, baseline: dict | None, summary: dict | None) -> str:
    counts, window = spec.get("counts", {}), spec.get("window", {})
    bucket = window.get("bucket_days", 1)
    steps = f"{window.get('steps')} steps of {bucket} days" if bucket > 1 else f"{window.get('observation_days')} days"
    lines = [
        f"data: {counts.get('customers_kept')} customers x {steps} "
        f"x {len(spec.get('features', []))} features, churn rate {counts.get('churn_rate')}, "
        f"{counts.get('customers_dropped_newcomers')} newcomers left out",
    ]
    if baseline:
        lines.append(f"baseline (LightGBM on period aggregates): test AUC {baseline['test_auc']:.4f}, "
                     f"val AUC {baseline['val_auc']:.4f}, {baseline['fit_s']} s")
    if summary:
        lines.append(
            f"GRU ({summary.get('rule')}, {summary.get('workers')} workers, {summary.get('epochs')} epochs): "
            f"test AUC {_f(summary.get('test_auc'))}, val AUC {_f(summary.get('val_auc'))}, "
            f"{_f(summary.get('wall_s'), 1)} s, {_f(summary.get('samples_per_s'), 0)} samples/s, "
            f"mean staleness {_f(summary.get('staleness', {}).get('mean'), 2)}"
        )
        if baseline and isinstance(summary.get("test_auc"), (int, float)):
            diff = summary["test_auc"] - baseline["test_auc"]
            lines.append(f"GRU - baseline test AUC: {diff:+.4f}")
    else:
        lines.append("GRU: not trained")
    return "\n".join(lines) + "\n"


def _f(x: object, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def write_report(out_dir: Path, spec: dict, baseline: dict | None, run_dir: Path, data_dir: Path,
                 summary: dict | None) -> str:
    """The demo's OUT/report.png (the run's own, beside the demo's files) and OUT/report.txt; returns the text."""
    if (run_dir / "report.png").is_file():
        with atomic_path(out_dir / "report.png") as tmp:
            shutil.copyfile(run_dir / "report.png", tmp)
    else:  # the run could not draw it (its warning says why): try once more, and fail loudly this time
        write_run_report(run_dir, data_dir, out_dir / "report.png")
    text = summary_text(spec, baseline, summary)
    atomic_write_text(out_dir / "report.txt", text)
    return text

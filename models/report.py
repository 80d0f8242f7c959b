"""report.png and report.txt: the GRU's val AUC over wall time against the boosting baseline."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from models.fileio import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


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


def plot_report(history: list[dict], baseline: dict | None, title: str, out_png: Path) -> None:
    """Val AUC of the centre against wall time, and the baseline's val AUC (same split) as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if history:
        ax.plot([r["wall_s"] for r in history], [r["val_auc"] for r in history], marker=".", label="GRU (parameter server), val AUC")
    if baseline is not None:
        ax.axhline(baseline["val_auc"], color="tab:red", linestyle="--",
                   label=f"LightGBM baseline, val AUC {baseline['val_auc']:.3f} (test {baseline['test_auc']:.3f})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("ROC AUC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


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


def write_report(out_dir: Path, spec: dict, baseline: dict | None, run_dir: Path | None, summary: dict | None) -> str:
    """Write out_dir/report.png and out_dir/report.txt; returns the text."""
    history = read_history(run_dir) if run_dir else []
    plot_report(history, baseline, "notpu demo: churn prediction", out_dir / "report.png")
    text = summary_text(spec, baseline, summary)
    write_text_atomic(out_dir / "report.txt", text)
    return text

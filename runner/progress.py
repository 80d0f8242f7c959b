"""What a person sees while `notpu train` or `fit()` runs: the start-up phases, then one bar.

Start-up takes tens of seconds before the first sample is trained (every
process imports TensorFlow), so each phase is named as it begins, on its own
line, with the seconds since the launch:

    starting the parameter server -> starting the workers -> workers loading data and importing TensorFlow
    -> waiting for the first evaluation

The driver imports no TensorFlow and holds no socket to the server; it learns
each phase from files: the server's ready file (the launcher waits for it),
the coordinator's lines in RUN/logs/pserver.log (a worker joined; the first
worker initialised the centre, i.e. finished importing TensorFlow and
building the model) and RUN/history.jsonl (the first evaluation). Then a bar
of samples out of epochs × training rows, with percent and ETA, whose
samples/s is `samples_per_s`, the summary's figure.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

#: The phases before the bar, in the order they begin.
PHASES = ("starting the parameter server", "starting the workers", "workers loading data and importing TensorFlow",
          "waiting for the first evaluation")
#: What the coordinator logs (pserver/coordinator.py) when a worker joins, and when the first one initialises
#: the centre: every worker has then imported TensorFlow or is about to finish doing so.
JOINED_LINE = " joined ("
INITIALISED_LINE = " model of "


def samples_per_s(samples: int, train_s: float) -> float:
    """Training throughput: samples over the seconds the workers trained (start-up not counted).

    The one definition: summary.json's `samples_per_s` (the evaluator) and the progress bar both call it.
    """
    return round(samples / train_s, 2) if train_s > 0 else 0.0


def bar_total(epochs: int, training_rows: int) -> int:
    """The bar's total: every training row once per epoch."""
    return epochs * training_rows


class Progress:
    """Start-up phases, then the bar, on `stream`; silent (every method a no-op) when not `enabled`."""

    def __init__(self, enabled: bool, label: str, total: int, out_dir: Path, started_at: float,
                 stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.label = label
        self.total = total
        self.history = out_dir / "history.jsonl"
        self.pserver_log = out_dir / "logs" / "pserver.log"
        self.started_at = started_at  # unix time of the launch: history.jsonl's wall_s counts from it
        self.stream = stream or sys.stderr
        self.shown = 0  # how many PHASES have been announced
        self.trained_from: float | None = None  # wall_s at which the centre was first initialised
        self.bar = None
        self._log_offset = 0
        self._seen = 0

    def phase(self, index: int, detail: str = "") -> None:
        """Announce PHASES[index] (and any earlier one not yet shown: the order never skips a step)."""
        if not self.enabled:
            return
        while self.shown <= index:
            name = PHASES[self.shown]
            more = f" ({detail})" if detail and self.shown == index else ""
            print(f"{self.label} [{time.time() - self.started_at:5.1f} s] {name}{more}", file=self.stream, flush=True)
            self.shown += 1

    def poll(self) -> None:
        """Read what is new in pserver.log and history.jsonl; announce phases, move the bar."""
        if not self.enabled:
            return
        if self.bar is None:
            self._read_server_log()
        if not self.history.exists():
            return
        lines = self.history.read_text().splitlines()
        for line in lines[self._seen:]:
            try:
                h = json.loads(line)
            except json.JSONDecodeError:
                break  # the evaluator is still writing it: read it next time
            self._seen += 1
            self._show(h)

    def _read_server_log(self) -> None:
        if not self.pserver_log.exists():
            return
        with open(self.pserver_log, "rb") as f:
            f.seek(self._log_offset)
            new = f.read()
        end = new.rfind(b"\n") + 1  # only whole lines
        self._log_offset += end
        for line in new[:end].decode(errors="replace").splitlines():
            if JOINED_LINE in line:
                self.phase(2)
            elif INITIALISED_LINE in line and self.trained_from is None:
                self.trained_from = time.time() - self.started_at
                self.phase(3)

    def _show(self, h: dict[str, Any]) -> None:
        if self.bar is None:
            self.phase(len(PHASES) - 1)
            self.bar = _bar(self.label, self.total, self.stream, self.started_at)
        if self.trained_from is None:  # the log line was missed: the first evaluation follows the centre's start
            self.trained_from = h["wall_s"]
        rate = samples_per_s(h["samples"], h["wall_s"] - self.trained_from) if h["samples"] else None
        self._move(h["samples"], rate, f"val_auc={h['val_auc']:.4f} updates={h['updates']}")

    def _move(self, samples: int, rate: float | None, postfix: str) -> None:
        bar = self.bar
        if samples > bar.total:  # a worker's last batch wraps round its share: never show more than 100%
            bar.total = samples
        bar.n = samples
        bar.rate = rate
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def close(self, summary: dict[str, Any] | None) -> None:
        """End the bar at the summary's own figures (samples, samples/s), so it never disagrees with them."""
        if self.bar is None:
            return
        samples, train_s = (summary or {}).get("samples"), (summary or {}).get("train_s")
        if isinstance(samples, int) and isinstance(train_s, (int, float)):
            scores = " ".join(f"{k}={summary[k]:.4f}" for k in ("val_auc", "test_auc")
                              if isinstance(summary.get(k), (int, float)))
            self._move(samples, samples_per_s(samples, train_s), scores)
        self.bar.close()
        self.bar = None

    def done(self, text: str) -> None:
        """One line after the bar (the report being drawn, ...)."""
        if self.enabled:
            print(f"{self.label} [{time.time() - self.started_at:5.1f} s] {text}", file=self.stream, flush=True)


def _bar(label: str, total: int, stream: IO[str], started_at: float):
    """A tqdm.auto bar (a widget in notebooks) whose rate, and so its ETA, is the one we give it."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        rate: float | None = None

        @property
        def format_dict(self):
            d = super().format_dict
            d["rate"] = self.rate  # tqdm would divide n by its own clock: a second, different figure
            return d

    # delay: not drawn on creation, only once its clock counts from the launch, as the phases' seconds do
    bar = Bar(desc=label, total=total, unit=" samples", dynamic_ncols=True, file=stream, delay=1e-3)
    bar.start_t = started_at
    bar.refresh()
    return bar

"""The evaluator: watches the centre while the workers train, then writes the run's results.

Every `interval_s` it pulls the centre, scores the validation split and
appends one line to RUN/history.jsonl:

    {"wall_s", "samples", "updates", "val_loss", "val_auc", "mean_staleness", "refused", "nan_recoveries",
     "val_<name>" for each metric your model was compiled with}

where `refused` counts the messages the shards refused so far (a non-finite
or too-large delta among them) and `nan_recoveries` the local NaN losses the
workers recovered from by pulling the centre. val_auc is sklearn's exact ROC
AUC on the validation split (subsampled above `max_val_rows`); a model of yours compiled with
`metrics=` or `weighted_metrics=` has those measured too, as Keras names them
(runner.keras_model.CompiledMetrics: `metrics=["AUC"]` is val_AUC, a metric
named "auc" is val_auc_1 beside ours).

It can stop the run when val AUC reaches `target_auc` (the coordinator tells
the workers through their heartbeats), or early when the monitored value
stops improving (`runner.callbacks`: early stopping, keeping the best centre,
checkpoints and TensorBoard scalars, per evaluation). When every worker is
done or lost (or the driver asks it to finish), it scores the final centre
(or the best one) on validation and test data and writes RUN/model.keras,
RUN/test_scores.csv and RUN/summary.json.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.dataset import load_dataset, split_indices
from models.outputs import churn_probability
from pserver.client import Client, ClientConfig
from pserver.fileio import atomic_write_json, atomic_write_text
from pserver.layout import Layout, unflatten
from pserver.stats import mean_staleness
from runner.callbacks import CallbackSettings, Scalars, Tracker, checkpoint_path
from runner.progress import samples_per_s
from runner.worker import WorkerConfig

log = logging.getLogger(__name__)

#: The evaluator pulls under this id, so its pulls never mix with a worker's in stats.
EVALUATOR_ID = (1 << 31) - 1


@dataclass(frozen=True)
class EvaluatorConfig:
    ps: str
    data_dir: str
    out_dir: str
    interval_s: float = 3.0
    target_auc: float | None = None
    started_at: float | None = None  # unix time the run started (wall_s counts from it)
    finish_file: str | None = None  # when this file appears, finish even if workers have not said DONE
    # A lost worker may come back (Spark retries its task, which rejoins with its rank): then only DONE from every
    # rank, or the finish file, ends the run.
    wait_for_lost: bool = False
    max_val_rows: int = 20_000  # a bigger validation split is subsampled (seeded) for the periodic checks
    keys_dir: str | None = None
    key_name: str | None = None
    server_wait_s: float = WorkerConfig.server_wait_s  # a server lost and restarted with --restore: wait, go on
    # runner.callbacks.CallbackSettings, flat (one JSON document); every default is defined there
    monitor: str = CallbackSettings.monitor
    early_stopping_patience: int | None = CallbackSettings.early_stopping_patience
    min_delta: float = CallbackSettings.min_delta
    restore_best: bool = CallbackSettings.restore_best
    checkpoint: str | None = CallbackSettings.checkpoint
    checkpoint_best_only: bool = CallbackSettings.checkpoint_best_only
    checkpoint_weights_only: bool = CallbackSettings.checkpoint_weights_only
    tensorboard: str | None = CallbackSettings.tensorboard


def binary_metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(log loss, ROC AUC) of churn probabilities p for 0/1 labels y."""
    from sklearn.metrics import roc_auc_score

    eps = 1e-7
    q = np.clip(p.astype(np.float64), eps, 1 - eps)
    loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return loss, auc


def checkpoint_failures(coord: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"coordinator" or "shard K": its checkpoint status (failures, last error, last success)}, for those
    whose checkpoints failed at least once: the run went on, but a restart would have had older state."""
    out = {}
    for who, status in [("coordinator", coord.get("checkpoint")),
                        *((f"shard {s.get('shard')}", s.get("checkpoint")) for s in shards)]:
        if isinstance(status, dict) and status.get("failures"):
            out[who] = status
    return out


def _trim(bins: list[int]) -> list[int]:
    """A histogram without its trailing empty bins."""
    end = len(bins)
    while end > 1 and bins[end - 1] == 0:
        end -= 1
    return bins[:end]


#: While waiting for the next evaluation, how often to ask whether every worker is done.
FINISH_POLL_S = 0.5
#: Fewer centre updates per worker than this and the run learned little from exchanges: warn.
MIN_UPDATES_PER_WORKER = 10


def run_warnings(run: dict[str, Any], world: int, updates: dict[str, int], history: list[dict[str, Any]],
                 final_val_auc: float) -> list[str]:
    """What a user must hear about a run that may not have learned: too few exchanges, no progress."""
    out = []
    version = max(updates.values(), default=0)
    per_worker = version if run.get("sync") else version / max(world, 1)  # a round holds every worker's update
    if per_worker < MIN_UPDATES_PER_WORKER:
        out.append(f"the centre received {per_worker:.1f} updates per worker (fewer than {MIN_UPDATES_PER_WORKER}): "
                   f"the workers hardly exchanged; use a smaller --window or more --epochs")
    # Against the centre as it started: on a fast machine the first evaluation may come after many updates, and
    # a later dip below it (noise, or the last centre kept instead of the best) is no sign of not learning.
    first = history[0] if history and not history[0].get("updates") else None
    if first is not None and not final_val_auc > first["val_auc"]:
        out.append(f"the final val AUC {final_val_auc:.4f} is not above the first one {first['val_auc']:.4f} "
                   f"(before any update): the centre did not learn; check the learning rate and the rule's "
                   f"settings in summary.json")
    return out


class Evaluator:
    @staticmethod
    def _key_name(cfg: EvaluatorConfig) -> str | None:
        """The key pair to read with: the one named, else the keys' evaluator pair (its role may STOP the run)."""
        if cfg.key_name or not cfg.keys_dir:
            return cfg.key_name
        from pserver.security import evaluator_key_name

        return evaluator_key_name(cfg.keys_dir)

    def __init__(self, cfg: EvaluatorConfig) -> None:
        from runner.worker import client_curve

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.client = Client(cfg.ps, ClientConfig(timeout_s=30.0, server_wait_s=cfg.server_wait_s),
                             worker=EVALUATOR_ID, curve=client_curve(cfg.keys_dir, self._key_name(cfg)))
        self.started_at = cfg.started_at or time.time()
        self.data = load_dataset(cfg.data_dir)
        self.split = split_indices(len(self.data.y))
        val = self.split.val
        if len(val) > cfg.max_val_rows:
            val = np.sort(np.random.default_rng(0).choice(val, cfg.max_val_rows, replace=False))
        self.val_rows = val
        self.history: list[dict[str, Any]] = []
        self.name = f"evaluator-{os.getpid()}"
        self.callbacks = CallbackSettings.of(cfg)
        self.tracker = Tracker(self.callbacks)
        self.best_centre: np.ndarray | None = None
        self.scalars = Scalars(self.callbacks.tensorboard) if self.callbacks.tensorboard else None
        self.metrics = None  # the user's model's compiled metrics (runner.keras_model.CompiledMetrics), from MODEL

    def _model(self):
        import keras

        from models.gru import compile_model

        reply = self.client.ask({"op": "MODEL", "observer": self.name})  # waits (bounded) for the first worker's INIT
        self.client.use_shards(reply["shards"])
        self.layout = Layout.from_wire(reply["layout"])
        self.run = reply["config"]
        self.world = int(reply["world"])
        if self.run.get("architecture"):  # the user's own model: its custom modules and its loss
            from runner.keras_model import CompiledMetrics, build_for_run, run_kind

            self.metrics = CompiledMetrics(self.run.get("compile_config"), run_kind(self.run))
            return build_for_run(self.run)
        model = keras.models.model_from_json(reply["architecture"])
        compile_model(model)
        return model

    def _effective(self) -> dict[str, Any]:
        """λ, α and the local rate the workers resolved: the same pure function on the same inputs."""
        from runner.worker import run_settings, training_share

        return run_settings(self.run, self.world, training_share(self.cfg.data_dir, self.world)).as_dict()

    def _predict(self, model, rows: np.ndarray) -> np.ndarray:
        """The model's outputs (rows, 1 or 2) on `rows`."""
        x = np.asarray(self.data.X[rows], dtype=np.float32)  # (rows, days, features)
        return model.predict(x, batch_size=1024, verbose=0)

    def _score(self, model, rows: np.ndarray) -> np.ndarray:
        return churn_probability(self._predict(model, rows))

    def _state(self) -> dict[str, Any]:
        """The coordinator's and the shards' counters, with the shards' staleness histograms summed per worker."""
        stats = self.client.ask({"op": "STATS", "observer": self.name})
        coord, shards = stats["coordinator"], [s for s in stats["shards"] if "version" in s]
        histograms: dict[str, list[int]] = {}
        for s in shards:
            for worker, bins in s["staleness"].items():
                acc = histograms.setdefault(worker, [0] * len(bins))
                histograms[worker] = [a + b for a, b in zip(acc, bins)]
        return {"coordinator": coord, "shards": shards, "staleness": histograms}

    def _observe(self, model) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
        # samples and updates are read before the pull, so the line never credits the centre with training
        # it has not had yet (the heartbeats' samples may still trail it by up to one heartbeat)
        state = self._state()
        coord, shards = state["coordinator"], state["shards"]
        centre = self.client.pull()
        model.set_weights(unflatten(centre, self.layout))
        pred = self._predict(model, self.val_rows)
        val_loss, val_auc = binary_metrics(self.data.y[self.val_rows], churn_probability(pred))
        line = {"wall_s": round(time.time() - self.started_at, 3),
                "samples": sum(int(w.get("samples", 0)) for w in coord["workers"].values()),
                "updates": max((s["version"] for s in shards), default=0),
                "val_loss": round(val_loss, 6), "val_auc": round(val_auc, 6),
                "mean_staleness": round(mean_staleness(state["staleness"]), 4),
                "refused": sum(sum(s["refused"].values()) for s in shards),
                "nan_recoveries": sum(int(w.get("nan_recoveries", 0)) for w in coord["workers"].values())}
        if self.metrics:
            from runner.keras_model import metric_keys

            line.update(metric_keys(line, self.metrics.measure(self.data.y[self.val_rows], pred)))
        return line, state, centre

    def _finished(self, coord: dict[str, Any]) -> bool:
        workers = coord["workers"].values()
        all_in = len(coord["workers"]) >= self.world and all(
            w["done"] or (w["lost"] and not self.cfg.wait_for_lost) for w in workers)
        told = bool(self.cfg.finish_file and os.path.exists(self.cfg.finish_file))
        return all_in or told

    def run_until_done(self) -> dict[str, Any]:
        model = self._model()
        history_path = self.out / "history.jsonl"
        stop_sent = ended = False
        while True:
            tick = time.monotonic()
            line, state, centre = self._observe(model)
            self.history.append(line)
            with open(history_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            log.info("t=%.0fs samples=%d updates=%d val_auc=%.4f val_loss=%.4f staleness=%.2f", line["wall_s"],
                     line["samples"], line["updates"], line["val_auc"], line["val_loss"], line["mean_staleness"])
            stop = self._callbacks(model, line, centre)
            target = self.cfg.target_auc
            if target and not stop and line["val_auc"] >= target:
                stop = f"val AUC {line['val_auc']:.4f} reached --target-auc {target}"
            if stop and not stop_sent:
                log.info("stopping the run: %s", stop)
                self.client.ask({"op": "STOP", "reason": stop})
                stop_sent = True
            if ended or self._finished(state["coordinator"]):
                break  # the last line was observed after the run ended
            ended = self._wait_or_finished(tick + self.cfg.interval_s)
        return self._finish(model, state)

    def _callbacks(self, model, line: dict[str, Any], centre: np.ndarray) -> str:
        """This evaluation's duties (runner.callbacks): best centre, checkpoint, scalars; a reason to stop, or ""."""
        index = len(self.history) - 1
        improved, stop = self.tracker.update(index, float(line[self.callbacks.monitor]))
        if improved and self.callbacks.keeps_best:
            self.best_centre = np.array(centre, copy=True)
        if self.callbacks.checkpoint and (improved or not self.callbacks.checkpoint_best_only):
            path = checkpoint_path(self.callbacks.checkpoint, index, line)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if self.callbacks.checkpoint_weights_only:
                model.save_weights(path)
            else:
                model.save(path)
        if self.scalars is not None:
            prev = self.history[-2] if len(self.history) > 1 else {"samples": 0, "wall_s": 0.0}
            dt = line["wall_s"] - prev["wall_s"]
            self.scalars.write(line["samples"], {
                "val_auc": line["val_auc"], "val_loss": line["val_loss"],
                "samples_per_s": (line["samples"] - prev["samples"]) / dt if dt > 0 else 0.0,
                "mean_staleness": line["mean_staleness"], "refused": line["refused"],
                **{k: v for k, v in line.items() if k.startswith("val_") and k not in ("val_auc", "val_loss")}})
        return stop if self.callbacks.early_stopping_patience is not None else ""

    def _wait_or_finished(self, until: float) -> bool:
        """Sleep until the next evaluation, but wake as soon as the run is over (a long interval must not delay it)."""
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, FINISH_POLL_S))
            coord = self.client.ask({"op": "STATS", "observer": self.name})["coordinator"]
            if self._finished(coord):
                return True
        return False

    def _finish(self, model, state: dict[str, Any]) -> dict[str, Any]:
        wall_s = time.time() - self.started_at
        use_best = self.callbacks.keeps_best and self.best_centre is not None
        centre = self.best_centre if use_best else self.client.pull()
        model.set_weights(unflatten(centre, self.layout))
        if self.scalars is not None:
            self.scalars.close()
        val_loss, val_auc = binary_metrics(self.data.y[self.split.val], self._score(model, self.split.val))
        test_scores = self._score(model, self.split.test)
        test_loss, test_auc = binary_metrics(self.data.y[self.split.test], test_scores)
        model.save(self.out / "model.keras")
        spec = Path(self.cfg.data_dir) / "spec.json"
        if spec.is_file():  # `notpu predict` finds the feature spec next to the model
            atomic_write_text(self.out / "spec.json", spec.read_text())
        import pandas as pd

        pd.DataFrame({"id": self.data.ids[self.split.test], "label": self.data.y[self.split.test],
                      "churn_probability": test_scores}).to_csv(self.out / "test_scores.csv", index=False)
        coord = state["coordinator"]
        workers = coord["workers"]
        updates = {str(s["shard"]): s["version"] for s in state["shards"]}
        effective = self._effective()
        warnings = run_warnings(self.run, self.world, updates, self.history, val_auc)
        checkpoints = checkpoint_failures(coord, state["shards"])
        warnings += [f"{who}: {c['failures']} checkpoint(s) not written, the last because {c['error']}"
                     for who, c in checkpoints.items()]
        for w in warnings:
            log.warning("%s", w)
        samples = sum(int(w.get("samples", 0)) for w in workers.values())
        train_s = max((float(w["report"].get("wall_s", 0)) for w in workers.values() if w.get("report")), default=0.0)
        target = self.cfg.target_auc
        reached = next((h["wall_s"] for h in self.history if target and h["val_auc"] >= target), None)
        summary = {
            "rule": self.run.get("rule"), "workers": self.world, "shards": len(coord["shards"]),
            "epochs": self.run.get("epochs"), "window": effective["window"], "alpha": effective["alpha"],
            "hidden": self.run.get("hidden"), "batch_size": self.run.get("batch_size"),
            "local_optimizer": effective["local_optimizer"], "learning_rate": effective["learning_rate"],
            "base_learning_rate": effective["base_learning_rate"], "seed": self.run.get("seed"),
            "run_config": self.run, "effective": effective, "warnings": warnings,
            "wall_s": round(wall_s, 3), "train_s": round(train_s, 3), "samples": samples,
            "samples_per_s": samples_per_s(samples, train_s),
            "val_loss": round(val_loss, 6), "val_auc": round(val_auc, 6),
            "test_loss": round(test_loss, 6), "test_auc": round(test_auc, 6),
            "target_auc": target, "time_to_target_s": reached, "stopped_early": coord.get("stop") or "",
            "staleness": {"mean": mean_staleness(state["staleness"]),
                          "histograms": {w: _trim(bins) for w, bins in state["staleness"].items()}},
            "updates": updates,
            "refused": {str(s["shard"]): s["refused"] for s in state["shards"]},
            "checkpoint_failures": checkpoints,
            "nan_recoveries": {r: int(w.get("nan_recoveries", 0)) for r, w in workers.items()},
            "lost_workers": sorted(int(r) for r, w in workers.items() if w["lost"]),
            "worker_names": {r: w.get("name", "") for r, w in workers.items()},
            "worker_reports": {r: w.get("report", {}) for r, w in workers.items()},
        }
        if self.callbacks.active or self.callbacks.tensorboard:
            i = self.tracker.best_index
            summary["best"] = {"monitor": self.callbacks.monitor, "evaluation": i,  # an index into history.jsonl
                               "value": self.tracker.best, "wall_s": self.history[i]["wall_s"] if i is not None else None,
                               "samples": self.history[i]["samples"] if i is not None else None,
                               "model": "best" if use_best else "final"}  # which centre model.keras holds
            summary["callbacks"] = {k: v for k, v in vars(self.callbacks).items()}
        atomic_write_json(self.out / "summary.json", summary, indent=2)
        log.info("final: val AUC %.4f, test AUC %.4f -> %s", val_auc, test_auc, self.out)
        self.client.ask({"op": "LEAVE", "observer": self.name})
        self.client.close()
        return summary

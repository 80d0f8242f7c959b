"""What a run that did not train says about its workers, and how compiled metrics are named in history."""
import numpy as np
import pytest

from runner.launcher import _failure, _worker_error
from runner.keras_model import metric_keys

TYPE_ERROR = """13:09:00 INFO start[7] runner.worker: worker 0 initialised the centre (41 floats)
Traceback (most recent call last):
  File "runner/worker.py", line 241, in _run
    loss = float(model.train_on_batch(xb, y))
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
TypeError: float() argument must be a string or a real number, not 'list'
"""

KERAS_ERROR = """Traceback (most recent call last):
  File "failing_models.py", line 12, in call
    raise ValueError("this layer refuses to train")
ValueError: Exception encountered when calling FailsInTraining.call().

\x1b[1mthis layer refuses to train\x1b[0m

Arguments received by FailsInTraining.call():
  \u2022 x=tf.Tensor(shape=(64, 10, 4), dtype=float32)
"""


def test_the_last_line_of_a_traceback_names_the_error_and_its_log(tmp_path):
    (tmp_path / "worker0.log").write_text(TYPE_ERROR)
    assert _worker_error(tmp_path, 0) == (f"TypeError: float() argument must be a string or a real number, not "
                                          f"'list' (see {tmp_path / 'worker0.log'})")


def test_a_keras_error_keeps_its_message_without_the_call_arguments_or_bold(tmp_path):
    (tmp_path / "worker1.log").write_text(KERAS_ERROR)
    assert _worker_error(tmp_path, 1).startswith("ValueError: Exception encountered when calling "
                                                 "FailsInTraining.call(). this layer refuses to train (see ")


def test_a_worker_without_a_traceback_or_a_log_says_so(tmp_path):
    (tmp_path / "worker0.log").write_text("13:00:00 INFO start[1] runner.worker: worker 0 of 2\n")
    assert _worker_error(tmp_path, 0).startswith("no traceback (killed?), its log ends: 13:00:00 INFO")
    assert "not on this host" in _worker_error(tmp_path, 3)


@pytest.mark.parametrize("summary, lost, done, expected", [
    ({"updates": {"0": 0}}, {0, 1}, set(), "every worker failed, the model did not train; worker 0: E"),
    ({"updates": {"0": 0, "1": 0}}, set(), {0, 1}, "the centre received no update from the workers"),
    ({"updates": {"0": 12}}, {1}, {0}, ""),  # a worker lost, the others trained: a warning, not a failure
    ({"updates": {"0": 12}}, set(), {0, 1}, ""),
])
def test_a_run_failed_when_no_worker_finished_or_the_centre_never_moved(summary, lost, done, expected):
    reason = _failure(summary, lost, done, ["worker 0: E"] if lost else [])
    assert reason.startswith(expected) and bool(reason) == bool(expected)


def test_metric_names_never_shadow_the_evaluators_own():
    line = {"val_auc": 0.9, "val_loss": 0.3}
    got = metric_keys(line, {"auc": 0.91, "AUC": 0.92, "loss": 0.5, "accuracy": float("nan")})
    assert list(got) == ["val_auc_1", "val_AUC", "val_loss_1", "val_accuracy"]
    assert got["val_auc_1"] == 0.91 and np.isnan(got["val_accuracy"])

"""The coordinator's checkpointer on a directory it cannot write: a warning and a count, never an exception
out of the coordinator's loop, and the state written once it can be."""
import time

from pserver import checkpoint
from pserver.checkpoint import CoordinatorCheckpointer

from test_coordinator_state import CLIENT, ask, ready  # noqa: E402


def test_a_failed_coordinator_checkpoint_is_counted_retried_and_written_once_it_can(tmp_path):
    coord = ready(world=2)
    blocked = tmp_path / "ckpt"
    blocked.write_text("a file where the checkpoint directory should be")  # mkdir fails, even for root
    saver = CoordinatorCheckpointer(coord, blocked, every_s=30.0)
    reply = ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})  # a decision: written at once, and cannot be
    assert reply["ok"] is True
    status = coord.summary()["checkpoint"]
    assert status["failures"] == 1 and "Error" in status["error"] and status["ok_at"] == 0
    saver.tick(time.monotonic() + 1.0)  # not yet an interval: not tried again
    assert coord.checkpoint_status["failures"] == 1
    saver.tick(time.monotonic() + 31.0)
    assert coord.checkpoint_status["failures"] == 2
    blocked.unlink()
    saver.tick(time.monotonic() + 62.0)
    assert [w["name"] for w in checkpoint.load_coordinator(blocked)["workers"]] == ["a"]
    assert coord.checkpoint_status["ok_at"] > 0 and coord.checkpoint_status["failures"] == 2

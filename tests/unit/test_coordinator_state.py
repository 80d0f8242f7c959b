"""The coordinator's state machine, in process: fabricated frames into `Coordinator.handle`, replies
out of a stand-in socket. No sockets are bound and no processes started."""
from __future__ import annotations

import dataclasses
import json
import time

import msgpack
import pytest
import zmq

from pserver import checkpoint, protocol
from pserver.checkpoint import CoordinatorCheckpointer, restore_coordinator
from pserver.coordinator import OBSERVER_TIMEOUT_S, Coordinator
from pserver.coordinator_state import WIRE_KEYS, CoordinatorState
from pserver.errors import CheckpointError
from pserver.layout import Layout, shard_ranges
from wire import Wire  # noqa: E402

LAYOUT = Layout.from_shapes([(4, 3), (3,), (5,)])  # 20 floats
CONFIG = {"rule": "adag", "window": 5}


def make(shards: int = 2, world: int = 2, worker_timeout_s: float = 0.0) -> Coordinator:
    return Coordinator(Wire(), shards=shards, world=world, run_config=CONFIG, worker_timeout_s=worker_timeout_s)


def ask(coord: Coordinator, header: dict, identity: bytes = b"peer") -> dict:
    coord.handle([zmq.Frame(identity), *(zmq.Frame(bytes(f)) for f in protocol.encode(header))])
    [(who, reply)] = coord.socket.sent
    coord.socket.sent.clear()
    assert who == identity and reply.arrays == []
    return reply.header


def refused(reply: dict, code: str) -> bool:
    return reply["ok"] is False and reply["code"] == code and bool(reply["reason"])


def ready(shards: int = 2, world: int = 2, **kw) -> Coordinator:
    coord = make(shards, world, **kw)
    for k in range(shards):
        assert ask(coord, {"op": "REGISTER", "shard": k, "endpoint": f"10.0.0.{k}:700{k}"})["ok"]
    return coord


def initialised(**kw) -> Coordinator:
    coord = ready(**kw)
    assert ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": "gru"})["first"] is True
    return coord


# ---- REGISTER and JOIN ---------------------------------------------------------------------------

def test_join_waits_until_every_shard_registered():
    coord = make(shards=2)
    assert ask(coord, {"op": "PING"}) == {"op": "REPLY", "ok": True, "ready": False, "v": 1,
                                          "shards": [{"index": 0, "endpoint": ""}, {"index": 1, "endpoint": ""}]}
    ask(coord, {"op": "REGISTER", "shard": 1, "endpoint": "h:2"})
    assert refused(ask(coord, {"op": "JOIN", "name": "a"}), "not_ready") and not coord.workers
    ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "h:1"})
    assert coord.ready and ask(coord, {"op": "JOIN", "name": "a"})["rank"] == 0


def test_register_checks_index_and_endpoint_and_follows_a_move():
    coord = make(shards=2)
    assert refused(ask(coord, {"op": "REGISTER", "shard": 2, "endpoint": "h:1"}), "malformed")
    assert refused(ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "no port"}), "malformed")
    assert refused(ask(coord, {"op": "REGISTER", "shard": 0}), "malformed")
    assert coord.endpoints == {}
    ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "h:1"})
    ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "h:9"})  # a restarted shard on another port
    assert coord.endpoints == {0: "h:9"}


def test_join_hands_out_ranks_then_refuses():
    coord = ready(world=2)
    first = ask(coord, {"op": "JOIN", "name": "a"})
    assert (first["rank"], first["world"], first["config"], first["layout"], first["architecture"]) == \
        (0, 2, CONFIG, None, None)
    assert [s["endpoint"] for s in first["shards"]] == ["10.0.0.0:7000", "10.0.0.1:7001"]
    assert ask(coord, {"op": "JOIN", "name": "b"})["rank"] == 1
    reply = ask(coord, {"op": "JOIN", "name": "c"})
    assert refused(reply, "malformed") and "all 2 ranks are taken" in reply["reason"]
    assert [w.name for w in coord.workers.values()] == ["a", "b"]


def test_join_after_init_carries_the_model_and_the_ranges():
    coord = initialised()
    reply = ask(coord, {"op": "JOIN", "name": "a"})
    assert reply["layout"] == LAYOUT.to_wire() and reply["architecture"] == "gru"
    assert [(s["start"], s["end"]) for s in reply["shards"]] == shard_ranges(LAYOUT.total, 2)


def test_a_lost_rank_can_be_taken_back_a_live_one_cannot():
    coord = ready(world=2, worker_timeout_s=5.0)
    ask(coord, {"op": "JOIN", "name": "a"})
    ask(coord, {"op": "JOIN", "name": "b"})
    assert refused(ask(coord, {"op": "JOIN", "name": "again", "rank": 1}), "malformed")
    coord.workers[0].last_seen = coord.workers[1].last_seen = time.monotonic()
    coord.check_liveness(time.monotonic() + 6.0)
    assert coord.workers[1].lost
    assert ask(coord, {"op": "JOIN", "name": "restarted", "rank": 1})["rank"] == 1
    assert coord.workers[1].name == "restarted" and not coord.workers[1].lost


# ---- INIT and MODEL ------------------------------------------------------------------------------

def test_first_init_fixes_the_layout_and_the_ranges():
    coord = ready(shards=3)
    called = []
    coord.on_change = lambda: called.append(coord.layout)
    reply = ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": "gru"})
    assert reply["first"] is True and reply["world"] == 2
    assert coord.ranges == shard_ranges(LAYOUT.total, 3) == [(s["start"], s["end"]) for s in reply["shards"]]
    assert called == [LAYOUT] and coord.architecture == "gru"


def test_later_init_of_the_same_layout_is_not_first():
    coord = initialised()
    renamed = Layout.from_shapes([(4, 3), (3,), (5,)], names=["a", "b", "c"])  # names may differ
    reply = ask(coord, {"op": "INIT", "layout": renamed.to_wire()})
    assert reply["first"] is False and len(reply["shards"]) == 2
    assert coord.layout == LAYOUT and coord.architecture == "gru"


def test_init_of_another_layout_is_a_mismatch_naming_the_tensor():
    coord = initialised()
    other = Layout.from_shapes([(4, 3), (3,), (6,)])
    reply = ask(coord, {"op": "INIT", "layout": other.to_wire()})
    assert refused(reply, "mismatch") and "tensor 2" in reply["reason"]
    assert coord.layout == LAYOUT


def test_init_that_cannot_be_split_or_parsed_is_refused():
    coord = ready(shards=2)
    assert refused(ask(coord, {"op": "INIT", "layout": [["w", [1]]]}), "size")
    assert refused(ask(coord, {"op": "INIT", "layout": [["w", [-1]]]}), "malformed")
    assert refused(ask(coord, {"op": "INIT"}), "malformed")
    assert coord.layout is None and coord.ranges == []


def test_model_is_for_observers_once_initialised():
    coord = ready()
    assert refused(ask(coord, {"op": "MODEL", "observer": "eval"}), "not_ready")
    assert "eval" in coord.observers  # it asked, so it is watching
    ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": "gru"})
    reply = ask(coord, {"op": "MODEL"})
    assert (reply["layout"], reply["architecture"], reply["world"], reply["config"]) == \
        (LAYOUT.to_wire(), "gru", 2, CONFIG)
    assert [(s["start"], s["end"]) for s in reply["shards"]] == coord.ranges
    assert coord.workers == {}  # an observer takes no rank


# ---- HEARTBEAT, DONE, LOST, LEAVE, STOP ------------------------------------------------------------

def test_heartbeat_keeps_the_largest_counts_and_tells_who_is_lost():
    coord = ready(world=2, worker_timeout_s=5.0)
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "JOIN"})
    assert refused(ask(coord, {"op": "HEARTBEAT", "rank": 7}), "malformed")
    assert ask(coord, {"op": "HEARTBEAT", "rank": 0, "samples": 640, "nan_recoveries": 1}) == \
        {"op": "REPLY", "ok": True, "lost": [], "stop": "", "v": 1}
    ask(coord, {"op": "HEARTBEAT", "rank": 0, "samples": 10})  # an older count arriving late
    assert (coord.workers[0].samples, coord.workers[0].nan_recoveries) == (640, 1)
    coord.check_liveness(coord.workers[1].last_seen + 4.0)
    assert not coord.workers[1].lost
    coord.workers[0].last_seen = coord.workers[1].last_seen + 10.0  # worker 0 stays in touch
    coord.check_liveness(coord.workers[1].last_seen + 5.5)
    assert coord.workers[1].lost and not coord.workers[0].lost
    assert ask(coord, {"op": "HEARTBEAT", "rank": 0})["lost"] == [1]
    ask(coord, {"op": "HEARTBEAT", "rank": 1})  # it was only slow: it is back
    assert not coord.workers[1].lost


def test_no_worker_timeout_means_never_lost():
    coord = ready(world=1)
    ask(coord, {"op": "JOIN"})
    coord.check_liveness(time.monotonic() + 1e6)
    assert not coord.workers[0].lost


def test_done_records_the_report_and_finishes_the_run():
    coord = ready(world=2)
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "JOIN"})
    assert refused(ask(coord, {"op": "DONE", "rank": 5}), "malformed")
    ask(coord, {"op": "DONE", "rank": 0, "report": {"samples": 900, "auc": 0.81, "nan_recoveries": True,
                                                    "curve": [1, 2]}})
    w = coord.workers[0]
    assert w.done and w.samples == 900 and w.nan_recoveries == 0  # a bool is not a count
    assert w.report == {"samples": 900, "auc": 0.81, "nan_recoveries": True}  # the list is dropped
    assert not coord.finished
    ask(coord, {"op": "DONE", "rank": 1})
    assert coord.finished
    assert coord.summary()["workers"]["1"]["done"] is True


def test_a_lost_worker_counts_as_finished():
    coord = ready(world=2, worker_timeout_s=1.0)
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "DONE", "rank": 0})
    assert not coord.finished
    coord.check_liveness(time.monotonic() + 2.0)
    assert coord.workers[1].lost and not coord.workers[0].lost  # done is never lost
    assert coord.finished


def test_an_observer_holds_the_run_open_until_it_leaves_or_goes_quiet():
    coord = ready(world=1)
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "MODEL", "observer": "eval"})  # not_ready (no model yet), but now watching
    ask(coord, {"op": "DONE", "rank": 0})
    assert not coord.finished
    coord.observers["eval"] -= OBSERVER_TIMEOUT_S + 1
    assert coord.finished
    ask(coord, {"op": "MODEL", "observer": "eval"})  # seen again
    assert not coord.finished
    assert ask(coord, {"op": "LEAVE", "observer": "eval"})["ok"] is True
    assert coord.finished and coord.observers == {}
    assert ask(coord, {"op": "LEAVE", "observer": "never seen"})["ok"] is True


def test_stop_is_told_to_workers_in_heartbeats_first_reason_kept():
    coord = ready(world=1)
    ask(coord, {"op": "JOIN"})
    assert ask(coord, {"op": "HEARTBEAT", "rank": 0})["stop"] == ""
    assert ask(coord, {"op": "STOP", "reason": "target AUC reached"})["ok"] is True
    ask(coord, {"op": "STOP", "reason": "another"})
    assert ask(coord, {"op": "HEARTBEAT", "rank": 0})["stop"] == "target AUC reached"
    assert coord.summary()["stop"] == "target AUC reached"


def test_lost_is_a_shard_op_not_a_coordinator_one():
    coord = ready()
    reply = ask(coord, {"op": "LOST", "lost": [0]})
    assert refused(reply, "unknown_op") and "'LOST' is not served by the coordinator" in reply["reason"]


def test_stats_without_shards_to_ask_is_the_summary():
    coord = make(shards=1)  # no endpoint registered: nothing to ask over the network
    reply = ask(coord, {"op": "STATS"})
    assert reply["shards"] == [] and reply["coordinator"] == coord.summary()
    assert reply["coordinator"]["initialised"] is False and reply["coordinator"]["world"] == 2


# ---- bad requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, code", [
    ([b"\xc1"], "malformed"),
    ([msgpack.packb({"v": 0, "op": "JOIN"})], "version"),
    ([msgpack.packb({"v": 1, "op": "PUSH"})], "unknown_op"),
    ([msgpack.packb({"v": 1, "op": "JOIN", "rank": "x"})], "malformed"),
    ([msgpack.packb({"v": 1, "op": "HEARTBEAT", "rank": True})], "malformed"),
    ([msgpack.packb({"v": 1, "op": "DONE", "rank": 0, "report": [1]})], "malformed"),
    ([msgpack.packb({"v": 1, "op": "PING", "arrays": [["<f4", 1]]}), b"\0\0\0"], "size"),
])
def test_bad_requests_are_refused_and_counted(body, code):
    coord = ready(world=1)
    ask(coord, {"op": "JOIN"})
    coord.handle([zmq.Frame(b"peer"), *(zmq.Frame(b) for b in body)])
    [(who, reply)] = coord.socket.sent
    assert who == b"peer" and refused(reply.header, code), reply.header
    assert coord.refused == {code: 1}
    assert not coord.workers[0].done and len(coord.workers) == 1


def test_a_request_without_a_header_is_counted_not_answered():
    coord = make()
    coord.handle([zmq.Frame(b"peer")])
    assert coord.socket.sent == [] and coord.refused == {"malformed": 1}


def test_a_bug_in_a_handler_is_an_internal_error_reply(monkeypatch):
    coord = make()
    monkeypatch.setitem(coord.handlers, "PING", lambda msg: {}["missing"])
    reply = ask(coord, {"op": "PING"})
    assert refused(reply, "internal") and "KeyError" in reply["reason"] and coord.refused == {"internal": 1}


# ---- retries: request ids ------------------------------------------------------------------------------

CLIENT = 0x5EED


def test_a_retried_join_gets_the_same_rank_from_another_socket():
    coord = ready(world=3)
    first = ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]}, identity=b"socket1")
    again = ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]}, identity=b"socket2")  # the reply was lost
    assert first["rank"] == again["rank"] == 0 and first == again
    assert list(coord.workers) == [0] and coord.memory.repeats == 1
    assert ask(coord, {"op": "JOIN", "name": "b", "rid": [CLIENT + 1, 1]})["rank"] == 1  # another client
    # without a request id a repeat is a new request, as with clients that send none
    assert ask(coord, {"op": "JOIN", "name": "c"})["rank"] == 2


def test_a_retried_rejoin_of_a_lost_rank_keeps_it():
    coord = ready(world=2, worker_timeout_s=1.0)
    ask(coord, {"op": "JOIN"})
    ask(coord, {"op": "JOIN"})
    coord.check_liveness(time.monotonic() + 2.0)
    rejoin = {"op": "JOIN", "name": "restarted", "rank": 1, "rid": [CLIENT, 1]}
    assert ask(coord, rejoin)["rank"] == 1
    assert ask(coord, rejoin)["rank"] == 1  # not "all 2 ranks are taken"


def test_a_retried_init_is_first_again_and_fixes_nothing_twice():
    coord = ready()
    called = []
    coord.on_change = lambda: called.append(1)
    init = {"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": "gru", "rid": [CLIENT, 2]}
    assert ask(coord, init, identity=b"s1")["first"] is True
    assert ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT + 1, 1]})["first"] is False
    assert ask(coord, init, identity=b"s2")["first"] is True  # the retry: its client must still send the slices
    assert called == [1] and coord.memory.repeats == 1


def test_a_refused_request_is_not_remembered():
    coord = make(shards=1)
    join = {"op": "JOIN", "rid": [CLIENT, 1]}
    assert refused(ask(coord, join), "not_ready")
    ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "h:1"})
    assert ask(coord, join)["rank"] == 0  # its retry, once the shards are there, is served


def test_a_late_copy_of_an_older_request_is_stale_and_changes_nothing():
    coord = ready(world=3)
    ask(coord, {"op": "JOIN", "rid": [CLIENT, 1]})
    ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT, 2]})
    reply = ask(coord, {"op": "JOIN", "rid": [CLIENT, 1]})  # the first JOIN, arriving late on its old socket
    assert refused(reply, "stale") and "older than its request 2 (INIT)" in reply["reason"]
    assert list(coord.workers) == [0] and coord.refused == {"stale": 1}
    reply = ask(coord, {"op": "JOIN", "rid": [CLIENT, 2]})  # an id reused for another op
    assert refused(reply, "malformed") and "was a INIT, now a JOIN" in reply["reason"]


@pytest.mark.parametrize("rid", [5, [1], [1, 2, 3], [1, -1], [-1, 1], [1, 2**63], [True, 1], [1, 1.0], ["a", 1],
                                 {"client": 1}])
def test_a_bad_request_id_is_refused_on_any_op(rid):
    coord = ready(world=1)
    for op in ({"op": "JOIN"}, {"op": "PING"}, {"op": "INIT", "layout": LAYOUT.to_wire()}):
        reply = ask(coord, {**op, "rid": rid})
        assert refused(reply, "malformed") and "'rid' must be [client, n]" in reply["reason"], reply
    assert coord.workers == {} and coord.layout is None and len(coord.memory) == 0


def test_the_reply_memory_is_bounded_one_entry_a_requester():
    coord = ready(world=1)
    coord.memory.limit = 8
    for client in range(20):  # a flood of fresh ids
        ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [client, 1]})
        ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [client, 2]})  # replaces its entry
    assert len(coord.memory) == 8 and coord.memory.repeats == 0
    assert ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [19, 2]})["first"] is False
    assert coord.memory.repeats == 1  # the last 8 requesters are remembered
    assert ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [0, 2]})["first"] is False
    assert coord.memory.repeats == 1 and len(coord.memory) == 8  # client 0 was forgotten: served anew
    assert coord.refused == {}


def test_init_of_a_model_whose_slices_exceed_the_shards_frame_limit_is_refused_by_name():
    coord = make(shards=2)
    coord.max_slice_bytes = 32  # 8 floats a slice at most; LAYOUT's slices have 10
    for k in range(2):
        ask(coord, {"op": "REGISTER", "shard": k, "endpoint": f"h:{k + 1}"})
    reply = ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire()})
    assert refused(reply, "size") and "--max-message-mb" in reply["reason"] and coord.layout is None


def test_stats_name_the_coordinators_pid():
    import os

    assert make().summary()["pid"] == os.getpid()


# ---- whole-server restarts: snapshot, restore, coordinator.json --------------------------------------------

def on_disk(coord: Coordinator) -> dict:
    """The snapshot as it comes back from coordinator.json."""
    return json.loads(json.dumps(coord.snapshot().to_wire()))


def a_run_in_progress() -> Coordinator:
    """3 ranks: 0 initialised the model and is done, 1 is training, 2 was declared lost; an evaluator watches."""
    coord = ready(world=3, worker_timeout_s=5.0)
    assert ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})["rank"] == 0
    assert ask(coord, {"op": "JOIN", "name": "b", "rid": [CLIENT + 1, 1]})["rank"] == 1
    assert ask(coord, {"op": "JOIN", "name": "c", "rid": [CLIENT + 2, 1]})["rank"] == 2
    assert ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": "gru", "rid": [CLIENT, 2]})["first"]
    ask(coord, {"op": "MODEL", "observer": "eval"})
    ask(coord, {"op": "HEARTBEAT", "rank": 1, "samples": 640, "nan_recoveries": 2, "rid": [CLIENT + 1, 2]})
    ask(coord, {"op": "DONE", "rank": 0, "report": {"samples": 900, "final_loss": 0.4}, "rid": [CLIENT, 3]})
    coord.workers[0].last_seen = coord.workers[1].last_seen = time.monotonic() + 10.0
    coord.check_liveness(time.monotonic() + 6.0)
    assert [w.lost for w in coord.workers.values()] == [False, False, True]
    return coord


def from_wire(state: dict, world: int = 3) -> CoordinatorState:
    return CoordinatorState.from_wire(state, shards=2, world=world, run_config=CONFIG)


def restored(state: dict, world: int = 3, **kw) -> Coordinator:
    coord = make(shards=2, world=world, worker_timeout_s=5.0, **kw)
    coord.restore(from_wire(state, world))
    return coord


def test_a_restored_coordinator_knows_every_rank_the_model_and_its_decisions():
    old = a_run_in_progress()
    state = on_disk(old)
    new = restored(state)
    assert not new.ready and new.restored_endpoints == {0: "10.0.0.0:7000", 1: "10.0.0.1:7001"}
    for k in range(2):  # the shards register again, on their old ports
        ask(new, {"op": "REGISTER", "shard": k, "endpoint": new.restored_endpoints[k]})
    assert on_disk(new) == state
    assert [(w.rank, w.name, w.done, w.lost, w.samples, w.nan_recoveries) for w in new.workers.values()] == \
        [(0, "a", True, False, 900, 0), (1, "b", False, False, 640, 2), (2, "c", False, True, 0, 0)]
    assert new.workers[0].report == {"samples": 900, "final_loss": 0.4}
    assert (new.layout, new.architecture, new.ranges) == (LAYOUT, "gru", old.ranges)
    # a retried JOIN or first INIT, its reply lost with the old server, is answered as the first time
    assert ask(new, {"op": "JOIN", "name": "b", "rid": [CLIENT + 1, 1]})["rank"] == 1
    assert ask(new, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT, 2]})["first"] is True
    assert new.memory.repeats == 2 and list(new.workers) == [0, 1, 2]
    assert refused(ask(new, {"op": "JOIN", "name": "stranger"}), "malformed")  # no rank is free
    assert ask(new, {"op": "JOIN", "name": "c again", "rank": 2})["rank"] == 2  # a lost rank is taken back
    # the running worker goes on with its rank: heartbeats and DONE are accepted
    assert ask(new, {"op": "HEARTBEAT", "rank": 1, "samples": 700})["ok"] is True and new.workers[1].samples == 700
    ask(new, {"op": "DONE", "rank": 1})
    ask(new, {"op": "DONE", "rank": 2})
    assert not new.finished  # the evaluator counts as watching from the restore
    ask(new, {"op": "LEAVE", "observer": "eval"})
    assert new.finished


def test_a_restored_coordinator_counts_silence_from_the_restore():
    new = restored(on_disk(a_run_in_progress()))
    seen = new.workers[1].last_seen
    assert abs(seen - time.monotonic()) < 5.0
    new.check_liveness(seen + 4.0)
    assert not new.workers[1].lost
    new.check_liveness(seen + 6.0)
    assert new.workers[1].lost


def test_before_init_only_ranks_are_restored():
    coord = ready(world=2)
    ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})
    new = restored(on_disk(coord), world=2)
    assert new.layout is None and new.ranges == [] and list(new.workers) == [0]
    for k in range(2):
        ask(new, {"op": "REGISTER", "shard": k, "endpoint": f"h:{k + 1}"})
    assert ask(new, {"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT, 2]})["first"] is True


def test_decisions_are_checkpointed_before_their_reply_leaves():
    coord = ready(world=2)
    seen = []
    coord.on_change = lambda: seen.append((len(coord.socket.sent), on_disk(coord)))

    def changes(header: dict) -> bool:
        before = len(seen)
        ask(coord, header)
        return len(seen) > before

    assert changes({"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})
    sent, state = seen[-1]
    assert sent == 0  # the reply had not left yet
    assert state["workers"][0]["name"] == "a" and state["memory"] == [[CLIENT, 1, "JOIN", 0]]
    assert not changes({"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})  # its retry: nothing new
    assert changes({"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT, 2]})
    assert seen[-1][1]["layout"] == LAYOUT.to_wire()
    assert not changes({"op": "INIT", "layout": LAYOUT.to_wire(), "rid": [CLIENT + 1, 1]})  # not first: nothing fixed
    assert changes({"op": "JOIN", "name": "b"})
    for op in ({"op": "PING"}, {"op": "HEARTBEAT", "rank": 0, "samples": 5}, {"op": "MODEL", "observer": "e"},
               {"op": "JOIN", "name": "c"}, {"op": "LEAVE", "observer": "e"}):
        assert not changes(op), op  # the JOIN is refused: no rank is free
    assert changes({"op": "DONE", "rank": 0})
    assert changes({"op": "STOP", "reason": "target reached"}) and not changes({"op": "STOP", "reason": "again"})


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_reply(caplog):
    coord = ready(world=1)

    def disk_full():
        raise OSError(28, "No space left on device")

    coord.on_change = disk_full
    assert ask(coord, {"op": "JOIN"})["rank"] == 0
    assert "checkpoint not written" in caplog.text


def test_a_snapshot_round_trips_through_its_wire_form():
    for coord in (ready(world=2), initialised(), a_run_in_progress()):
        snap = coord.snapshot()
        assert list(snap.to_wire()) == list(WIRE_KEYS)
        assert from_wire(on_disk(coord), world=coord.world) == snap


def test_a_restore_applies_the_snapshot_and_nothing_else():
    old = a_run_in_progress()
    new = make(shards=2, world=3)
    new.restore(old.snapshot())
    assert new.endpoints == {} and new.restored_endpoints == old.endpoints  # the shards register again
    assert new.snapshot() == dataclasses.replace(old.snapshot(), endpoints={})
    with pytest.raises(ValueError, match="cannot restore a coordinator of 2 and 2"):
        make(shards=2, world=2).restore(old.snapshot())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(world=2), "this one has 3"),
    (lambda s: s.update(shards=3), "3 shard\\(s\\), this one has 2"),
    (lambda s: s["run"].update(rule="downpour"), "another run config \\(differing: rule\\)"),
    (lambda s: s.update(fingerprint="0" * 64), "fingerprint"),
    (lambda s: s.update(ranges=[[0, 5], [5, 20]]), "shard ranges"),
    (lambda s: s["workers"][1].update(rank=0), "worker entry 1"),
    (lambda s: s["workers"][2].update(rank=3), "worker entry 2"),
    (lambda s: s["workers"][0].pop("done"), "worker entry 0"),
    (lambda s: s["memory"].append([1, 1, "DONE", 0]), "memory entry"),
    (lambda s: s.pop("memory"), "missing memory"),
    (lambda s: s.update(endpoints={"9": "h:1"}), "endpoints"),
])
def test_a_state_of_another_run_or_malformed_is_refused(change, message):
    state = on_disk(a_run_in_progress())
    change(state)
    with pytest.raises(ValueError, match=message):
        from_wire(state)


#: For each field of the wire form, a value of the wrong kind, and what the refusal says.
MALFORMED = {
    "address": (7000, "address must be a string"),
    "shards": ("2", "written by a server with 2 shard"),
    "world": (None, "written by a server of None worker"),
    "run": ([], "run must be a JSON object"),
    "endpoints": ([], "endpoints must map shard indices"),
    "layout": ({}, "layout must be a non-empty list"),
    "architecture": (1, "architecture must be a string or null"),
    "ranges": ([[0, "10"], [10, 20]], "shard ranges"),
    "total": (21, "layout does not match its fingerprint or total"),
    "fingerprint": ("", "layout does not match its fingerprint or total"),
    "workers": ({}, "workers must be a list"),
    "stop": (None, "stop must be a string"),
    "observers": (["eval", 1], "observers must be a list of names"),
    "memory": ({}, "memory must be a list"),
    "refused": ({"malformed": "1"}, "refused must map error codes to counts"),
    "repeats": (1.5, "repeats must be an integer"),
}


def test_every_field_has_a_malformed_case():
    assert set(MALFORMED) == set(WIRE_KEYS)


@pytest.mark.parametrize("name", WIRE_KEYS)
def test_each_malformed_field_is_refused_by_name(name):
    value, message = MALFORMED[name]
    state = on_disk(a_run_in_progress())
    state[name] = value
    with pytest.raises(ValueError, match=message):
        from_wire(state)
    del state[name]
    with pytest.raises(ValueError, match=f"^missing {name}$"):
        from_wire(state)


# ---- coordinator.json ------------------------------------------------------------------------------------

def test_coordinator_json_is_written_at_each_decision_and_every_interval(tmp_path):
    coord = ready(world=2)
    saver = CoordinatorCheckpointer(coord, tmp_path, every_s=30.0)
    saver.tick(time.monotonic() + 60.0)
    assert not (tmp_path / checkpoint.COORDINATOR_FILE).exists()  # nothing decided yet: nothing to keep
    ask(coord, {"op": "JOIN", "name": "a", "rid": [CLIENT, 1]})
    assert checkpoint.load_coordinator(tmp_path) == on_disk(coord)  # the JOIN wrote it
    ask(coord, {"op": "HEARTBEAT", "rank": 0, "samples": 64})
    saver.tick(time.monotonic() + 1.0)
    assert checkpoint.load_coordinator(tmp_path)["workers"][0]["samples"] == 0  # not yet an interval
    saver.tick(time.monotonic() + 31.0)
    assert checkpoint.load_coordinator(tmp_path)["workers"][0]["samples"] == 64
    assert saver.save() is None  # unchanged: not written again


def saved_run(tmp_path) -> tuple[Coordinator, object]:
    coord = a_run_in_progress()
    return coord, checkpoint.save_coordinator(tmp_path, coord.snapshot())


def test_a_torn_or_edited_coordinator_checkpoint_is_refused_naming_the_file(tmp_path):
    coord, path = saved_run(tmp_path)
    assert checkpoint.check_restore(tmp_path, shards=2, world=3) == on_disk(coord)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"{path} is torn.*complete copy"):
        checkpoint.check_restore(tmp_path, shards=2, world=3)
    path.write_text(text.replace('"name": "b"', '"name": "x"'))
    with pytest.raises(CheckpointError, match=f"{path}: the state's CRC32 does not match"):
        checkpoint.load_coordinator(tmp_path)
    path.write_text(text.replace(checkpoint.COORDINATOR_FORMAT, "notpu-coordinator/1"))
    with pytest.raises(CheckpointError, match="format 'notpu-coordinator/1'"):
        checkpoint.load_coordinator(tmp_path)
    path.write_text(json.dumps({"layout": [], "ranges": [], "total": 0, "fingerprint": ""}))  # the old format
    with pytest.raises(CheckpointError, match="no state object"):
        checkpoint.load_coordinator(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="not found: nothing to restore"):
        checkpoint.load_coordinator(tmp_path)


def test_a_mismatched_coordinator_checkpoint_is_refused_saying_what_to_do(tmp_path):
    coord, path = saved_run(tmp_path)
    with pytest.raises(CheckpointError, match=f"{path} was written by a server with 2 shard.*--shards 2"):
        checkpoint.check_restore(tmp_path, shards=3, world=3)
    with pytest.raises(CheckpointError, match="--workers 3"):
        checkpoint.check_restore(tmp_path, shards=2, world=2)
    other = Coordinator(Wire(), shards=2, world=3, run_config={**CONFIG, "rule": "easgd"})
    with pytest.raises(CheckpointError, match=f"{path} cannot be restored.*differing: rule.*options the run"):
        restore_coordinator(other, checkpoint.load_coordinator(tmp_path), tmp_path)


def test_a_shard_checkpoint_beside_a_coordinator_without_a_model_is_refused(tmp_path):
    coord = ready(world=2)
    ask(coord, {"op": "JOIN"})
    checkpoint.save_coordinator(tmp_path, coord.snapshot())
    checkpoint.shard_file(tmp_path, 1).write_bytes(b"from another run")
    with pytest.raises(CheckpointError, match="shard-1.npz exists but .* holds no model: they are from different runs"):
        checkpoint.check_restore(tmp_path, shards=2, world=2)


# ---- the server's secret: REGISTER proofs, JOIN and INIT tickets ------------------------------------------------

SECRET = b"k" * 32


def test_register_needs_the_servers_proof():
    from pserver import security

    coord = Coordinator(Wire(), shards=1, world=1, run_config=CONFIG, secret=SECRET)
    assert refused(ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "10.0.0.9:1"}), "ticket")
    other = security.register_proof(SECRET, 0, "10.0.0.1:7000")  # a proof for another endpoint
    assert refused(ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "10.0.0.9:1", "proof": other}), "ticket")
    assert refused(ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "10.0.0.9:1", "proof": 7}), "ticket")
    assert coord.endpoints == {} and coord.refused["ticket"] == 3
    assert ask(coord, {"op": "REGISTER", "shard": 0, "endpoint": "10.0.0.1:7000", "proof": other})["ok"]
    assert coord.endpoints == {0: "10.0.0.1:7000"}


def test_join_and_init_replies_carry_the_tickets_shards_check():
    from pserver import security

    coord = Coordinator(Wire(), shards=2, world=2, run_config=CONFIG, secret=SECRET)
    for k in range(2):
        proof = security.register_proof(SECRET, k, f"h:{k}")
        assert ask(coord, {"op": "REGISTER", "shard": k, "endpoint": f"h:{k}", "proof": proof})["ok"]
    reply = ask(coord, {"op": "JOIN", "name": "a"})
    assert reply["ticket"] == security.worker_ticket(SECRET, reply["rank"], 1)
    init = ask(coord, {"op": "INIT", "layout": LAYOUT.to_wire()})
    assert init["tickets"] == [security.init_ticket(SECRET, k, s, e, LAYOUT.total, 2, LAYOUT.fingerprint())
                               for k, (s, e) in enumerate(shard_ranges(LAYOUT.total, 2))]
    coord.workers[0].lost = True  # its process died; the next takes the rank back as incarnation 2
    again = ask(coord, {"op": "JOIN", "name": "a2", "rank": 0})
    assert again["incarnation"] == 2 and again["ticket"] == security.worker_ticket(SECRET, 0, 2)
    assert again["ticket"] != reply["ticket"]


def test_a_snapshot_keeps_the_key_each_rank_joined_with():
    coord = initialised()
    ask(coord, {"op": "JOIN", "name": "a"})
    coord.workers[0].key = "K" * 40
    fresh = make()
    fresh.restore(from_wire(on_disk(coord), world=2))
    assert fresh.workers[0].key == "K" * 40


def test_lost_notices_carry_the_servers_proof():
    from pserver import security

    coord = Coordinator(Wire(), shards=1, world=2, run_config=CONFIG, secret=SECRET)
    header = coord.signed_lost([1], [0])
    assert header == {"op": "LOST", "lost": [1], "done": [0], "proof": security.lost_proof(SECRET, [1], [0])}
    assert "proof" not in make().signed_lost([1], [])

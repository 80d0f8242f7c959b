"""Checkpoints: a shard's slice and the coordinator's state, written atomically, read back strictly.

`Checkpointer` writes a shard's, from the shard's tick, and `restore_newest`
takes the newest good one back; `CoordinatorCheckpointer` writes the
coordinator's, from `pserver start`'s loop, and `restore_coordinator` takes
it back.

Files in the checkpoint directory::

    coordinator.json   the coordinator's state (`pserver.coordinator_state.CoordinatorState`, its wire
                       form: ranks, names, done and lost workers, run config, model, shard endpoints,
                       reply memory) with its format and a CRC32 of the state
    shard-K.npz        shard K's slice and a JSON header, one .npz, no pickle: the header holds every field
                       of `pserver.shard_state.ShardState` but the centre, and the slice's CRC32, the time
                       it was written and the format

    shard-K.prev.npz   the shard's checkpoint before the last one, kept until the next one is verified
    shard-K.new.npz    a new checkpoint being verified (only while it is written, or after a crash then)

Every file is written by `pserver.fileio`: to a temporary file beside it,
fsynced, renamed over ``NAME`` and the directory fsynced, so a crash leaves
the previous complete file or the new one, never half of one. A shard's
checkpoint is never written from a slice holding NaN or Inf, and a new one
replaces the last good one only once it has been read back and checked
whole: it is written as ``shard-K.new.npz``, loaded as a restore would, then
the last good one becomes ``shard-K.prev.npz`` and the new one ``shard-K.npz``.
A restore takes the newest of those files that reads back good, and says
so when that is not ``shard-K.npz``.

Reading checks everything before a shard serves a byte: the zip's own CRCs,
the header's fields and their types, a CRC32 of the slice, the slice length
against the range, and the range and fingerprint against
``coordinator.json``, whose own CRC32, shard count, world and run config must
match the server restoring it. A torn or foreign checkpoint raises
CheckpointError naming the file. The CRC32s detect accidental damage (a torn
write, a flipped bit); they are no defence against a deliberate edit, which
can recompute them: whoever can write the checkpoint directory can change the
model.

A checkpoint that cannot be written (disk full, no permission, a read-only
file system) is a warning, counted in the shard's stats (`checkpoint`); the
shard goes on serving and tries again at the next interval, and the last good
checkpoint stays as it was.

What a restored shard may have lost: the updates it applied after its last
checkpoint whose replies had already reached the workers. A push whose reply
was lost is retried by the client with the same seq; the restored shard's
per-worker seq table is that of the checkpoint, so such a push is applied
again exactly once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pserver.coordinator_state import WIRE_KEYS, CoordinatorState
from pserver.errors import CheckpointError
from pserver.fileio import atomic_write, atomic_write_json, fsync_dir
from pserver.shard import Shard
from pserver.shard_state import ShardState

if TYPE_CHECKING:  # a shard process, which checkpoints too, never loads the coordinator
    from pserver.coordinator import Coordinator

log = logging.getLogger(__name__)

FORMAT = "notpu-shard/1"
COORDINATOR_FILE = "coordinator.json"


def shard_file(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shard-{index}.npz"


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(path.name.replace(".npz", f".{tag}.npz"))


def shard_files(directory: str | Path, index: int) -> list[Path]:
    """Shard ``index``'s checkpoint files that may hold its state: the current, one being verified, the previous."""
    path = shard_file(directory, index)
    return [path, _sibling(path, "new"), _sibling(path, "prev")]


#: The header's fields besides the state's: the slice's CRC32, when it was written (time.time()), the format.
FILE_FIELDS = ("crc32", "written_at", "format")
#: The state's fields the header holds: all but the centre, which is the file's other array.
STATE_FIELDS = tuple(f.name for f in fields(ShardState) if f.name != "centre")


def header_of(state: ShardState, crc32: int, written_at: float) -> dict[str, Any]:
    """The file header of a shard's state (in JSON, worker ids become strings and tuples lists)."""
    return {**{name: getattr(state, name) for name in STATE_FIELDS}, "crc32": crc32, "written_at": written_at,
            "format": FORMAT}


def state_of(header: dict[str, Any], centre: np.ndarray) -> ShardState:
    """A file's header and slice, as the state `Shard.restore` takes (worker ids back to ints, lists to tuples)."""
    def value(v: Any) -> Any:
        if isinstance(v, dict):
            return {int(k): x for k, x in v.items()}
        return tuple(v) if isinstance(v, list) else v
    return ShardState(**{name: value(header[name]) for name in STATE_FIELDS}, centre=centre)


def _count(v: Any) -> bool:
    """A JSON integer >= 0 (not a bool, which JSON keeps apart but Python counts as an int)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count_key(k: str) -> bool:
    return isinstance(k, str) and k.isascii() and k.isdigit()


#: Each header field's check, as the wire's headers are checked (`pserver.protocol.field`): (test, what it must be).
HEADER_TYPES: dict[str, tuple[Any, str]] = {
    **{name: (_count, "an integer >= 0") for name in ("index", "start", "end", "total", "world", "version", "round")},
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "seqs": (lambda v: isinstance(v, dict) and all(_count_key(k) and _count(x) for k, x in v.items()),
             "an object of worker id -> integer >= 0"),
    "updates": (lambda v: isinstance(v, dict) and all(_count_key(k) and _count(x) for k, x in v.items()),
                "an object of worker id -> integer >= 0"),
    "lost": (lambda v: isinstance(v, list) and all(_count(x) for x in v), "a list of worker ids (integers >= 0)"),
    "left": (lambda v: isinstance(v, list) and all(_count(x) for x in v), "a list of worker ids (integers >= 0)"),
    "crc32": (lambda v: _count(v) and v < 1 << 32, "an integer in [0, 2^32)"),
    "written_at": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                   "a finite number"),
    "format": (lambda v: isinstance(v, str), "a string"),
}


def header_error(meta: dict[str, Any]) -> str:
    """What is wrong with a shard checkpoint's header fields ("" if nothing): the first field, its value's type
    and what it must be, then whether its range is consistent."""
    for name, (test, what) in HEADER_TYPES.items():
        if name in meta and not test(meta[name]):
            value = repr(meta[name])
            return f"{name} is {value[:40]}{'...' if len(value) > 40 else ''} ({type(meta[name]).__name__}), " \
                   f"must be {what}"
    if not meta["start"] <= meta["end"] <= meta["total"]:
        return f"start {meta['start']}, end {meta['end']}, total {meta['total']}: must be start <= end <= total"
    return ""


def save_shard(directory: str | Path, state: ShardState) -> Path:
    """Write shard ``state.index``'s state (its slice (n,) float32 and a JSON header) as ``shard-K.npz``.

    The new file replaces the last good one only after it was read back whole (`load_shard`); the last good
    one stays beside it as ``shard-K.prev.npz``. CheckpointError, with nothing replaced, if the slice holds
    NaN or Inf or the file does not read back as written; OSError if it cannot be written.
    """
    centre = np.ascontiguousarray(state.centre, dtype="<f4")
    if centre.shape != (state.end - state.start,):
        raise CheckpointError(f"shard {state.index}: slice of {centre.shape} for range [{state.start}, {state.end})")
    if not np.isfinite(centre).all():
        raise CheckpointError(f"shard {state.index}: not checkpointed at version {state.version}, its slice holds "
                              f"NaN or Inf; the last good checkpoint is kept")
    crc = zlib.crc32(memoryview(centre).cast("B"))
    header = header_of(state, crc, time.time())
    meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = shard_file(directory, state.index)
    new, prev = _sibling(path, "new"), _sibling(path, "prev")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(new, lambda f: np.savez(f, centre=centre, meta=meta))
    try:
        back, _ = load_shard(new)
        if back.version != state.version or zlib.crc32(memoryview(back.centre).cast("B")) != crc:
            raise CheckpointError(f"checkpoint {new} does not read back as written")
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    if path.exists():
        os.replace(path, prev)  # the last good one, until the next one is verified
    os.replace(new, path)
    fsync_dir(path.parent)
    return path


def newest_shard_checkpoint(directory: str | Path, index: int) -> tuple[Path, ShardState, float] | None:
    """The newest of shard ``index``'s checkpoint files that reads back good: (its path, state, written_at).

    None if there is none at all; CheckpointError (that of ``shard-K.npz``, or of the first file present)
    if every one present is bad. A bad or older file passed over is a warning naming it.
    """
    good: list[tuple[float, int, Path, ShardState]] = []
    errors: list[CheckpointError] = []
    for path in shard_files(directory, index):
        if not path.exists():
            continue
        try:
            state, written_at = load_shard(path)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        good.append((written_at, state.version, path, state))
    if not good:
        if errors:
            raise errors[0]
        return None
    written_at, _, path, state = max(good, key=lambda g: (g[0], g[1]))
    for exc in errors:
        log.warning("%s; shard %d restores from %s instead", exc, index, path)
    if path != shard_file(directory, index):
        log.warning("shard %d restores from %s (version %d): it is the newest checkpoint that reads back good",
                    index, path, state.version)
    return path, state, written_at


def load_shard(path: str | Path) -> tuple[ShardState, float]:
    """Read and check one shard checkpoint: its state and when it was written (time.time()).

    CheckpointError naming the file if anything is off.
    """
    path = Path(path)
    hint = "delete it to start this shard empty, or restore from a complete copy of the directory"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != {"centre", "meta"}:
                raise CheckpointError(f"checkpoint {path} holds {sorted(z.files)}, expected centre and meta; "
                                      f"it is not a notpu shard checkpoint")
            meta = json.loads(bytes(z["meta"]).decode())
            centre = np.array(z["centre"], dtype="<f4")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is torn or corrupt ({type(exc).__name__}: {exc}); {hint}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has a header that is not a JSON object; {hint}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is format {meta.get('format')!r}, this version reads {FORMAT!r}")
    missing = sorted(set(STATE_FIELDS + FILE_FIELDS) - set(meta))
    unknown = sorted(set(meta) - set(STATE_FIELDS + FILE_FIELDS))
    if missing or unknown:
        raise CheckpointError(f"checkpoint {path} has an unexpected header (missing {missing or 'nothing'}, "
                              f"unknown {unknown or 'nothing'}); {hint}")
    wrong = header_error(meta)
    if wrong:
        raise CheckpointError(f"checkpoint {path} has an unexpected header field: {wrong}; {hint}")
    state = state_of(meta, centre)
    if centre.ndim != 1 or centre.shape[0] != state.end - state.start:
        raise CheckpointError(f"checkpoint {path}: slice of {centre.shape} floats for range "
                              f"[{state.start}, {state.end}); {hint}")
    if zlib.crc32(memoryview(centre).cast("B")) != meta["crc32"]:
        raise CheckpointError(f"checkpoint {path}: the slice's CRC32 does not match its header; {hint}")
    if not np.isfinite(centre).all():
        raise CheckpointError(f"checkpoint {path} holds NaN or Inf weights")
    return state, float(meta["written_at"])


# ---- the coordinator's side ------------------------------------------------

COORDINATOR_FORMAT = "notpu-coordinator/2"


def _crc(state: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(state, sort_keys=True, separators=(",", ":")).encode())


def save_coordinator(directory: str | Path, state: CoordinatorState) -> Path:
    """Write the coordinator's state (`Coordinator.snapshot()`) atomically, in its wire form, with its format,
    the time and a CRC32 of the wire form, as ``coordinator.json``."""
    path = Path(directory) / COORDINATOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    wire = state.to_wire()
    return atomic_write_json(path, {"format": COORDINATOR_FORMAT, "written_at": time.time(), "crc32": _crc(wire),
                                    "state": wire}, indent=1)


def load_coordinator(directory: str | Path) -> dict[str, Any]:
    """Read and check ``coordinator.json``: the wire form `save_coordinator` wrote (`restore_coordinator`
    checks it against the server restoring it). CheckpointError naming the file if it is missing, torn,
    damaged (its CRC32), of another format or lacks a field."""
    path = Path(directory) / COORDINATOR_FILE
    hint = (f"restore from a complete copy of {directory}, or start without --restore (a new run: its workers "
            f"must be restarted too)")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: nothing to restore (was the server started with "
                              f"--checkpoint-dir {directory}, and did a worker join?)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is torn or not a notpu coordinator checkpoint ({type(exc).__name__}: "
                              f"{exc}); {hint}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        raise CheckpointError(f"{path} is not a notpu coordinator checkpoint (no state object); {hint}")
    if doc.get("format") != COORDINATOR_FORMAT:
        raise CheckpointError(f"{path} is format {doc.get('format')!r}, this version reads {COORDINATOR_FORMAT!r}; "
                              f"{hint}")
    state = doc["state"]
    if doc.get("crc32") != _crc(state):
        raise CheckpointError(f"{path}: the state's CRC32 does not match its header (damaged on disk or in a "
                              f"copy, or edited without it); {hint}")
    missing = [k for k in WIRE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; {hint}")
    return state


def check_restore(directory: str | Path, shards: int, world: int | None = None) -> dict[str, Any]:
    """Check the whole directory before anything starts: the coordinator's file and every shard's.

    Returns the coordinator's state in its wire form (`load_coordinator`).
    ``shards`` and ``world`` must be the checkpoint's (the run config is
    compared when `restore_coordinator` restores it). A shard file that is
    missing is allowed (that shard starts empty and says so); one that is
    torn, or whose range or fingerprint differs from the coordinator's, is
    refused, and so is one beside a coordinator that holds no model (they
    come from different runs).
    """
    state = load_coordinator(directory)
    path = Path(directory) / COORDINATOR_FILE
    if state["shards"] != shards:
        raise CheckpointError(f"{path} was written by a server with {state['shards']} shard(s); "
                              f"start with --shards {state['shards']}")
    if world is not None and state["world"] != world:
        raise CheckpointError(f"{path} was written by a server of {state['world']} worker(s); "
                              f"start with --workers {state['world']}")
    try:
        ranges = [(int(a), int(b)) for a, b in state["ranges"]]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has malformed shard ranges ({exc}); it was edited or is torn") from None
    if not ranges:
        strays = [shard_file(directory, k) for k in range(shards) if shard_file(directory, k).exists()]
        if strays:
            raise CheckpointError(f"{strays[0]} exists but {path} holds no model: they are from different runs; "
                                  f"restore from one run's directory")
        return state
    if len(ranges) != shards:
        raise CheckpointError(f"{path} holds {len(ranges)} shard range(s) for {state['shards']} shard(s); "
                              f"it was edited or is torn")
    for k, (start, end) in enumerate(ranges):
        found = newest_shard_checkpoint(directory, k)
        if found is None:
            log.warning("no checkpoint %s: shard %d will start empty and wait for an INIT", shard_file(directory, k), k)
            continue
        path, shard_state, _ = found
        check_snapshot(path, shard_state, k, (start, end), state["total"], state["fingerprint"])
    return state


def check_snapshot(path: Path, snap: ShardState, index: int, rng: tuple[int, int], total: int,
                   fingerprint: str) -> None:
    if snap.index != index or (snap.start, snap.end) != tuple(rng) or snap.total != total:
        raise CheckpointError(f"checkpoint {path} is shard {snap.index} [{snap.start}, {snap.end}) of {snap.total}; "
                              f"the coordinator expects shard {index} [{rng[0]}, {rng[1]}) of {total}")
    if snap.fingerprint and fingerprint and snap.fingerprint != fingerprint:
        raise CheckpointError(f"checkpoint {path} belongs to another model (layout fingerprint {snap.fingerprint[:12]} "
                              f"!= {fingerprint[:12]} in {COORDINATOR_FILE})")


# ---- hooking a Shard up ------------------------------------------------------

def restore_shard(shard: Shard, path: str | Path) -> ShardState:
    """Load a checkpoint into a fresh Shard (before it serves); returns the state restored."""
    state, written_at = load_shard(path)
    return _restore(shard, path, state, written_at)


def restore_newest(shard: Shard, directory: str | Path) -> ShardState | None:
    """Load the newest good checkpoint of the shard (`newest_shard_checkpoint`) into it; None if there is none."""
    found = newest_shard_checkpoint(directory, shard.config.index)
    return None if found is None else _restore(shard, *found)


def _restore(shard: Shard, path: str | Path, state: ShardState, written_at: float) -> ShardState:
    if state.index != shard.config.index:
        raise CheckpointError(f"checkpoint {path} is shard {state.index}'s, not shard {shard.config.index}'s")
    shard.restore(state)
    log.info("shard %d restored from %s: [%d, %d) of %d at version %d (written %.1f s ago)", state.index, path,
             state.start, state.end, state.total, state.version, time.time() - written_at)
    return state


def _changes(state: ShardState) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """What a new checkpoint is written for: the version, the round or a push's seq moved."""
    return state.version, state.round, tuple(sorted(state.seqs.items()))


class Checkpointer:
    """Saves a shard every ``every_s`` seconds (if it changed) and on demand; called from the shard's tick.

    A save that fails (the disk is full, the directory not writable) is a warning and counted in the shard's
    stats; the shard goes on, the last good checkpoint stays, and the save is tried again ``every_s`` later
    (and on demand) until one succeeds.
    """

    def __init__(self, shard: Shard, directory: str | Path, every_s: float) -> None:
        self.shard = shard
        self.directory = Path(directory)
        self.every_s = every_s
        self._saved: tuple[int, int, tuple[tuple[int, int], ...]] | None = None
        self._last = time.monotonic()
        self._failing = False

    def mark_saved(self) -> None:
        """The shard was just restored: its state is on disk already."""
        self._saved = _changes(self.shard.snapshot())

    def tick(self) -> None:
        if self.shard.centre is None:
            return
        now = time.monotonic()
        due = self.every_s > 0 and now - self._last >= self.every_s
        if due or (self._saved is None and not self._failing):  # the first one at once, retried at the interval
            self.save()

    def save(self) -> Path | None:
        """Write a checkpoint if the state changed since the last one; its path, or None (unchanged, or failed)."""
        s = self.shard
        if s.centre is None:
            return None
        self._last = time.monotonic()
        state = s.snapshot()
        if _changes(state) == self._saved:
            return None
        t0 = time.perf_counter()
        stats = s.stats
        try:
            path = save_shard(self.directory, state)
        except (OSError, CheckpointError) as exc:
            stats.checkpoint_failures += 1
            stats.checkpoint_error = f"{type(exc).__name__}: {exc}"
            self._failing = True
            log.warning("shard %d: checkpoint at version %d not written (%s); serving on, the last good checkpoint "
                        "is kept, trying again in %g s", s.config.index, state.version, stats.checkpoint_error,
                        self.every_s)
            return None
        self._saved = _changes(state)
        stats.checkpoint_ok_at = time.time()
        if self._failing:
            self._failing = False
            log.warning("shard %d: checkpoints written again, at version %d, after %d failure(s)", s.config.index,
                        state.version, stats.checkpoint_failures)
        log.debug("shard %d checkpoint at version %d in %.1f ms", s.config.index, s.version,
                  (time.perf_counter() - t0) * 1e3)
        return path


# ---- hooking the Coordinator up ------------------------------------------------

def restore_coordinator(coord: Coordinator, wire: dict[str, Any], directory: str | Path) -> CoordinatorState:
    """Check a `load_coordinator` state against the coordinator (`CoordinatorState.from_wire`) and restore it
    (before it serves); returns the state restored. CheckpointError naming the file and what to do if it
    does not match."""
    path = Path(directory) / COORDINATOR_FILE
    try:
        state = CoordinatorState.from_wire(wire, coord.n_shards, coord.world, coord.run_config)
    except ValueError as exc:
        raise CheckpointError(f"{path} cannot be restored by this server: {exc}; start with the options the run "
                              f"was started with (its run config is the file's state.run), or restore from a "
                              f"complete copy of {directory}") from None
    coord.restore(state)
    log.info("restored the coordinator from %s", path)
    return state


class CoordinatorCheckpointer:
    """Writes the coordinator's state (`Coordinator.snapshot`) to ``directory/coordinator.json``: at once when
    a reply reports a decision (`Coordinator.on_change`, which this installs), and from `tick` every
    ``every_s`` seconds if anything else changed (heartbeat counts, lost workers, observers). Each write is
    a few milliseconds (one fsynced JSON file); decisions come a few per worker per run."""

    def __init__(self, coord: Coordinator, directory: str | Path, every_s: float) -> None:
        self.coord = coord
        self.directory = Path(directory)
        self.every_s = every_s
        self._saved: CoordinatorState | None = None
        self._last = time.monotonic()
        self._failing = False
        coord.on_change = self.save

    def restored(self) -> None:
        """The coordinator was just restored from this directory: its state is on disk already, and what
        changes from now on (the shards registering again, heartbeats) is written every ``every_s``."""
        self._saved = self.coord.snapshot()

    def save(self) -> Path | None:
        """Write the state if it changed since the last write; the path written, or None (unchanged, or not
        written: a warning, counted in the coordinator's summary, `checkpoint`, and tried again at the next
        interval; the run goes on, the file on disk is the last one written)."""
        self._last = time.monotonic()
        state = self.coord.snapshot()
        if state == self._saved:
            return None
        status = self.coord.checkpoint_status
        try:
            path = save_coordinator(self.directory, state)
        except OSError as exc:
            status["failures"] += 1
            status["error"] = f"{type(exc).__name__}: {exc}"
            self._failing = True
            log.warning("coordinator: checkpoint not written (%s); the run goes on, trying again in %g s",
                        status["error"], self.every_s)
            return None
        self._saved = state
        status["ok_at"] = time.time()
        if self._failing:
            self._failing = False
            log.warning("coordinator: checkpoints written again after %d failure(s)", status["failures"])
        return path

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if (self._saved is not None or self._failing) and self.every_s > 0 and now - self._last >= self.every_s:
            self.save()  # after the first decision only: before it there is nothing a restart would miss

"""Checkpoints: a shard's slice and the coordinator's model, written atomically, read back strictly.

Files in the checkpoint directory::

    coordinator.json   the coordinator's state (`pserver.coordinator.Coordinator.snapshot`: ranks, names,
                       done and lost workers, run config, model, shard endpoints, reply memory) with its
                       format and a CRC32 of the state
    shard-K.npz        shard K's slice and a JSON header, one .npz, no pickle: the header holds every field
                       of `pserver.shard.ShardState` but the centre, and the slice's CRC32, the time
                       it was written and the format

Every file is written by `pserver.fileio`: to a temporary file beside it,
fsynced, renamed over ``NAME`` and the directory fsynced, so a crash leaves
the previous complete file or the new one, never half of one. Reading checks
everything before a shard serves a byte: the zip's own CRCs, a CRC32 of the
slice, the slice length against the range, and the range and fingerprint
against ``coordinator.json``, whose own CRC32, shard count, world and run
config must match the server restoring it. A torn or foreign checkpoint
raises CheckpointError naming the file.

What a restored shard may have lost: the updates it applied after its last
checkpoint whose replies had already reached the workers. A push whose reply
was lost is retried by the client with the same seq; the restored shard's
per-worker seq table is that of the checkpoint, so such a push is applied
again exactly once.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from pserver.errors import CheckpointError
from pserver.fileio import atomic_write, atomic_write_json
from pserver.shard import Shard, ShardState

log = logging.getLogger(__name__)

FORMAT = "notpu-shard/1"
COORDINATOR_FILE = "coordinator.json"


def shard_file(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shard-{index}.npz"


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


def save_shard(directory: str | Path, state: ShardState) -> Path:
    """Write shard ``state.index``'s state (its slice (n,) float32 and a JSON header) atomically."""
    centre = np.ascontiguousarray(state.centre, dtype="<f4")
    if centre.shape != (state.end - state.start,):
        raise CheckpointError(f"shard {state.index}: slice of {centre.shape} for range [{state.start}, {state.end})")
    header = header_of(state, zlib.crc32(memoryview(centre).cast("B")), time.time())
    meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = shard_file(directory, state.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: np.savez(f, centre=centre, meta=meta))


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
    try:
        state = state_of(meta, centre)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unexpected header ({exc}); {hint}") from None
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


def save_coordinator(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write the coordinator's state (`Coordinator.snapshot()`) atomically, with its format, the time and a
    CRC32 of the state, as ``coordinator.json``."""
    path = Path(directory) / COORDINATOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"format": COORDINATOR_FORMAT, "written_at": time.time(), "crc32": _crc(state),
                                    "state": state}, indent=1)


def load_coordinator(directory: str | Path) -> dict[str, Any]:
    """Read and check ``coordinator.json``: the state `save_coordinator` wrote. CheckpointError naming the file
    if it is missing, torn, edited, of another format or lacks a field."""
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
        raise CheckpointError(f"{path}: the state's CRC32 does not match its header (edited or corrupt); {hint}")
    missing = [k for k in COORDINATOR_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; {hint}")
    return state


#: The fields of the coordinator's state (`pserver.coordinator.Coordinator.STATE_KEYS`; this module does not
#: import the coordinator, which restores them).
COORDINATOR_KEYS = ("address", "shards", "world", "run", "endpoints", "layout", "architecture", "ranges", "total",
                    "fingerprint", "workers", "stop", "observers", "memory", "refused", "repeats")


def check_restore(directory: str | Path, shards: int, world: int | None = None) -> dict[str, Any]:
    """Check the whole directory before anything starts: the coordinator's file and every shard's.

    Returns the coordinator state. ``shards`` and ``world`` must be the
    checkpoint's (the run config is compared when the coordinator restores
    it). A shard file that is missing is allowed (that shard starts empty and
    says so); one that is torn, or whose range or fingerprint differs from the
    coordinator's, is refused, and so is one beside a coordinator that holds
    no model (they come from different runs).
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
        path = shard_file(directory, k)
        if not path.exists():
            log.warning("no checkpoint %s: shard %d will start empty and wait for an INIT", path, k)
            continue
        shard_state, _ = load_shard(path)
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
    """Saves a shard every ``every_s`` seconds (if it changed) and on demand; called from the shard's tick."""

    def __init__(self, shard: Shard, directory: str | Path, every_s: float) -> None:
        self.shard = shard
        self.directory = Path(directory)
        self.every_s = every_s
        self._saved: tuple[int, int, tuple[tuple[int, int], ...]] | None = None
        self._last = time.monotonic()

    def mark_saved(self) -> None:
        """The shard was just restored: its state is on disk already."""
        self._saved = _changes(self.shard.snapshot())

    def tick(self) -> None:
        if self.shard.centre is None:
            return
        now = time.monotonic()
        if self._saved is None or (self.every_s > 0 and now - self._last >= self.every_s):
            self.save()

    def save(self) -> Path | None:
        s = self.shard
        if s.centre is None:
            return None
        self._last = time.monotonic()
        state = s.snapshot()
        if _changes(state) == self._saved:
            return None
        t0 = time.perf_counter()
        path = save_shard(self.directory, state)
        self._saved = _changes(state)
        log.debug("shard %d checkpoint at version %d in %.1f ms", s.config.index, s.version,
                  (time.perf_counter() - t0) * 1e3)
        return path

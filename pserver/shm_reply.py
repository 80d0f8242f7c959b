"""The shared-memory flags of a shard's reply: where a co-located worker reads what the reply carries.

A request that came through shared memory (its header's ``shm`` is the
worker's push-segment token) is answered without frames for what the
segments hold (`pserver.protocol`, "Shared memory"). The reply's header says
where to look:

- ``shm`` true: the reply went through shared memory; the centre is in the
  shard's centre segment (read under its seqlock).
- ``shm_arrays`` 1: the apply's one array (elastic: E) is in the worker's
  reply area, not in a frame.
- ``shm_centre`` 1: the centre at the reply's version is in the reply area
  (the apply wrote it there in its own pass); rewritten only by this worker's
  next PUSH.

`encode` (the shard) and `decode` (the worker) are the only places these
names are written and read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ShmReply:
    """A reply's shared-memory flags, decoded."""

    shared: bool = False  # the reply went through shared memory (``shm``)
    array_in_area: bool = False  # the apply's one array is in the reply area (``shm_arrays``)
    centre_in_area: bool = False  # the centre is in the reply area (``shm_centre``)


def encode(header: dict[str, Any], extra: Sequence[np.ndarray] = (), area: np.ndarray | None = None,
           centre_copied: bool = False) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and the frames of a reply through shared memory: (header with its flags, arrays still to send).

    An apply's one array shaped as ``area`` (the worker's reply area, (n,) float32) is copied there instead
    of a frame; else, with no array, ``centre_copied`` (the apply wrote the centre into the area) is said.
    Anything else travels as frames, as over ZeroMQ.
    """
    header = dict(header, shm=True)
    arrays = list(extra)
    if area is not None and len(arrays) == 1 and arrays[0].shape == area.shape and arrays[0].dtype == np.float32:
        np.copyto(area, arrays[0])
        header["shm_arrays"] = 1
        arrays = []
    elif centre_copied and not arrays:
        header["shm_centre"] = 1
    return header, arrays


def decode(header: dict[str, Any]) -> ShmReply:
    """A reply header's shared-memory flags; a reply over ZeroMQ has none (all False)."""
    return ShmReply(shared=bool(header.get("shm")), array_in_area=header.get("shm_arrays") == 1,
                    centre_in_area=header.get("shm_centre") == 1)

"""pserver.shm_reply: what a shard encodes in a reply through shared memory is what the worker decodes."""
from __future__ import annotations

import numpy as np
import pytest

from pserver import protocol, shm_reply


def round_trip(header, extra=(), area=None, centre_copied=False):
    """Encode as a shard does, through the wire, and decode as the worker does."""
    h, frames = shm_reply.encode(header, extra, area, centre_copied)
    msg = protocol.decode(protocol.encode(h, frames))
    return shm_reply.decode(msg.header), msg


def test_a_reply_over_zeromq_has_no_flags():
    assert shm_reply.decode(protocol.ok(version=3)) == shm_reply.ShmReply(False, False, False)


def test_a_pull_through_shared_memory_points_at_the_centre_segment():
    flags, msg = round_trip(protocol.ok(version=7))
    assert flags == shm_reply.ShmReply(shared=True) and msg.arrays == [] and msg.header["version"] == 7


def test_an_apply_array_goes_to_the_reply_area_not_a_frame():
    area = np.zeros(5, np.float32)
    e = np.arange(5, dtype=np.float32)
    flags, msg = round_trip(protocol.ok(version=2), [e], area)
    assert flags == shm_reply.ShmReply(shared=True, array_in_area=True) and msg.arrays == []
    np.testing.assert_array_equal(area, e)


def test_the_centre_copied_by_the_apply_is_said_only_when_no_array_is_sent():
    area = np.zeros(4, np.float32)
    assert round_trip(protocol.ok(), [], area, centre_copied=True)[0] == shm_reply.ShmReply(True, False, True)
    flags, _ = round_trip(protocol.ok(), [np.ones(4, np.float32)], area, centre_copied=True)
    assert flags == shm_reply.ShmReply(True, True, False)  # the area holds E, not the centre


@pytest.mark.parametrize("extra", [[np.ones(3, np.float32)], [np.ones(4, np.float16)],
                                   [np.ones(4, np.float32), np.ones(4, np.float32)]])
def test_arrays_that_do_not_fit_the_area_travel_as_frames(extra):
    area = np.zeros(4, np.float32)
    flags, msg = round_trip(protocol.ok(), extra, area, centre_copied=True)
    assert flags == shm_reply.ShmReply(shared=True) and len(msg.arrays) == len(extra)
    assert not area.any()

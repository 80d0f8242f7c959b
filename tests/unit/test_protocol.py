import msgpack
import numpy as np
import pytest

from pserver import protocol
from pserver.errors import ProtocolError


def frames_of(header, arrays=()):
    return [bytes(f) for f in protocol.encode(header, arrays)]


def test_round_trip_is_zero_copy_views():
    a = np.arange(10, dtype=np.float32)
    msg = protocol.decode(frames_of({"op": "PUSH", "seq": 3}, [a]))
    assert msg.op == "PUSH" and msg.header["seq"] == 3 and msg.header["v"] == protocol.PROTOCOL_VERSION
    np.testing.assert_array_equal(msg.arrays[0], a)
    assert msg.arrays[0].dtype == np.dtype("<f4")


def test_big_endian_input_travels_as_little_endian():
    a = np.arange(4, dtype=">f4")
    msg = protocol.decode(frames_of({"op": "X"}, [a]))
    np.testing.assert_array_equal(msg.arrays[0], a.astype("<f4"))


def test_float64_cannot_travel():
    with pytest.raises(ProtocolError, match="float64"):
        protocol.encode({"op": "X"}, [np.zeros(3)])


@pytest.mark.parametrize("frames, code, words", [
    ([], "malformed", "empty"),
    ([b"\xc1"], "malformed", "not msgpack"),
    ([msgpack.packb([1, 2])], "malformed", "map"),
    ([msgpack.packb({"v": 99, "op": "PULL"})], "version", "99"),
    ([msgpack.packb({"op": "PULL"})], "version", "None"),
    ([msgpack.packb({"v": 1, "op": 5})], "malformed", "'op'"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": [["<f4", 2]]})], "frames", "announces 1"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": [["<f8", 1]]}), b"\0" * 8], "dtype", "<f8"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": [["<f4", 3]]}), b"\0" * 8], "size", "8 bytes"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": [["<f4", -1]]}), b""], "size", "negative"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": [["<f4"]]}), b""], "malformed", "spec 1"),
    ([msgpack.packb({"v": 1, "op": "PUSH", "arrays": "x"})], "malformed", "list"),
])
def test_bad_frames_are_named(frames, code, words):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    assert info.value.code == code
    assert words in info.value.reason


def test_field_checks_types():
    with pytest.raises(ProtocolError, match="'seq' is missing"):
        protocol.field({}, "seq", int)
    with pytest.raises(ProtocolError, match="'seq' must be int"):
        protocol.field({"seq": "1"}, "seq", int)
    with pytest.raises(ProtocolError, match="bool"):
        protocol.field({"seq": True}, "seq", int)
    assert protocol.field({}, "pull", bool, False) is False

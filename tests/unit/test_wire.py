"""The half-precision wire (`pserver.precision`) against numpy re-statements, and a shard fed 16-bit frames."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from pserver import precision, protocol
from pserver.shard import Shard, numba_kernels
from pserver.shard_state import ShardConfig
from wire import Wire

N = 4097


def awkward(n: int = N, seed: int = 0) -> np.ndarray:
    """Values of every magnitude, ties of both roundings, signed zeros, denormals and infinities. (n,)"""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    x[:8] = [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 3.4e38, 1.0]
    x.view(np.uint32)[8:16] = [0x3F808000, 0x3F818000, 0x3F80C000, 0xBF808000, 0x3F807FFF, 0x7F7FFFFF, 1, 0x00808000]
    return x


def test_bfloat16_rounds_to_nearest_even_as_ml_dtypes_does():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = awkward()
    expected = x.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(precision.narrow(x, "bfloat16"), expected.view(np.uint16))
    np.testing.assert_array_equal(precision.widen(precision.narrow(x, "bfloat16")), expected.astype(np.float32))


def test_float16_is_numpys_and_nan_stays_nan():
    x = awkward()
    np.testing.assert_array_equal(precision.narrow(x, "float16"), x.astype(np.float16))
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(precision.widen(precision.narrow(nan, "bfloat16"))).all()
    assert precision.fits(np.array([65504.0], np.float32), "float16")
    assert not precision.fits(np.array([-70000.0], np.float32), "float16")
    assert precision.fits(np.array([1e38], np.float32), "bfloat16")


@pytest.mark.parametrize("wire, dtype", [("float16", np.float16), ("bfloat16", None)])
def test_error_feedback_is_its_numpy_restatement(wire, dtype):
    """v = Δ + r, q = round(v), r ← v − q: each push sent and each residual equal the re-statement bit for bit."""
    rng = np.random.default_rng(1)
    deltas = [(rng.standard_normal(N) * 1e-3).astype(np.float32) for _ in range(20)]
    feedback = precision.ErrorFeedback(N, wire)
    r = np.zeros(N, np.float32)
    sent_total = np.zeros(N, np.float64)
    for d in deltas:
        q = np.concatenate([feedback.encode(d[:1000], 0, 1000), feedback.encode(d[1000:], 1000, N)])  # two shards
        v = d + r
        if dtype is None:
            ml_dtypes = pytest.importorskip("ml_dtypes")
            expected = v.astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(q, expected.view(np.uint16))
            r = v - expected.astype(np.float32)
        else:
            np.testing.assert_array_equal(q, v.astype(dtype))
            r = v - v.astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(feedback.residual, r)
        sent_total += precision.widen(q)
    # Nothing is lost, only delayed: what was sent and what is still held add up to what was pushed.
    np.testing.assert_allclose(sent_total + r, np.sum(deltas, axis=0, dtype=np.float64), rtol=0, atol=1e-7)


# ---- a shard fed 16-bit frames ---------------------------------------------------------------------------

def frames(header, arrays=()):
    return [zmq.Frame(b"peer"), *(zmq.Frame(bytes(f)) for f in protocol.encode(header, arrays))]


@pytest.fixture
def shard():
    s = Shard(ShardConfig(), kernels=numba_kernels(), socket=Wire())
    s.handle(frames({"op": "INIT", "start": 0, "end": N, "total": N, "world": 1}, [np.ones(N, np.float32)]))
    s.socket.take()
    return s


def ask(shard, header, arrays=()):
    shard.handle(frames(header, arrays))
    [(_, reply)] = shard.socket.take()
    return reply


def push(seq, **fields):
    return {"op": "PUSH", "worker": 0, "seq": seq, "pulled": 0, "mode": "add", **fields}


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_a_half_precision_push_is_widened_and_applied_and_the_centre_comes_back_narrowed(shard, wire):
    d = (np.random.default_rng(2).standard_normal(N) * 1e-2).astype(np.float32)
    q = precision.narrow(d, wire)
    reply = ask(shard, push(1, pull=True, wire=wire), [q])
    assert reply.header["ok"], reply.header
    expected = np.ones(N, np.float32) + precision.widen(q)  # the centre stays float32
    np.testing.assert_array_equal(shard.centre.current, expected)
    np.testing.assert_array_equal(reply.arrays[0], precision.narrow(expected, wire))
    pulled = ask(shard, {"op": "PULL", "worker": 0, "wire": wire})
    np.testing.assert_array_equal(pulled.arrays[0], precision.narrow(expected, wire))
    assert ask(shard, {"op": "PULL", "worker": 0}).arrays[0].dtype == np.float32


def test_a_centre_beyond_float16_comes_back_as_float32(shard):
    big = np.full(N, 1e5, np.float32)
    reply = ask(shard, push(1, pull=True, wire="float16"), [big])
    assert reply.arrays[0].dtype == np.float32 and (reply.arrays[0] == np.float32(1e5 + 1)).all()


@pytest.mark.parametrize("header, arrays, code", [
    (push(1, wire="float8"), [np.ones(N, np.float16)], "malformed"),
    (push(1), [np.full(N, np.inf, np.float16)], "not_finite"),
    (push(1), [np.ones(N - 1, np.float16)], "size"),
    (push(1), [np.ones(N, np.int64)], "dtype"),
    ({"op": "INIT", "start": 0, "end": N, "total": N, "world": 1}, [np.ones(N, np.float16)], "dtype"),
    ({"op": "ROUND", "worker": 0, "round": 0, "mode": "average"}, [np.ones(N, np.uint16)], "dtype"),
])
def test_bad_half_precision_requests_are_refused_and_change_nothing(shard, header, arrays, code):
    reply = ask(shard, header, arrays)
    assert reply.header["ok"] is False and reply.header["code"] == code, reply.header
    assert (shard.centre.current == 1).all() and shard.version == 0


@pytest.fixture(params=["conversion instruction", "bit arithmetic"])
def half_kernels(request, monkeypatch):
    """Both float16 paths: the CPU's conversion (where `half_instructions` finds it) and the portable one."""
    from pserver import kernels
    if request.param == "bit arithmetic":
        monkeypatch.setattr(kernels, "half_instructions", lambda: False)
    elif not kernels.half_instructions():
        pytest.skip("this CPU has no float16 conversion instruction")
    return request.param


def test_the_numba_casts_equal_numpys_on_every_kind_of_bit_pattern(half_kernels):
    """Random bit patterns (every exponent: normals, subnormals, Inf, NaN) and ties at every exponent. Every
    non-NaN value's bits equal numpy's cast; a NaN stays a NaN (the conversion instruction quiets a signalling
    NaN, which numpy's cast keeps)."""
    rng = np.random.default_rng(5)
    ties = [(s << 31) | (e << 23) | m for s in (0, 1) for e in range(256)
            for m in (0, 1, 0x800, 0xFFF, 0x1000, 0x1001, 0x17FF, 0x2000, 0x3000, 0x3FFF, 0x7FF000, 0x7FFFFF)]
    bits = np.concatenate([rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32),
                           np.array(ties, np.uint32)])
    x = bits.view(np.float32)
    nan = np.isnan(x)
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16)
    got = precision.narrow(x, "float16")
    np.testing.assert_array_equal(got[~nan].view(np.uint16), expected[~nan].view(np.uint16))
    assert np.isnan(got[nan]).all() and nan.sum() > 1000
    if half_kernels == "bit arithmetic":
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    wide, expected_wide = precision.widen(halves), halves.astype(np.float32)
    nan = np.isnan(halves)
    np.testing.assert_array_equal(wide[~nan].view(np.uint32), expected_wide[~nan].view(np.uint32))
    assert np.isnan(wide[nan]).all()
    back = precision.widen(precision.narrow(x, "bfloat16"))
    finite = ~np.isnan(x)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np.testing.assert_array_equal(back[finite], x[finite].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.isnan(back[~finite]).all()

"""Every Numba kernel equals its numpy re-statement, and reports finiteness and norm."""
import numpy as np
import pytest

from pserver import kernels

SIZES = [1, 7, 1000, 2_447_562]


def vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)


def norm64(x):
    return float(np.sqrt(np.sum(np.asarray(x, np.float64) ** 2)))


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_add(n, copied):
    c, d = vectors(n)
    out, copy = np.empty_like(c), np.full_like(c, np.nan)
    finite, norm = kernels.add(c, d, out, copy) if copied else kernels.add(c, d, out)
    np.testing.assert_array_equal(out, c + d)
    if copied:  # the second output of the same pass (a co-located worker's reply area)
        np.testing.assert_array_equal(copy, c + d)
    assert finite and norm == pytest.approx(norm64(d), rel=1e-12)


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_add_scaled(n, copied):
    c, d = vectors(n, 1)
    out, copy = np.empty_like(c), np.full_like(c, np.nan)
    s = np.float32(1 / 12)
    finite, norm = kernels.add_scaled(c, d, s, out, copy) if copied else kernels.add_scaled(c, d, s, out)
    np.testing.assert_array_equal(out, c + s * d)
    if copied:
        np.testing.assert_array_equal(copy, c + s * d)
    assert finite and norm == pytest.approx(norm64(s * d), rel=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_elastic(n):
    c, w = vectors(n, 2)
    out, diff = np.empty_like(c), np.empty_like(c)
    a = np.float32(0.05)
    finite, norm = kernels.elastic(c, w, a, out, diff)
    e = a * (w - c)
    np.testing.assert_array_equal(diff, e)
    np.testing.assert_array_equal(out, c + e)
    assert finite and norm == pytest.approx(norm64(e), rel=1e-12)


@pytest.mark.parametrize("n", SIZES[:3])
@pytest.mark.parametrize("replace", [False, True])
def test_sum_round(n, replace):
    c, _ = vectors(n, 3)
    rows = np.random.default_rng(4).standard_normal((5, n)).astype(np.float32)
    out = np.empty_like(c)
    count = 3
    scale = 1 / count if replace else 1.0
    finite, norm = kernels.sum_round(c, rows, count, scale, replace, out)
    s = rows[:count].astype(np.float64).sum(axis=0)
    expected = (scale * s if replace else c.astype(np.float64) + s).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert finite and norm == pytest.approx(norm64(expected.astype(np.float64) - c), rel=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_reported_and_centre_untouched(bad):
    c, d = vectors(1000)
    before = c.copy()
    d[500] = bad
    out = np.empty_like(c)
    for finite, _ in (kernels.add(c, d, out), kernels.add_scaled(c, d, np.float32(0.5), out),
                      kernels.elastic(c, d, np.float32(0.5), out, np.empty_like(c)), kernels.check(d)):
        assert not finite
    np.testing.assert_array_equal(c, before)


def test_largest_finite_float32_is_still_finite():
    d = np.full(10, np.finfo(np.float32).max, np.float32)
    finite, norm = kernels.check(d)
    assert finite and np.isfinite(norm)


@pytest.mark.parametrize("n", [1, 1000, 2_447_562])
def test_a_finite_update_whose_result_overflows_is_reported(n):
    c, d = vectors(n, 5)
    i = n // 2
    c[i], d[i] = 3e38, 3e38  # each finite, their sum is not: float32 overflow
    out = np.empty_like(c)
    assert kernels.check(d)[0]
    for finite, _ in (kernels.add(c, d, out), kernels.add(c, d, out, np.empty_like(c)),
                      kernels.add_scaled(c, d, np.float32(1.0), out),
                      kernels.add_scaled(c, d, np.float32(1.0), out, np.empty_like(c))):
        assert not finite
    c[i], w = 2e38, c.copy()
    w[i] = 3.3e38  # the difference α(W − C) = 2.6e38 is finite (α = 2), C plus it is not
    diff = np.empty_like(c)
    assert not kernels.elastic(c, w, np.float32(2.0), out, diff)[0]
    assert np.isfinite(diff).all()


@pytest.mark.parametrize("replace", [False, True])
def test_a_round_whose_float32_result_overflows_is_reported(replace):
    c, _ = vectors(100, 6)
    rows = np.zeros((2, 100), np.float32)
    rows[:, 7] = 3e38  # each row finite; their sum (and mean, plus the centre) is finite in float64 only
    c[7] = 3e38
    out = np.empty_like(c)
    finite, _ = kernels.sum_round(c, rows, 2, 1.0 if not replace else 0.5 * 3, replace, out)
    assert not finite


def test_the_largest_finite_result_is_still_finite():
    big = np.finfo(np.float32).max
    c, d = np.full(10, big / 2, np.float32), np.full(10, big / 2, np.float32)
    finite, _ = kernels.add(c, d, np.empty_like(c))
    assert finite

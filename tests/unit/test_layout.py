import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pserver.errors import LayoutMismatch
from pserver.layout import Layout, flatten, shard_ranges, unflatten


def talk_gru_shapes(features: int = 50, hidden: int = 512) -> list[tuple[int, ...]]:
    """get_weights() shapes of the talk's network: BN, GRU(512, seq), BN, GRU(512), BN, Dense(2)."""
    bn = lambda n: [(n,)] * 4  # gamma, beta, moving mean, moving variance
    gru = lambda i, h: [(i, 3 * h), (h, 3 * h), (2, 3 * h)]  # kernel, recurrent kernel, bias (reset_after)
    return [*bn(features), *gru(features, hidden), *bn(hidden), *gru(hidden, hidden), *bn(hidden), (hidden, 2), (2,)]


def test_talk_model_has_the_talks_size():
    assert Layout.from_shapes(talk_gru_shapes()).total == 2_447_562


def test_round_trip_of_the_talks_weights():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in talk_gru_shapes()]
    layout = Layout.of(weights)
    flat = flatten(weights)
    assert flat.dtype == np.float32 and flat.shape == (2_447_562,)
    back = unflatten(flat, layout)
    assert [w.shape for w in back] == [w.shape for w in weights]
    for a, b in zip(weights, back):
        np.testing.assert_array_equal(a, b)
    # offsets are contiguous and in order
    ends = [t.offset + t.size for t in layout.tensors]
    assert [t.offset for t in layout.tensors[1:]] == ends[:-1]


def test_layout_survives_the_wire_and_names_differences():
    a = Layout.from_shapes(talk_gru_shapes())
    assert Layout.from_wire(a.to_wire()) == a
    b = Layout.from_shapes(talk_gru_shapes(hidden=256))
    with pytest.raises(LayoutMismatch, match=r"tensor 4 .* shape \(50, 768\).*\(50, 1536\)"):
        a.check_same(b)
    with pytest.raises(ValueError, match="layout entry 0"):
        Layout.from_wire([["w", [-1]]])
    with pytest.raises(ValueError):
        Layout.from_wire("not a list")


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 10**9), shards=st.integers(1, 64))
def test_shard_ranges_tile_exactly(total, shards):
    if total < shards:
        with pytest.raises(ValueError):
            shard_ranges(total, shards)
        return
    ranges = shard_ranges(total, shards)
    assert len(ranges) == shards
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_ranges_are_a_pure_function():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(10, 3) == shard_ranges(10, 3)

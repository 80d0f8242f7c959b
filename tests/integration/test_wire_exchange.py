"""A worker on a half-precision wire, with a real server: the centre is its numpy re-statement, bit for bit."""
import numpy as np
import pytest

from pserver import precision
from pserver.client import Client, ClientConfig
from pserver.layout import Layout

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats, odd on purpose


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_pushes_and_pulls_on_a_half_precision_wire(pserver, wire):
    server = pserver("--shards", "2", "--workers", "1")
    client = Client(server.address, ClientConfig(wire=wire, shared_memory=False))  # as from another host
    try:
        client.join("w")
        initial = np.random.default_rng(7).standard_normal(LAYOUT.total).astype(np.float32)
        assert client.init(initial, LAYOUT)  # INIT is float32 always
        rng = np.random.default_rng(3)
        centre, r = initial.copy(), np.zeros(LAYOUT.total, np.float32)
        for i in range(12):
            d = (rng.standard_normal(LAYOUT.total) * 1e-2).astype(np.float32)
            v = d + r  # the re-statement of the worker's error feedback
            q = precision.widen(precision.narrow(v, wire))
            r = v - q
            centre = centre + q  # the shards add the widened push to their float32 centre
            _, pulled = client.push(d, pull=(i % 4 == 3))
            if pulled is not None:
                np.testing.assert_array_equal(pulled, precision.widen(precision.narrow(centre, wire)))
        exact = Client(server.address, ClientConfig(shared_memory=False))
        exact.use_shards([dict(index=s.index, endpoint=s.endpoint, start=s.start, end=s.end) for s in client.shards])
        np.testing.assert_array_equal(exact.pull(), centre)  # float32 at the shards
        np.testing.assert_array_equal(client.residual, r)
        exact.close()
    finally:
        client.close()

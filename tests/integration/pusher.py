"""A client process for the invariant test: pushes seeded integer deltas.

    python tests/integration/pusher.py HOST:PORT WORKER PUSHES SEED

Integer-valued float32 deltas keep every partial sum exact, so the centre must
equal initial + Σ deltas to the last bit whatever order the shards see them in.
"""
import sys

import numpy as np

from pserver.client import Client


def deltas(total: int, pushes: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(pushes):
        yield rng.integers(-8, 9, size=total).astype(np.float32)


def main() -> None:
    address, worker, pushes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    client = Client(address)
    client.join(f"pusher{worker}")
    client.pull()
    total = client.total
    for i, d in enumerate(deltas(total, pushes, seed)):
        client.push(d, mode="add", pull=(i % 3 == 0))  # mix plain pushes and push+pull
    client.done({"pushes": pushes})
    client.close()


if __name__ == "__main__":
    main()

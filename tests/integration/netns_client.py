"""A client process for the network-namespace test (run with `ip netns exec NS python netns_client.py ...`).

    netns_client.py init ADDRESS KEYS SEED          offer seeded integer initial weights
    netns_client.py push ADDRESS KEYS NAME PUSHES SEED   join, then push seeded integer deltas (pull every 3rd)
    netns_client.py pull ADDRESS KEYS OUT.npy        save the centre and the shards' stats

`push` writes one line to stdout per push answered, ``pushed I retries R`` (R: the
client's `retries` so far), the client's warnings as ``log ...`` lines (a retry
says ``no reply to PUSH ... retry``), and last ``result {"retries": R, ...}``.
"""
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pusher import deltas  # noqa: E402

from pserver.client import Client, ClientConfig  # noqa: E402
from pserver.layout import Layout  # noqa: E402
from pserver.security import client_curve  # noqa: E402

LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats
# A reply later than 1.5 s is retried: TCP recovers the link's random drops well within that; an outage does not.
CONFIG = ClientConfig(timeout_s=1.5, retries=8, backoff_s=0.1)


def initial(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 100, LAYOUT.total).astype(np.float32)


def main() -> None:
    mode, address, keys = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "init":
        c = Client(address, CONFIG, worker=1000, curve=client_curve(keys, "worker2"))
        c.init(initial(int(sys.argv[4])), LAYOUT)
    elif mode == "push":
        logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="log %(name)s: %(message)s")
        name, pushes, seed = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
        c = Client(address, CONFIG, curve=client_curve(keys, name))
        c.join(name)
        c.pull()
        for i, d in enumerate(deltas(c.total, pushes, seed)):
            c.push(d, mode="add", pull=(i % 3 == 0))
            print(f"pushed {i + 1} retries {c.retries}", flush=True)
            if i % 5 == 4:
                c.pull()
        c.done({"pushes": pushes})
        print("result " + json.dumps({"retries": c.retries, "pushes": pushes}), flush=True)
    else:
        c = Client(address, CONFIG, worker=1000, curve=client_curve(keys, "worker2"))
        c.use_shards(c.ask({"op": "MODEL"})["shards"])  # an observer: no rank taken
        np.save(sys.argv[4], c.pull(), allow_pickle=False)
        Path(sys.argv[4] + ".json").write_text(json.dumps(c.stats()["shards"]))
    c.close()


if __name__ == "__main__":
    main()

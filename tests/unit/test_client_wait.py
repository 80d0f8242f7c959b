"""pserver.client's wait for a server that is gone, over in-process (inproc://) sockets: a request keeps
being re-sent for `ClientConfig.server_wait_s`, and is answered by a server that comes back in time."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from pserver import protocol
from pserver.client import ClientConfig, _Peer, fan_out
from pserver.errors import ServerUnreachable

QUICK = dict(timeout_s=0.05, retries=0, backoff_s=0.01, max_backoff_s=0.05)


def test_without_a_server_wait_the_retries_alone_bound_it():
    peer = _Peer(zmq.Context.instance(), "inproc://nobody-here")
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="no reply to PING from inproc://nobody-here after 1 attempt"):
        fan_out([peer], [protocol.encode({"op": "PING"})], ClientConfig(**QUICK), "PING")
    assert time.monotonic() - t0 < 1.0
    peer.close()


def test_a_request_is_re_sent_for_the_server_wait_then_given_up():
    peer = _Peer(zmq.Context.instance(), "inproc://gone-for-good")
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="after [0-9]+ attempt"):
        fan_out([peer], [protocol.encode({"op": "PING"})], ClientConfig(**QUICK, server_wait_s=0.5), "PING")
    waited = time.monotonic() - t0
    assert 0.5 <= waited < 2.0 and peer.retries >= 3, (waited, peer.retries)
    peer.close()


def test_a_server_back_within_the_wait_answers_the_retry():
    context = zmq.Context.instance()
    endpoint = "inproc://back-in-a-moment"
    served = []
    done = threading.Event()

    def come_back():
        time.sleep(0.3)  # the server is away for a few of the client's attempts
        server = context.socket(zmq.ROUTER)
        server.bind(endpoint)
        try:
            while not done.is_set():  # answers every copy that reaches it, as a server does
                if server.poll(50):
                    identity, *body = server.recv_multipart()
                    served.append(protocol.decode(body).header["op"])
                    server.send_multipart([identity, *protocol.encode(protocol.ok(answer=42))])
        finally:
            server.close(linger=0)

    t = threading.Thread(target=come_back)
    t.start()
    peer = _Peer(context, endpoint)
    try:
        [reply] = fan_out([peer], [protocol.encode({"op": "PING"})], ClientConfig(**QUICK, server_wait_s=10.0),
                           "PING")
    finally:
        done.set()
        t.join(10)
        peer.close()
    assert reply.header["answer"] == 42 and served and set(served) == {"PING"} and peer.retries >= 1

"""The ROUTER socket a shard and the coordinator each serve on: how it is bound, and the loop that drains it.

Both are single-threaded event loops over one ROUTER: poll, hand each queued request to ``handle`` (at
most `DRAIN` before the timers are looked at again, so a busy socket cannot starve them), then call
``tick``. The coordinator also polls the sockets it asks the shards' STATS on (`pserver.stats_gather`),
and wakes when the oldest of those questions times out.

Memory under hostile peers is bounded at bind: ZeroMQ holds at most `RCVHWM` + 1 messages per connection,
each frame at most ``max_message_bytes`` (a peer sending a larger one is disconnected); both are read when
the socket binds and hold for every connection made through that bind.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import zmq

from pserver import security

#: Messages ZeroMQ queues per connection before it stops reading from it. A client has one request in flight
#: per socket; the coordinator's LOST notices are sent without blocking, and dropped when a queue is full.
RCVHWM = 2
#: Requests handled per wake-up before the timers are looked at again.
DRAIN = 64


def bind_router(context: zmq.Context, host: str, port: int, max_message_bytes: int,
                keys_dir: str | None = None) -> tuple[zmq.Socket, int]:
    """A ROUTER bound to ``host:port`` (port 0: one the OS picks), behind CurveZMQ if ``keys_dir``; returns it
    and its port. zmq.ZMQError if the address cannot be bound (the socket is closed then)."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    try:
        if keys_dir:
            security.secure_server_socket(sock, keys_dir)
        if port:
            sock.bind(f"tcp://{host}:{port}")
            return sock, port
        return sock, sock.bind_to_random_port(f"tcp://{host}")
    except BaseException:
        sock.close(linger=0)
        raise


def drain(socket: zmq.Socket, handle: Callable[[list[Any]], None]) -> None:
    """Hand up to `DRAIN` queued requests (``[identity, header, arrays...]``, zmq.Frame) to ``handle``."""
    for _ in range(DRAIN):
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(frames)


def serve(socket: zmq.Socket, handle: Callable[[list[Any]], None], tick: Callable[[float], None],
          stopping: Callable[[], bool], poll_s: float,
          also: Callable[[], Iterable[zmq.Socket]] | None = None,
          wake_in_s: Callable[[float], float | None] | None = None) -> None:
    """Serve ``socket`` until ``stopping()``: drain it when it has requests, then ``tick(now)``, at least every
    ``poll_s``. ``also()`` names more sockets whose input should wake the loop (``tick`` reads them), and
    ``wake_in_s(now)`` how soon a timer is due (None: none sooner than ``poll_s``)."""
    def poller_of(sockets: Iterable[zmq.Socket]) -> zmq.Poller:
        poller = zmq.Poller()
        for s in (socket, *sockets):
            poller.register(s, zmq.POLLIN)
        return poller

    poller = poller_of(())
    while not stopping():
        if also is not None:  # the sockets come and go (one per shard asked): a poller of this moment's
            poller = poller_of(also())
        wait_s = poll_s
        if wake_in_s is not None and (due := wake_in_s(time.monotonic())) is not None:
            wait_s = min(wait_s, due)
        if dict(poller.poll(max(int(wait_s * 1000), 0))).get(socket):
            drain(socket, handle)
        tick(time.monotonic())

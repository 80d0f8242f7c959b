"""What every rule is: its table entry (`Rule`) and its worker side (`WorkerRule`), registered with `register_rule`.

A rule sees the worker's local weights as one flat float32 vector W (total,)
and a `pserver.client.Client`. Every `window` local steps the worker loop calls
`step(W)`; the rule talks to the shards and returns the vector the worker
continues from. Local steps use the worker's own Keras optimizer.

What the shards do with a rule's requests is the shard-side apply its entry
names (``Rule.mode``, a mode registered in `pserver.applies`): a PUSH mode
for an asynchronous rule, a ROUND mode for a synchronous one.

Overlap (``overlap=True``, asynchronous rules only): `step` sends the
exchange from a background thread and returns at once; the worker keeps
training from its own W. At the next `step` it waits for that reply R (what
the exchange would have returned) and continues from R + (W − W_sent): the
reply, plus the local progress made while it was on the wire. DOWNPOUR's
next Δ is then that progress; the elastic rules' E is applied one window
late. With one worker and DOWNPOUR, R = W_sent and the run is the one
without overlap (tested). `finish` waits for the last reply and sends what
is left.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from pserver import applies
from pserver.errors import RemoteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One rule's entry in the table (`optimizers.RULES`): its name, the shard-side apply, and its defaults."""

    name: str
    sync: bool  # rounds: every live worker's contribution before the centre moves
    window: int  # λ: local steps between exchanges, an upper bound (0: none but the data cap)
    mode: str  # the shard-side apply (pserver.applies): a ROUND mode if sync, else a PUSH mode
    elastic: bool = False  # α(W − C) both ways; α defaults to β/n
    local_optimizer: str = "adam"  # the worker's own optimizer for local steps
    lr_scale: str = "none"  # the local rate is the base × this: "none", "window" (λ) or "workers" (n)
    doc: str = ""


def as_flat(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 1:
        raise ValueError(f"expected a flat float32 vector, got {x.dtype} {x.shape}")
    return x


class WorkerRule:
    """What a worker does every λ local steps; a rule's class sets ``spec`` and implements `communicate`, one exchange.

    ``client`` is a joined `pserver.client.Client`. Vectors are flat float32
    (total,). Staleness seen by this worker's pushes is kept in
    ``self.staleness`` (one entry per exchange: the largest over shards).
    ``round_timeout_s`` is how long a synchronous rule waits for a round's
    reply; None: the client's default (the server's round timeout and a little more).
    """

    spec: ClassVar[Rule]

    def __init__(self, client: Any, window: int, alpha: float = 0.0, round_timeout_s: float | None = None,
                 overlap: bool = False) -> None:
        if overlap and self.spec.sync:
            raise ValueError(f"overlap is for the asynchronous rules; {self.spec.name} exchanges in rounds")
        self.client = client
        self.window = window
        self.alpha = alpha
        self.round_timeout_s = round_timeout_s
        self.staleness: list[int] = []
        self.exchanges = 0
        self.overlap = overlap
        # overlap: the one exchange in flight, (W_sent, its reply to come); the client is used by one thread at a time
        self._pending: tuple[np.ndarray, Future] | None = None
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="exchange") if overlap else None

    def start(self, w: np.ndarray) -> np.ndarray:
        """Pull the centre; the worker starts from it."""
        centre = self.client.pull()
        self.pulled = centre.copy()  # W at the last pull, (total,)
        self._delta = np.empty_like(centre)
        return centre

    def recover(self) -> np.ndarray:
        """After a local NaN: continue from the centre, keeping the rule's own state (a round's number)."""
        self._settle()  # the exchange in flight carried weights from before the NaN: let it land, drop its reply
        centre = self.client.pull()
        self.pulled = centre.copy()
        return centre

    def communicate(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, w: np.ndarray) -> np.ndarray:
        """Exchange W (the worker's weights, a fresh vector it will not change); returns what to continue from."""
        w = as_flat(w)
        self.exchanges += 1
        if self._sender is None:
            return self.communicate(w)
        w = self._landed(w)
        self._pending = (w, self._sender.submit(self.communicate, w))
        return w

    def finish(self, w: np.ndarray, unsent: bool) -> None:
        """The worker's last call: wait for the exchange in flight; send W if it holds ``unsent`` local steps."""
        if self._sender is None:
            if unsent:
                self.step(w)
            return
        w = self._landed(as_flat(w))
        if unsent:
            self.exchanges += 1
            self.communicate(w)
        self.close()

    def close(self) -> None:
        """Stop the overlap thread, also when the worker ends by an error (an exchange in flight is not waited for)."""
        if self._sender is not None:
            self._sender.shutdown(wait=False, cancel_futures=True)

    def _landed(self, w: np.ndarray) -> np.ndarray:
        """W moved by the reply in flight, if any: R + (W − W_sent)."""
        if self._pending is None:
            return w
        sent, reply = self._pending
        self._pending = None
        r = reply.result()
        out = np.subtract(w, sent)
        out += r
        return out

    def wait(self) -> None:
        """Block until the exchange in flight (overlap) has its reply; it is still applied at the next `step`."""
        if self._pending is not None:
            self._pending[1].result()

    def _settle(self) -> None:
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None

    def record(self, staleness: list[int]) -> None:
        self.staleness.append(max(staleness) if staleness else 0)


class RoundRule(WorkerRule):
    """A synchronous rule: one ROUND of ``spec.mode`` per exchange.

    A round closes at each shard when every live worker's contribution is in,
    or after the server's round timeout without the missing workers (they are
    marked lost and the world shrinks). A worker that was left behind gets a
    `round` error, pulls the centre and continues from the current round.
    """

    def start(self, w: np.ndarray) -> np.ndarray:
        self.round = 0
        return super().start(w)

    def _round(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Send ``value`` in this round; (the new centre, the array the reply carries before it, if any)."""
        try:
            self.round, centre, extra = self.client.round(value, self.round, self.spec.mode, self.alpha,
                                                          timeout_s=self.round_timeout_s)
        except RemoteError as exc:
            if exc.code != "round":
                raise
            log.warning("worker %d fell behind (%s); continuing from the centre", self.client.worker, exc.reason)
            centre = self.client.pull()
            self._resync()
            return centre, None
        self.record([0])
        return centre, extra

    def _resync(self) -> None:
        """After a missed round, ask each shard for its round number again (via a harmless retry)."""
        stats = self.client.stats()
        rounds = [s.get("round", 0) for s in stats["shards"] if "round" in s]
        self.round = max(rounds) if rounds else self.round


#: Every registered rule's class by name; `optimizers.rules` fills it as its modules are imported.
RULE_CLASSES: dict[str, type[WorkerRule]] = {}

E = TypeVar("E", bound=type)


def register_rule(cls: E) -> E:
    """Class decorator: make ``cls`` (a `WorkerRule` with a ``spec`` of its own) the rule ``cls.spec.name``.

    The shard-side apply ``spec.mode`` must be registered already (a rule
    defining its own registers it above its class), so a rule the shards
    could not serve fails at import, naming the mode.
    """
    spec = cls.__dict__.get("spec")
    if not (isinstance(cls, type) and issubclass(cls, WorkerRule)) or not isinstance(spec, Rule):
        raise TypeError(f"@register_rule takes a WorkerRule subclass with its own `spec = Rule(...)`; "
                        f"{getattr(cls, '__qualname__', cls)!r} is not one")
    op, known = ("ROUND", applies.ROUND_APPLIES) if spec.sync else ("PUSH", applies.PUSH_APPLIES)
    if spec.mode not in known:
        raise TypeError(f"rule {spec.name!r} uses {op} mode {spec.mode!r}, which no module has registered; "
                        f"known: {', '.join(sorted(known))}. Register it with @pserver.applies.register"
                        f"({spec.mode!r}) in the rule's module, above the rule")
    old = RULE_CLASSES.get(spec.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"rule {spec.name!r} is {old.__module__}.{old.__qualname__}'s already; "
                         f"give {cls.__module__}.{cls.__qualname__} another name")
    RULE_CLASSES[spec.name] = cls
    return cls

"""CurveZMQ for the coordinator and every shard: keys, the allow-list, and socket set-up.

A keys directory, as `pserver keys DIR --workers N` writes it::

    DIR/server.key            the server's public key   (give to every worker)
    DIR/server.key_secret     the server's key pair     (stays on the server hosts)
    DIR/workers/workerK.key_secret   worker K's key pair (give to worker K only)
    DIR/workers/workerK.key          worker K's public key
    DIR/workers/evaluator.key_secret the evaluator's key pair (`worker evaluate --keys DIR` uses it)
    DIR/operator.key_secret   an operator's key pair        (`pserver stats --keys DIR` reads with it)
    DIR/allowed/*.key         the allow-list: public keys admitted by every server socket

Each allowed key has a role, from its file's name (`ROLES`): the server's
own, the evaluator's, an operator's, or a worker's; the coordinator and the
shards refuse (``role``) an op the sender's role may not do.

The server's own public key is in the allow-list too: shards REGISTER with the
coordinator and the coordinator asks shards for STATS as clients, with the
server's key pair. Removing a worker's file from ``allowed/`` (and restarting
the server) revokes it. A peer with no key or an unlisted key never completes
the handshake: it gets no reply at all, so its client times out with
ServerUnreachable.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pserver.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

SERVER_NAME = "server"
OPERATOR_NAME = "operator"  # the key pair `pserver stats --keys` reads with
EVALUATOR_NAME = "evaluator"  # the evaluator's key pair, in workers/ (as `runner.launcher.run_keys` makes it too)

#: One authenticator (ZAP handler thread) per context; a context's sockets share it.
_authenticators: dict[int, ThreadAuthenticator] = {}


def create_keys(keys_dir: str | Path, workers: int = 1) -> Path:
    """Write a server key pair and ``workers`` worker key pairs (see the module docstring)."""
    if workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}")
    root = Path(keys_dir)
    if (root / f"{SERVER_NAME}.key_secret").exists():
        raise ConfigError(f"{root} already holds a server key; pick an empty directory or delete it first "
                          f"(replacing keys locks out every worker that has the old ones)")
    (root / "workers").mkdir(parents=True, exist_ok=True)
    (root / "allowed").mkdir(exist_ok=True)
    public, _ = zmq.auth.create_certificates(str(root), SERVER_NAME)
    shutil.copy(public, root / "allowed" / f"{SERVER_NAME}.key")
    public, _ = zmq.auth.create_certificates(str(root), OPERATOR_NAME)  # reads stats only: `pserver stats --keys`
    shutil.copy(public, root / "allowed" / f"{OPERATOR_NAME}.key")
    public, _ = zmq.auth.create_certificates(str(root / "workers"), EVALUATOR_NAME)  # `worker evaluate`'s
    shutil.copy(public, root / "allowed" / f"{EVALUATOR_NAME}.key")
    for k in range(workers):
        public, _ = zmq.auth.create_certificates(str(root / "workers"), f"worker{k}")
        shutil.copy(public, root / "allowed" / f"worker{k}.key")
    for secret in root.rglob("*.key_secret"):
        secret.chmod(0o600)
    log.info("wrote a server key pair and %d worker key pair(s) to %s", workers, root)
    return root


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found; create keys with `pserver keys DIR --workers N`")
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what} {path} is not a ZeroMQ certificate: {exc}") from None


def server_keys(keys_dir: str | Path) -> dict[str, bytes]:
    """The server's key pair, as {public, secret}."""
    root = Path(keys_dir)
    public, secret = _load(root / f"{SERVER_NAME}.key_secret", "server secret key")
    if not secret:
        raise ConfigError(f"{root / (SERVER_NAME + '.key_secret')} holds no secret key")
    if not (root / "allowed").is_dir():
        raise ConfigError(f"{root / 'allowed'} (the allow-list of worker public keys) is missing")
    return {"public": public, "secret": secret}


def internal_curve(keys_dir: str | Path) -> dict[str, bytes]:
    """Client-side curve dict for server-to-server calls (REGISTER, STATS): the server's own pair."""
    keys = server_keys(keys_dir)
    return {"secret": keys["secret"], "public": keys["public"], "server": keys["public"]}


def client_curve(keys_dir: str | Path, worker_name: str | None = None) -> dict[str, bytes]:
    """The ``curve`` dict a `Client` takes: this worker's key pair and the server's public key.

    ``worker_name`` picks ``workers/<name>.key_secret`` (or ``<name>.key_secret``
    directly in DIR, for a directory copied to one worker host); without it the
    only — or else the first, by name — worker key pair found is used.
    """
    root = Path(keys_dir)
    server_public, _ = _load(root / f"{SERVER_NAME}.key", "server public key")
    if worker_name is not None:
        candidates = [root / "workers" / f"{worker_name}.key_secret", root / f"{worker_name}.key_secret"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(f"no key pair for worker {worker_name!r}: looked for "
                              f"{' and '.join(str(c) for c in candidates)}")
        path = found[0]
    else:
        # a worker's pair: the evaluator's, the operator's and the server's have roles of their own
        pairs = [p for p in sorted((root / "workers").glob("*.key_secret")) + sorted(root.glob("*.key_secret"))
                 if role_of_name(p.stem.split(".")[0]) == "worker"]
        if not pairs:
            raise ConfigError(f"no worker key pair (*.key_secret) in {root / 'workers'} or {root}; "
                              f"create keys with `pserver keys DIR --workers N`")
        path = pairs[0]
    public, secret = _load(path, "worker key pair")
    if not secret:
        raise ConfigError(f"{path} holds no secret key")
    return {"secret": secret, "public": public, "server": server_public}


def evaluator_key_name(keys_dir: str | Path) -> str | None:
    """The evaluator's key pair name in ``keys_dir`` if it holds one (`create_keys` and `run_keys` make it)."""
    root = Path(keys_dir)
    found = any((d / f"{EVALUATOR_NAME}.key_secret").is_file() for d in (root / "workers", root))
    return EVALUATOR_NAME if found else None


def authenticator(context: zmq.Context, keys_dir: str | Path) -> ThreadAuthenticator:
    """Start (once per context) a ZAP handler that admits only the keys in ``DIR/allowed``."""
    auth = _authenticators.get(id(context))
    if auth is None:
        allowed = Path(keys_dir) / "allowed"
        if not allowed.is_dir():
            raise ConfigError(f"{allowed} (the allow-list of worker public keys) is missing")
        auth = ThreadAuthenticator(context, log=logging.getLogger("pserver.security.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(allowed))
        _authenticators[id(context)] = auth
        log.info("CurveZMQ on: admitting %d public key(s) from %s", len(list(allowed.glob("*.key"))), allowed)
    return auth


def secure_server_socket(socket: zmq.Socket, keys_dir: str | Path) -> None:
    """Make ``socket`` a CURVE server behind the allow-list. Call before bind."""
    keys = server_keys(keys_dir)
    authenticator(socket.context, keys_dir)
    socket.curve_secretkey = keys["secret"]
    socket.curve_publickey = keys["public"]
    socket.curve_server = True


def stop_authenticators() -> None:
    for auth in _authenticators.values():
        auth.stop()
    _authenticators.clear()


# ---- the per-server secret: tickets and proofs ------------------------------------------------------------------
#
# `pserver start` makes a random secret and hands it to the shard processes it starts in their environment
# (readable by this user only, unlike a command line); it never travels on the wire. With it the coordinator signs
# what it decided and the shards check it without asking: a JOIN's rank and incarnation (the worker's ticket, which
# it sends with every shard request), an INIT's slice and world, a shard's REGISTER and the coordinator's LOST.
# A keyed server binds each ticket to the public key the rank joined with.

#: The environment variable a shard process reads the server's secret from (hex).
SECRET_ENV = "NOTPU_SERVER_SECRET"
#: Where a server that checkpoints keeps its secret (owner-only), so that a restored server's tickets stay valid.
SECRET_FILE = "server.secret"


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def secret_from_env() -> bytes | None:
    """The secret `pserver start` handed this process, or None (a shard started by hand checks no tickets)."""
    text = os.environ.get(SECRET_ENV, "")
    if not text:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{SECRET_ENV} is not hex; it is set by `pserver start` for its shard processes") from None
    if len(secret) < 16:
        raise ConfigError(f"{SECRET_ENV} holds {len(secret)} bytes, fewer than 16")
    return secret


def stored_secret(directory: str | Path) -> bytes:
    """The secret kept in ``directory`` (a checkpoint directory), created there (mode 0600) if it has none."""
    path = Path(directory) / SECRET_FILE
    if path.is_file():
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except ValueError:
            raise ConfigError(f"{path} is not hex; delete it (running workers then have to join again)") from None
        if len(secret) >= 16:
            return secret
        raise ConfigError(f"{path} holds {len(secret)} bytes, fewer than 16; delete it")
    secret = new_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


def mac(secret: bytes, *parts: Any) -> str:
    """HMAC-SHA256 over the parts (joined unambiguously), as hex."""
    text = "\x1f".join(str(p) for p in parts)
    return hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def verify(secret: bytes, given: Any, *parts: Any) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given, mac(secret, *parts))


def worker_ticket(secret: bytes, rank: int, incarnation: int, key: str = "") -> str:
    """A JOIN's ticket: rank ``rank``'s incarnation ``incarnation``, joined with public key ``key`` ("" unkeyed)."""
    return mac(secret, "worker", rank, incarnation, key)


def init_ticket(secret: bytes, index: int, start: int, end: int, total: int, world: int, fingerprint: str) -> str:
    """The coordinator's word that shard ``index`` owns [start, end) of ``total`` floats of this model and world."""
    return mac(secret, "init", index, start, end, total, world, fingerprint)


def register_proof(secret: bytes, index: int, endpoint: str) -> str:
    return mac(secret, "register", index, endpoint)


def lost_proof(secret: bytes, lost: Any, done: Any) -> str:
    return mac(secret, "lost", list(lost), list(done))


# ---- roles -------------------------------------------------------------------------------------------------------

#: What a key may do, by the name of its file in ``DIR/allowed``: ``server.key`` is the server's own pair (shards
#: REGISTER and the coordinator sends LOST and STOP with it), ``evaluator*.key`` the evaluator's (reads the model and
#: stats, may STOP the run), ``operator*.key`` an operator's (reads stats: `pserver stats --keys`); any other name
#: is a worker's (joins, and acts for the rank it joined as only).
ROLES = ("server", "evaluator", "operator", "worker")


def role_of_name(stem: str) -> str:
    for role in ("server", "evaluator", "operator"):
        if stem.startswith(role):
            return role
    return "worker"


def key_roles(keys_dir: str | Path) -> dict[str, str]:
    """{z85 public key (the ZAP User-Id of its peers): role} for every key in ``DIR/allowed``."""
    out = {}
    for path in sorted((Path(keys_dir) / "allowed").glob("*.key")):
        public, _ = _load(path, "allowed public key")
        out[public.decode("ascii")] = role_of_name(path.stem)
    return out


def role_of(roles: dict[str, str] | None, sender: str) -> str | None:
    """The role of the key `sender` (`peer_key`) in `roles` (`key_roles`): None without --keys, "" if unlisted."""
    return None if roles is None else roles.get(sender, "")


def check_role(roles: dict[str, str] | None, sender: str, op: str, op_roles: dict[str, tuple[str, ...]],
               where: str = "") -> None:
    """ProtocolError ``role`` unless, with --keys, the sender's role is one `op_roles` lets send `op` (``where``
    names the server in the message: " to a shard")."""
    role = role_of(roles, sender)
    if role is not None and role not in op_roles.get(op, ()):
        raise ProtocolError("role", f"a {role or 'unlisted'} key may not send {op}{where}; "
                                    f"{op} takes a {' or '.join(op_roles.get(op, ()))} key")


def peer_key(frame: Any) -> str:
    """The public key (z85) ZAP admitted the sender of ``frame`` with; "" on a socket without CurveZMQ."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return ""
    return user if isinstance(user, str) else ""


def operator_curve(keys_dir: str | Path) -> dict[str, bytes]:
    """The ``curve`` dict of the operator's key pair (``DIR/operator.key_secret``), for `pserver stats --keys`."""
    root = Path(keys_dir)
    server_public, _ = _load(root / f"{SERVER_NAME}.key", "server public key")
    public, secret = _load(root / f"{OPERATOR_NAME}.key_secret", "operator key pair")
    if not secret:
        raise ConfigError(f"{root / (OPERATOR_NAME + '.key_secret')} holds no secret key")
    return {"secret": secret, "public": public, "server": server_public}

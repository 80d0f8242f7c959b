"""CurveZMQ for the coordinator and every shard: keys, the allow-list, and socket set-up.

A keys directory, as `pserver keys DIR --workers N` writes it::

    DIR/server.key            the server's public key   (give to every worker)
    DIR/server.key_secret     the server's key pair     (stays on the server hosts)
    DIR/workers/workerK.key_secret   worker K's key pair (give to worker K only)
    DIR/workers/workerK.key          worker K's public key
    DIR/allowed/*.key         the allow-list: public keys admitted by every server socket

The server's own public key is in the allow-list too: shards REGISTER with the
coordinator and the coordinator asks shards for STATS as clients, with the
server's key pair. Removing a worker's file from ``allowed/`` (and restarting
the server) revokes it. A peer with no key or an unlisted key never completes
the handshake: it gets no reply at all, so its client times out with
ServerUnreachable.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pserver.errors import ConfigError

log = logging.getLogger(__name__)

SERVER_NAME = "server"

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
        pairs = sorted((root / "workers").glob("*.key_secret")) + sorted(
            p for p in root.glob("*.key_secret") if p.stem != SERVER_NAME)
        if not pairs:
            raise ConfigError(f"no worker key pair (*.key_secret) in {root / 'workers'} or {root}; "
                              f"create keys with `pserver keys DIR --workers N`")
        path = pairs[0]
    public, secret = _load(path, "worker key pair")
    if not secret:
        raise ConfigError(f"{path} holds no secret key")
    return {"secret": secret, "public": public, "server": server_public}


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

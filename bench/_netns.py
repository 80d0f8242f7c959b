"""Two network namespaces joined by a veth pair: two "hosts" on one machine, for the benchmarks that need a wire.

``ps`` (10.201.77.1) runs servers, ``w`` (10.201.77.2) runs workers. `shape`
limits both ends of the link with a token bucket (tc tbf) to one of `RATES`.
Needs root, ``ip`` and ``tc`` (`unusable` says what is missing); the
namespaces are removed when `pair` exits, also on an error, and any left by a
killed run are removed when the next one starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator

#: tc tbf settings per rate: queues long enough that a 9.8 MB message is not dropped, and at 100 Mbit/s a
#: burst small enough that a small model's exchange (235 KB at GRU 64) is held to the rate, not let through
#: at once; a burst must hold the largest packet, so `pair` caps segmentation offload at GSO_MAX.
RATES = {"1gbit": "burst 1mb latency 100ms", "100mbit": "burst 32kb latency 400ms"}
GSO_MAX = 16384
NS = ("notpu-wps", "notpu-ww")
NET = "10.201.77"
PS_HOST, W_HOST = f"{NET}.1", f"{NET}.2"
_DEVS = {NS[0]: "nwps0", NS[1]: "nww0"}


def unusable() -> str:
    """Why the namespaces cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs ip and tc"
    return ""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _delete() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@contextlib.contextmanager
def pair() -> Iterator[tuple[str, str]]:
    """Make the two namespaces and their link (unshaped); yields (ps namespace, worker namespace)."""
    ps_ns, w_ns = NS
    _delete()
    try:
        sh("ip", "netns", "add", ps_ns)
        sh("ip", "netns", "add", w_ns)
        sh("ip", "link", "add", _DEVS[ps_ns], "netns", ps_ns, "type", "veth", "peer", "name", _DEVS[w_ns],
           "netns", w_ns)
        for ns, ip in ((ps_ns, PS_HOST), (w_ns, W_HOST)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", _DEVS[ns])
            sh("ip", "-n", ns, "link", "set", "dev", _DEVS[ns], "gso_max_size", str(GSO_MAX))
            sh("ip", "-n", ns, "link", "set", _DEVS[ns], "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ps_ns, w_ns
    finally:
        _delete()


def shape(rate: str) -> None:
    """Limit both ends of the link to ``rate`` (a key of `RATES`)."""
    for ns, dev in _DEVS.items():
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
           *RATES[rate].split())


def run_in(ns: str) -> list[str]:
    """The prefix that runs a command in namespace ``ns``."""
    return ["ip", "netns", "exec", ns]

"""Listen ports for test processes that may have to come back on the same port.

A port the kernel picks (a bind to port 0) lies in the ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``). Once the process holding it
dies, any outgoing connection on the machine — another test worker's — may
be given that port as its local port, and a daemon or etcd member restarted
on it then fails with "address already in use". The ports handed out here
lie below that range, where the kernel never picks one, in a slice of their
own per xdist worker (so no two workers hand out the same port); each is
checked free by binding it, as the process will (SO_REUSEADDR), before it is
handed out. Where the ephemeral range leaves no room below it, the kernel
picks, as before.
"""
from __future__ import annotations

import itertools
import os
import socket

FIRST_PORT = 12000
SLICE_PORTS = 2000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_next = itertools.count()


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice_start() -> int | None:
    """This worker's first port, or None when no slice fits below the range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    slices = (_ephemeral_low() - FIRST_PORT) // SLICE_PORTS
    if slices < 1:
        return None
    return FIRST_PORT + (index % slices) * SLICE_PORTS


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_picks(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listen_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host`` that no other test worker and no outgoing
    connection will take meanwhile."""
    start = _slice_start()
    if start is None:
        return _kernel_picks(host)
    for _ in range(SLICE_PORTS):
        port = start + next(_next) % SLICE_PORTS
        if _bindable(port, host):
            return port
    raise RuntimeError(f"no free port in {start}..{start + SLICE_PORTS - 1} on {host}")


def listen_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    return [listen_port(host) for _ in range(n)]

"""A real etcd on loopback for tests: 1 or 3 members, free ports, a temporary
data directory, killed at teardown.

``etcd_cluster(tmp, members=1)`` is a context manager yielding an
``EtcdCluster`` whose ``url`` (``etcd://127.0.0.1:P[,…]``) is what
``livemig daemon --fleet`` takes. Where no etcd binary exists the caller
skips with ``ETCD_MISSING`` (``.ci/run`` installs Debian's etcd-server).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from support.ports import listen_ports
from support.waiting import wait_for

ETCD = shutil.which("etcd")
ETCD_MISSING = ("no etcd binary on PATH (apt-get install etcd-server; .ci/run does it where "
                "apt is available)")


class EtcdMember:
    """One etcd process. ``client_ip``/``peer_ip`` are where it listens
    (loopback unless given); ``argv_prefix`` runs it in a network namespace
    (``ip netns exec NS``)."""

    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path,
                 initial_cluster: str, log: Path, *, client_ip: str = "127.0.0.1",
                 peer_ip: str = "127.0.0.1", argv_prefix: tuple[str, ...] = ()):
        self.name, self.client_port, self.peer_port = name, client_port, peer_port
        self.endpoint = f"{client_ip}:{client_port}"
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(
            [*argv_prefix, ETCD, "--name", name, "--data-dir", str(data_dir),
             "--listen-client-urls", f"http://{self.endpoint}",
             "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://{peer_ip}:{peer_port}",
             "--initial-advertise-peer-urls", f"http://{peer_ip}:{peer_port}",
             "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", "livemig-test", "--heartbeat-interval", "50",
             "--election-timeout", "500", "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            self.log.seek(0)
            raise RuntimeError(f"etcd {self.name} exited:\n{self.log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=2) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def started(cluster) -> None:
    """Once every member of ``cluster`` reports healthy (else close it and
    raise), set its ``endpoints`` and ``url``."""
    try:
        wait_for("etcd to report healthy", lambda: all(m.healthy() for m in cluster.members))
    except BaseException:
        cluster.close()
        raise
    cluster.endpoints = [m.endpoint for m in cluster.members]
    cluster.url = "etcd://" + ",".join(cluster.endpoints)


class EtcdCluster:
    def __init__(self, tmp: Path, members: int):
        ports = listen_ports(2 * members)    # a member restarted comes back on its own
        names = [f"m{i}" for i in range(members)]
        initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}"
                           for i, n in enumerate(names))
        self.members = [EtcdMember(n, ports[2 * i], ports[2 * i + 1], tmp / f"etcd-{n}",
                                   initial, tmp / f"etcd-{n}.log")
                        for i, n in enumerate(names)]
        started(self)

    def close(self) -> None:
        for m in self.members:
            m.kill()


def etcd_cluster(tmp: Path, members: int = 1) -> "contextlib.closing[EtcdCluster]":
    return contextlib.closing(EtcdCluster(tmp, members))

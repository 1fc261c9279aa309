"""A three-member etcd whose members can be cut off from each other while
clients still reach them: each member in a network namespace of its own.

Layout (``k`` picks this run's subnets from the test process's pid)::

    root ns ──veth── member i's ns      clients: 10.201.k.(4i+1) ↔ 10.201.k.(4i+2)/30
    member i's ns ──veth── switch ns    peers:   10.202.k.(i+1)/24 on a bridge there

Members listen for clients on their own /30 towards the root namespace (where
the test and its daemons run) and for their peers on the switch's bridge, so
``isolate(i)`` — the switch's end of member i's peer link set down — cuts
that member off from BOTH peers (the minority side of a partition) while the
daemons still talk to it. ``heal(i)`` sets it up again. ``close()`` kills
the members and deletes the namespaces (and with them every veth).

``available()`` says why not where ``ip netns``/bridges are not usable.
Nothing outside the namespaces made here is touched, save the root ends of
the client veths.
"""
from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from pathlib import Path

from livemig.lab import netns
from support.etcd import ETCD, EtcdMember, started
from support.waiting import wait_for

CLIENT_PORT, PEER_PORT = 2379, 2380
PREFIX = "lmetcd"


def available() -> tuple[bool, str]:
    if ETCD is None:
        return False, "no etcd binary on PATH"
    return netns.available()


def _post(endpoint: str, path: str, body: dict, timeout_s: float = 5.0) -> dict:
    req = urllib.request.Request(f"http://{endpoint}{path}", data=json.dumps(body).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


class NetnsEtcdCluster:
    def __init__(self, tmp: Path, members: int = 3):
        pid = os.getpid()
        k = pid % 250
        self.switch = f"{PREFIX}-{pid}-sw"
        self.namespaces = [self.switch] + [f"{PREFIX}-{pid}-m{i}" for i in range(members)]
        self.members: list[EtcdMember] = []
        self._root_veths = [f"lme{pid % 100000}c{i}" for i in range(members)]
        client_ip = [f"10.201.{k}.{4 * i + 2}" for i in range(members)]
        peer_ip = [f"10.202.{k}.{i + 1}" for i in range(members)]
        try:
            self._build(k, client_ip, peer_ip)
            initial = ",".join(f"m{i}=http://{peer_ip[i]}:{PEER_PORT}" for i in range(members))
            for i in range(members):
                self.members.append(EtcdMember(
                    f"m{i}", CLIENT_PORT, PEER_PORT, tmp / f"etcd-m{i}", initial,
                    tmp / f"etcd-m{i}.log", client_ip=client_ip[i], peer_ip=peer_ip[i],
                    argv_prefix=("ip", "netns", "exec", self.namespaces[i + 1])))
        except BaseException:
            self.close()
            raise
        started(self)

    def _build(self, k: int, client_ip: list[str], peer_ip: list[str]) -> None:
        ip, run = netns._ip(), netns.run
        for ns in self.namespaces:
            run([ip, "netns", "add", ns])
            run([ip, "-n", ns, "link", "set", "lo", "up"])
        run([ip, "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run([ip, "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces[1:]):
            root_end = self._root_veths[i]
            run([ip, "link", "add", root_end, "type", "veth", "peer", "name", "cli0",
                 "netns", ns])
            run([ip, "addr", "add", f"10.201.{k}.{4 * i + 1}/30", "dev", root_end])
            run([ip, "link", "set", root_end, "up"])
            run([ip, "-n", ns, "addr", "add", f"{client_ip[i]}/30", "dev", "cli0"])
            run([ip, "-n", ns, "link", "set", "cli0", "up"])
            run([ip, "-n", ns, "link", "add", "peer0", "type", "veth", "peer", "name", f"m{i}",
                 "netns", self.switch])
            run([ip, "-n", ns, "addr", "add", f"{peer_ip[i]}/24", "dev", "peer0"])
            run([ip, "-n", ns, "link", "set", "peer0", "up"])
            run([ip, "-n", self.switch, "link", "set", f"m{i}", "master", "br0"])
            run([ip, "-n", self.switch, "link", "set", f"m{i}", "up"])

    def isolate(self, member: int) -> None:
        """Cut ``member`` off from every peer; its clients still reach it."""
        netns.run([netns._ip(), "-n", self.switch, "link", "set", f"m{member}", "down"])

    def heal(self, member: int) -> None:
        netns.run([netns._ip(), "-n", self.switch, "link", "set", f"m{member}", "up"])

    # -- what the members say (straight to one member, no client of ours) ----------
    def status(self, member: int) -> dict:
        return _post(self.endpoints[member], "/v3/maintenance/status", {})

    def leader(self, among) -> int:
        """The member in ``among`` that says it leads (-1: none)."""
        for i in among:
            try:
                s = self.status(i)
            except OSError:
                continue
            if s.get("leader") and s["leader"] == s["header"]["member_id"]:
                return i
        return -1

    def make_leader(self, member: int) -> None:
        """Move leadership to ``member`` (etcd's transfer-leadership)."""
        current = self.leader(range(len(self.members)))
        if current == member:
            return
        target = self.status(member)["header"]["member_id"]
        _post(self.endpoints[current], "/v3/maintenance/transfer-leadership",
              {"targetID": target}, timeout_s=10)
        wait_for(f"member {member} to lead", lambda: self.leader([member]) == member)

    def range_key(self, member: int, key: str, *, serializable: bool,
                  timeout_s: float = 10.0) -> dict:
        """A Range on ``member`` alone: ``serializable`` answers from its own
        copy; otherwise the read is linearizable (etcd's default)."""
        import base64
        body = {"key": base64.b64encode(key.encode()).decode()}
        if serializable:
            body["serializable"] = True
        return _post(self.endpoints[member], "/v3/kv/range", body, timeout_s=timeout_s)

    def close(self) -> None:
        for m in self.members:
            m.kill()
        for ns in self.namespaces:
            netns.run([netns._ip(), "netns", "del", ns], check=False)
        for dev in self._root_veths:     # gone with their peers; in case one was left
            netns.run([netns._ip(), "link", "del", dev], check=False)


def netns_etcd_cluster(tmp: Path, members: int = 3) -> "contextlib.closing[NetnsEtcdCluster]":
    return contextlib.closing(NetnsEtcdCluster(tmp, members))

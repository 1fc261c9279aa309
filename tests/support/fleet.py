"""A fleet on loopback for integration tests: what etcd says, and daemons
joined to it, each reachable through proxies that can fail.

``fleet_rows``/``vm_row``/``host`` read ``livemig fleet hosts|vms --json``,
as an operator would; ``etcd_call``/``put`` run one call with a client of the
test's own; ``leader`` finds the member leading a cluster; ``fleet_daemon``
starts a ``DaemonProcess`` with ``--fleet`` and a short TTL. ``FleetHost`` is a daemon process joined to a
fleet, optionally behind a ``FrameProxy`` on its migration port (it
advertises the proxy's address, so its peers and etcd name it by the address
that fails) and behind an ``EtcdLink`` towards etcd (a proxy that can
partition it from etcd and heal). ``commit_held_on_links`` sets up the
partition tests' start: two such hosts, a warm VM, Commit held.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request

from livemig.fleet.etcd import EtcdClient
from support.daemons import DaemonProcess, livemig, start_vm, wait_hosted
from support.ports import listen_port
from support.faultproxy import FaultProxy
from support.frameproxy import HOLD, Fault
from support.proxythread import LOCAL, ProxyThread
from support.waiting import wait_for

TTL_S = 2


def fleet_rows(etcd, what: str) -> list:
    return json.loads(livemig("fleet", what, "--fleet", etcd.url, "--json").stdout)[what]


def vm_row(etcd, name: str) -> dict | None:
    return next((v for v in fleet_rows(etcd, "vms") if v["name"] == name), None)


def etcd_call(etcd, call):
    """``await call(client)`` with a client of the test's own."""
    async def main():
        client = EtcdClient(etcd.url)
        try:
            return await call(client)
        finally:
            await client.close()
    return asyncio.run(main())


def put(etcd, key: str, value: bytes) -> None:
    etcd_call(etcd, lambda client: client.put(key, value))


def joined(daemon: DaemonProcess) -> DaemonProcess:
    """``daemon`` once it has joined its fleet (its control socket answers
    before the join is done)."""
    wait_for(f"daemon {daemon.control} to join its fleet",
             lambda: (daemon.client.call("ping").get("fleet") or {}).get("state") == "member")
    return daemon


def fleet_daemon(tmp_path, label, loop, etcd, *extra):
    return joined(DaemonProcess(tmp_path, label, loop, "--fleet", etcd.url,
                                "--fleet-ttl", str(TTL_S), *extra))


def host(etcd, addr: str) -> dict:
    return next(h for h in fleet_rows(etcd, "hosts") if h["addr"] == addr)


def listed(daemon) -> list[str]:
    return [v["name"] for v in daemon.client.call("vm.list")]


def leader(cluster) -> int:
    """Index of the member that leads the cluster now (-1: none found)."""
    for i, m in enumerate(cluster.members):
        if m.proc.poll() is not None:
            continue
        req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status", data=b"{}",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            status = json.loads(r.read())
        if status.get("leader") == status["header"]["member_id"]:
            return i
    return -1


class EtcdLink:
    """One daemon's way to etcd: a proxy in front of each member, each of
    which can partition the daemon from that member (connections reset, new
    ones refused) and heal. ``partition()``/``heal()`` without a member: all."""

    def __init__(self, etcd):
        self.threads = [ProxyThread(0, proxy=FaultProxy(host, int(port)))
                        for host, port in (e.rsplit(":", 1) for e in etcd.endpoints)]
        self.url = "etcd://" + ",".join(t.address for t in self.threads)

    def _each(self, member: int | None):
        return self.threads if member is None else [self.threads[member]]

    def partition(self, member: int | None = None) -> None:
        for t in self._each(member):
            t.run(t.proxy.partition)

    def heal(self, member: int | None = None) -> None:
        for t in self._each(member):
            t.run(t.proxy.heal)

    def forwarded(self, member: int) -> dict:
        """Bytes the proxy to ``member`` passed, each way."""
        return dict(self.threads[member].proxy.forwarded)

    def close(self) -> None:
        for t in self.threads:
            t.close()


class DaemonStub:
    """The little of a daemon a FleetMember reads, for a member without one."""

    def __init__(self, advertised: str):
        self.advertised, self.vms = advertised, {}

    def arrivals_never_resumed(self) -> set[str]:
        return set()


class FleetHost:
    """A fleet daemon process. With ``fault``, its migration port sits
    behind a FrameProxy injecting it, and the daemon advertises the proxy:
    migrations to ``addr`` pass the fault, and etcd names the host ``addr``.
    With ``etcd_link``, it reaches etcd through that link."""

    def __init__(self, tmp, label: str, etcd, *, ttl_s: int, fault: Fault | None = None,
                 etcd_link: EtcdLink | None = None, loop: str = "asyncio", extra=(),
                 env: dict | None = None):
        self.link = None
        extra = ["--fleet", etcd_link.url if etcd_link else etcd.url, "--fleet-ttl", str(ttl_s),
                 *extra]
        if fault is not None:
            port = listen_port()
            self.link = ProxyThread(port, fault)
            extra += ["--listen", f"{LOCAL}:{port}", "--advertise", self.link.address]
        try:
            self.proc = joined(DaemonProcess(tmp, label, loop, *extra, env=env))
        except BaseException:
            if self.link is not None:
                self.link.close()
            raise
        self.addr = self.proc.info["advertised"]

    def restart(self) -> None:
        """After a kill: the same state dir, ports and address."""
        self.proc = self.proc.restarted()

    def close(self) -> None:
        self.proc.close()
        if self.link is not None:
            self.link.close()


def membership(host: FleetHost) -> dict:
    """What the daemon says of its fleet membership (state, lease_id, ...)."""
    return host.proc.client.call("ping")["fleet"]


def runs(host: FleetHost, name: str) -> bool:
    return any(v["name"] == name and v["running"] for v in host.proc.client.call("vm.list"))


@contextlib.contextmanager
def commit_held_on_links(tmp, cluster, name: str, recipe, *, ttl_s: int, first_member: int = 0,
                         warm_steps: int = 5_000):
    """Two fleet hosts, ``src`` and ``dst``, each reaching every member of
    ``cluster`` through an EtcdLink of its own, both clients on
    ``first_member``; VM ``name`` (``recipe``) warm at the source and
    migrating to the destination, its Commit held at the destination's
    proxy. Yields (src, dst, links, row, mig): etcd's row of the VM before
    the handover and the migration's id. Everything is closed at the end."""
    links = [EtcdLink(cluster), EtcdLink(cluster)]
    src = dst = None
    try:
        src = FleetHost(tmp, "src", cluster, ttl_s=ttl_s, etcd_link=links[0])
        dst = FleetHost(tmp, "dst", cluster, ttl_s=ttl_s, etcd_link=links[1],
                        fault=Fault(HOLD, "Commit", "up"))
        start_vm(src.proc, name, recipe)
        row = wait_for("etcd to name the source",
                       lambda: (r := vm_row(cluster, name)) and r["owner"] == src.addr and r)
        wait_for("the guest to write its pages",
                 lambda: min(wait_hosted(src.proc, name)["steps"]) >= warm_steps)
        assert all(link.forwarded(first_member)["up"] > 0 for link in links), \
            f"not on member {first_member}"
        mig = src.proc.client.call("migrate", name=name, to=dst.addr,
                                   handshake_timeout_s=5)["id"]
        dst.link.wait_fired("Commit to reach the proxy")
        yield src, dst, links, row, mig
    finally:
        for h in (src, dst):
            if h is not None:
                h.close()
        for link in links:
            link.close()

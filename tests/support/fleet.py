"""Helpers for fleet tests: daemons joined to a test etcd, and what etcd says.

``fleet_daemon`` starts a ``DaemonProcess`` with ``--fleet`` and a short TTL;
``fleet_rows``/``vm_row``/``host`` read the fleet through the CLI, as an
operator would; ``with_etcd`` runs one coroutine against etcd with a client
of the test's own.
"""
from __future__ import annotations

import asyncio
import json

from livemig.fleet.etcd import EtcdClient
from support.daemons import DaemonProcess, livemig

TTL_S = 2


def fleet_rows(etcd, what: str) -> list:
    return json.loads(livemig("fleet", what, "--fleet", etcd.url, "--json").stdout)[what]


def vm_row(etcd, name: str) -> dict | None:
    return next((v for v in fleet_rows(etcd, "vms") if v["name"] == name), None)


def with_etcd(etcd, call):
    """``await call(client)`` with a client of the test's own."""
    async def main():
        client = EtcdClient(etcd.url)
        try:
            return await call(client)
        finally:
            await client.close()
    return asyncio.run(main())


def put(etcd, key: str, value: bytes) -> None:
    with_etcd(etcd, lambda client: client.put(key, value))


def fleet_daemon(tmp_path, label, loop, etcd, *extra):
    return DaemonProcess(tmp_path, label, loop, "--fleet", etcd.url, "--fleet-ttl", str(TTL_S),
                         *extra)


def host(etcd, addr: str) -> dict:
    return next(h for h in fleet_rows(etcd, "hosts") if h["addr"] == addr)


def listed(daemon) -> list[str]:
    return [v["name"] for v in daemon.client.call("vm.list")]

"""The fleet as etcd holds it: hosts (live or lost) and VMs with their owners.

A host is *live* while its lease-bound record exists, *lost* when it is known
(``/livemig/known/<addr>``) but its lease has expired; ``drain_mark`` says
whether etcd holds its drain mark (its record's ``draining`` says whether the
host has seen it yet); a live host's ``record_revision`` is the etcd revision
its record was last written at (the controller waits for records newer than
the moves it saw finish). A VM's row joins its
owner key with the owner's record (whether that host reports running it) and says
whether the VM is running, lost, or lost with its host (``_vm_state``).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import keys
from .etcd import EtcdClient


@dataclass
class FleetView:
    hosts: list[dict]
    vms: list[dict]


def _record(kv) -> dict:
    try:
        return keys.parse_record(kv.value, what=kv.key)
    except ValueError as exc:       # a record no livemig wrote: shown, not fatal
        return {"malformed": str(exc)[:200], "vms": {}}


def _vm_state(state: str, host: dict | None, running: bool) -> str:
    """What a VM's row says of it: ``lost`` (etcd says it died with its
    owner's daemon), ``lost-with-host`` (its owner is lost: the VM with it),
    ``returning`` (its owner took it in a handover but never ran it: its
    source takes it back), ``running`` or
    ``not-running`` (the owner is live but does not list it running: it is
    arriving, paused, or its daemon has not reconciled yet)."""
    if state == keys.LOST:
        return "lost"
    if host is None:
        return "lost-with-host"
    if state == keys.COMMITTED:
        return "returning"
    return "running" if running else "not-running"


async def read_marks(client: EtcdClient) -> set[str]:
    """The hosts etcd holds a drain mark for."""
    return {kv.key[len(keys.DRAIN):] for kv in await client.get_prefix(keys.DRAIN)
            if not kv.key.endswith(keys.STATUS_SUFFIX)}


async def read_fleet(client: EtcdClient) -> FleetView:
    live = {kv.key[len(keys.HOSTS):]: {**_record(kv), "record_revision": kv.mod_revision}
            for kv in await client.get_prefix(keys.HOSTS)}
    known = [kv.key[len(keys.KNOWN):] for kv in await client.get_prefix(keys.KNOWN)]
    marks = await read_marks(client)
    hosts = []
    for addr in sorted(set(known) | set(live)):
        rec = live.get(addr)
        if rec is None:
            hosts.append({"addr": addr, "state": "lost", "drain_mark": addr in marks})
        else:
            hosts.append({**rec, "addr": addr, "state": "live", "drain_mark": addr in marks})
    vms = []
    for kv in await client.get_prefix(keys.VMS):
        name = kv.key[len(keys.VMS):]
        try:
            owner, epoch = keys.parse_owner(kv.value, what=kv.key)
            keys.owner_state(kv.value, what=kv.key)
        except ValueError as exc:
            vms.append({"name": name, "owner": None, "epoch": None, "owner_state": "malformed",
                        "running_there": False, "state": "malformed", "why": None,
                        "memory_bytes": None,
                        "error": str(exc)[:200]})
            continue
        state, why = keys.owner_state(kv.value, what=kv.key)
        host = live.get(owner)
        reported = (host or {}).get("vms", {}).get(name)
        reported = reported if isinstance(reported, dict) else None
        running = bool(reported and reported.get("running"))
        vms.append({"name": name, "owner": owner, "epoch": epoch,
                    "owner_state": "live" if host is not None else "lost",
                    "running_there": running, "state": _vm_state(state, host, running),
                    "why": why, "memory_bytes": (reported or {}).get("memory_bytes")})
    return FleetView(hosts, sorted(vms, key=lambda v: v["name"]))

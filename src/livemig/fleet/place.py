"""Start a VM where the fleet has room: ``livemig vm start NAME --fleet …``.

Theory of operation
-------------------
The host is chosen from the fleet view: live, not marked for draining, with
the VM's memory free, most headroom first (``planner.rank_hosts``, the order
a drain places VMs in). The VM is then built here, in the command's own
process, paused at step 0, and delivered to the chosen host's *migration
address* as an ordinary migration; the command prints where it went.

Why the migration address and not the host's control socket: the control
socket is a local Unix socket (mode 0600) on purpose — the daemon takes
commands only from its own host, and reaching it from elsewhere would need a
new authenticated network door. The migration port is the one door a daemon
already opens to other hosts (with mutual TLS off loopback). Arriving that
way, the VM passes the host's own checks (its incoming-memory budget, its
drain mark), and its commit point is the fleet's ownership transaction: etcd
creates the VM's key naming that host, epoch 1, or refuses if the name is
owned already (checked first here too, to fail before building anything).
The guest is deterministic, so a VM delivered at step 0 runs exactly as one
started there.

A host that refuses (or fails) before the handover's commit never ran the
VM, so the next candidate is tried, up to ``MAX_TRIES``. A handover left in
doubt is not retried elsewhere: the VM may run where it went.
"""
from __future__ import annotations

import asyncio
import socket

from ..addresses import parse_hostport
from ..errors import LivemigError, MigrationError
from ..units import parse_size
from ..vm.machine import VM
from . import keys
from .drain import fleet_state
from .etcd import EtcdClient
from .planner import VMState, rank_hosts
from .view import read_fleet

MAX_TRIES = 3


async def place_vm(client: EtcdClient, name: str, *, memory: str | int, vcpus: int,
                   workload: str, dirty_rate, seed: int, ssl=None) -> dict:
    """Start VM ``name`` on the best host of the fleet; returns where it went.
    Raises LivemigError naming what stopped it (nothing runs then)."""
    from ..engine.source.session import migrate

    kv = await client.get(keys.vm_key(name))
    if kv is not None:
        owner, epoch = keys.parse_owner(kv.value, what=kv.key)
        raise LivemigError(f"etcd names {owner} (epoch {epoch}) as the owner of a VM named "
                           f"{name!r}: one name, one VM in the fleet. Choose another name; "
                           "nothing was started")
    memory_bytes = parse_size(memory, what="guest memory size")
    hosts, _ = fleet_state(await read_fleet(client))
    candidates = rank_hosts(hosts, VMState(name, "", memory_bytes, int(vcpus)))
    if not candidates:
        raise LivemigError(f"no live host of the fleet, unmarked for draining, has "
                           f"{memory_bytes >> 20} MiB free for VM {name!r}; nothing was started")
    loop = asyncio.get_running_loop()
    vm = await loop.run_in_executor(None, lambda: VM(memory=memory_bytes, vcpus=int(vcpus),
                                                     workload=workload, dirty_rate=dirty_rate,
                                                     seed=int(seed)))
    refused = []
    try:
        for host in candidates[:MAX_TRIES]:
            h, port = parse_hostport(host.addr)
            try:
                stats = await migrate(vm, h, port, ssl=ssl, name=name,
                                      origin=f"livemig vm start --fleet on {socket.gethostname()}")
            except MigrationError as exc:
                if not exc.source_resumed:
                    raise LivemigError(f"the delivery of VM {name!r} to {host.addr} broke at its "
                                       f"commit point: {exc}. It may run there: see `livemig "
                                       "fleet vms` before starting it again") from exc
                refused.append(f"{host.addr}: {exc.what}")
                if vm.running:      # a failed migration resumes its source; keep it at rest
                    await loop.run_in_executor(None, vm.pause)
                continue
            return {"name": name, "host": host.addr, "memory_bytes": memory_bytes,
                    "vcpus": int(vcpus), "workload": workload, "refused_by": refused,
                    "delivery_ms": stats.total_time_ms}
    finally:
        await loop.run_in_executor(None, vm.close)
    raise LivemigError(f"no host took VM {name!r} ({'; '.join(refused)}); nothing was started")

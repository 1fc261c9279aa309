"""``livemig fleet balance``: even out load by moving VMs, run by their hosts.

Theory of operation
-------------------
The plan is ``planner.plan_balance`` over the fleet view: VMs move from
hosts loaded above the mean to the most headroom, cheapest first, never a VM
moved by a balance within the last ``window_s`` (``/livemig/moved/<name>``,
keys under one lease of that length: etcd forgets them by itself). Each
source host is sent its share of the plan as a one-shot request,
``/livemig/moves/<host>``; its daemon runs it with the drain's runner
(drain.MoveRunner: ``per_host_limit`` at a time, each VM's mode chosen from
its dirty rate just before it moves, each commit an etcd ownership
transaction) and reports to ``/livemig/moves/<host>/status``, which the
command follows. A balance never moves VMs off a host marked for draining,
nor onto one.
"""
from __future__ import annotations

import json
import time

from . import keys
from .drain import fleet_state, request
from .etcd import EtcdClient
from .planner import Plan, plan_balance
from .view import read_fleet

DEFAULT_WINDOW_S = 600         # 10 minutes


async def recently_moved(client: EtcdClient) -> set[str]:
    return {kv.key[len(keys.MOVED):] for kv in await client.get_prefix(keys.MOVED)}


async def request_balance(client: EtcdClient, *, link_bps: float, max_downtime_ms: float,
                          per_host_limit: int, window_s: int | None = None,
                          dry_run: bool) -> tuple[Plan, list[str]]:
    """Plan a balance and, unless ``dry_run``, ask the source hosts to run
    it. Returns the plan and the hosts asked."""
    hosts, vms = fleet_state(await read_fleet(client))
    plan = plan_balance(hosts, vms, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
                        per_host_limit=per_host_limit,
                        recently_moved=await recently_moved(client))
    if dry_run or not plan.moves:
        return plan, []
    lease = await client.lease_grant(int(window_s or DEFAULT_WINDOW_S))
    for m in plan.moves:
        await client.put(keys.moved_key(m.vm), json.dumps(
            {"from": m.source, "to": m.destination, "at": time.time()}), lease=lease)
    sources = sorted({m.source for m in plan.moves})
    for src in sources:
        await client.delete(keys.moves_status_key(src))
        await client.put(keys.moves_key(src), request(
            [m for m in plan.moves if m.source == src], link_bps=link_bps,
            max_downtime_ms=max_downtime_ms, per_host_limit=per_host_limit))
    return plan, sources

"""Drain a host through etcd: the planner's moves, run by the host itself.

Theory of operation
-------------------
``livemig fleet drain HOST`` reads the fleet, plans with planner.plan_drain
and writes the plan as the host's *drain mark*, ``/livemig/drain/<host>``:
from then on the planner places nothing on that host. The host's daemon
(its FleetMember) reads its mark each lease renewal and runs the moves:
``per_host_limit`` at a time, each VM's mode chosen just before it moves
from its dirty rate measured then and the link in the plan (the predictor of
``livemig plan``), each migration an ordinary one whose commit point is the
etcd ownership transaction. It writes every VM's progress to
``/livemig/drain/<host>/status``; the CLI follows that key and prints the
progress and the final report. The mark stays after the drain (the host is
empty for its maintenance) until ``livemig fleet undrain HOST``.

The limit holds at both ends of a move: besides its own ``per_host_limit``
slots, the source takes one of the destination's ``per_host_limit`` incoming
slots in etcd (``/livemig/incoming/<dest>/<i>``, created only if absent,
under the source's lease, deleted once the migration ended), so several
sources draining or balancing into one host never start more migrations
into it at once than the limit; a source that dies frees its slot with its
lease. A move waits for a slot up to ``SLOT_WAIT_S`` and then fails, said so.

``livemig fleet balance`` (balance.py) asks each source host to make its
share of a balance plan through ``/livemig/moves/<host>``; the same runner
makes them, reports to ``/livemig/moves/<host>/status`` and deletes the
request once done (a request, unlike the drain mark, is run once).
"""
from __future__ import annotations

import asyncio
import json
import time

from . import keys
from .etcd import EtcdClient, EtcdError, b64, cmp_absent, cmp_mod_revision, cmp_value, op_put
from .keys import drain_key, status_key
from .planner import HostState, Plan, VMState, choose_mode, plan_drain
from .view import read_fleet

DEFAULT_LINK_BPS = 1e9 / 8         # 1 Gbit/s unless measured or given
DIRTY_WINDOW_S = 0.2
SLOT_WAIT_S = 600.0                # a move waits this long for a slot at its destination
SLOT_POLL_S = 0.2
UNSETTLED = ("queued", "waiting", "migrating")   # a move's status until it ended


def fleet_state(view) -> tuple[list[HostState], list[VMState]]:
    """Planner input from a FleetView (live hosts' own records)."""
    hosts, vms = [], []
    for h in view.hosts:
        if h["state"] != "live":
            continue
        hosts.append(HostState(h["addr"], int(h.get("memory_total_bytes") or 0),
                               int(h.get("memory_available_bytes") or 0),
                               int(h.get("cpus") or 1),
                               sum(int(v.get("vcpus", 1)) for v in h.get("vms", {}).values()),
                               draining=bool(h.get("draining") or h.get("drain_mark"))))
        for name, v in h.get("vms", {}).items():
            vms.append(VMState(name, h["addr"], int(v.get("memory_bytes", 0)),
                               int(v.get("vcpus", 1)), float(v.get("dirty_rate_bps") or 0.0)))
    return hosts, vms


def request(plan_moves, *, link_bps: float, max_downtime_ms: float,
            per_host_limit: int) -> str:
    """The record a host runs moves from (a drain mark, or a balance request)."""
    return json.dumps({
        "moves": [{"vm": m.vm, "destination": m.destination} for m in plan_moves],
        "link_bps": link_bps, "max_downtime_ms": max_downtime_ms,
        "per_host_limit": per_host_limit, "requested_at": time.time()})


async def request_drain(client: EtcdClient, host: str, *, link_bps: float,
                        max_downtime_ms: float, per_host_limit: int,
                        dry_run: bool) -> Plan:
    view = await read_fleet(client)
    if host not in {h["addr"] for h in view.hosts if h["state"] == "live"}:
        raise LookupError(f"no live host {host} in the fleet (see livemig fleet hosts)")
    hosts, vms = fleet_state(view)
    plan = plan_drain(hosts, vms, host, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
                      per_host_limit=per_host_limit)
    if not dry_run:
        await client.delete(status_key(host))
        await client.put(drain_key(host), request(plan.moves, link_bps=link_bps,
                                                  max_downtime_ms=max_downtime_ms,
                                                  per_host_limit=per_host_limit))
    return plan


async def follow(client: EtcdClient, key: str, *, on_progress, poll_s: float = 0.2,
                 timeout_s: float | None = None) -> dict:
    """Wait for the status at ``key`` (a host's drain or balance moves) to
    say done; ``on_progress(status)`` on each change."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        kv = await client.get(key)
        status = keys.parse_record(kv.value, what=kv.key) if kv is not None else None
        if status is not None and status != last:
            on_progress(status)
            last = status
            if status.get("state") == "done":
                return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the moves of {key} did not finish within {timeout_s:g} s "
                               f"(last status: {last})")
        await asyncio.sleep(poll_s)


class MoveRunner:
    """A host's side: run the moves of its drain mark (once per mark), else
    those of a balance request (then delete the request). One run at a time."""

    def __init__(self, member):
        self.member = member
        self._done_for: float | None = None       # requested_at of the mark run last
        self.task: asyncio.Task | None = None

    async def check(self) -> None:
        m = self.member
        kv = await m.client.get(drain_key(m.addr))
        m.draining = kv is not None
        if self.task is not None and not self.task.done():
            return
        if kv is not None:
            mark = keys.parse_record(kv.value, what=kv.key)
            if mark.get("requested_at") != self._done_for:
                self._done_for = mark.get("requested_at")
                self._start(self._run(mark, status_key(m.addr)), "fleet-drain")
                return
        req = await m.client.get(keys.moves_key(m.addr))
        if req is not None:
            self._start(self._run_once(req), "fleet-moves")

    def _start(self, coro, name: str) -> None:
        self.task = asyncio.get_running_loop().create_task(coro, name=name)

    async def _run_once(self, req) -> None:
        """A balance request: run it, then delete it (unless replaced meanwhile)."""
        m = self.member
        await self._run(keys.parse_record(req.value, what=req.key), keys.moves_status_key(m.addr))
        await m.client.txn([cmp_mod_revision(req.key, req.mod_revision)],
                           [{"request_delete_range": {"key": b64(req.key)}}])

    async def _incoming_slot(self, destination: str, vm: str, limit: int,
                             on_wait) -> tuple[str, str]:
        """One of ``destination``'s ``limit`` incoming slots, held under our
        lease: (its key, our value). ``await on_wait()`` once if none is free
        at first; TimeoutError after ``SLOT_WAIT_S``."""
        m = self.member
        value = json.dumps({"vm": vm, "source": m.addr}, sort_keys=True)
        deadline = time.monotonic() + SLOT_WAIT_S
        while True:
            for i in range(limit):
                key = keys.incoming_slot_key(destination, i)
                taken, _ = await m.client.txn([cmp_absent(key)],
                                              [op_put(key, value, lease=m.lease_id)])
                if taken:
                    return key, value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{destination} had all its {limit} incoming migration "
                                   f"slots taken for {SLOT_WAIT_S:g} s")
            if on_wait is not None:
                await on_wait()
                on_wait = None
            await asyncio.sleep(SLOT_POLL_S)

    async def _free_slot(self, key: str, value: str) -> None:
        """Give the slot back if it is still ours (else its lease ended it)."""
        try:
            await self.member.client.txn([cmp_value(key, value)],
                                         [{"request_delete_range": {"key": b64(key)}}])
        except EtcdError:       # etcd unreachable: the slot ends with our lease
            pass

    async def _run(self, mark: dict, status_at: str) -> None:
        m, daemon = self.member, self.member.daemon
        status = {"state": "running", "host": m.addr, "vms": {}}
        for move in mark["moves"]:
            status["vms"][move["vm"]] = {"destination": move["destination"], "status": "queued"}
        lock = asyncio.Lock()

        async def publish() -> None:
            async with lock:
                await m.client.put(status_at, json.dumps(status))

        await publish()
        slots = asyncio.Semaphore(max(1, int(mark.get("per_host_limit", 1))))
        link_bps = float(mark.get("link_bps") or DEFAULT_LINK_BPS)

        limit = max(1, int(mark.get("per_host_limit", 1)))

        async def one(move: dict) -> None:
            row = status["vms"][move["vm"]]
            async with slots:
                t0 = time.monotonic()
                slot = None
                try:
                    hosted = daemon.vms.get(move["vm"])
                    if hosted is None:
                        raise LookupError("no longer on this host")
                    async def waiting() -> None:
                        row.update(status="waiting", waiting_for=f"a free incoming slot at "
                                   f"{move['destination']}")
                        await publish()
                    slot = await self._incoming_slot(move["destination"], move["vm"], limit,
                                                     waiting)
                    row.pop("waiting_for", None)
                    rate_bps = await daemon.measure_dirty_rate(move["vm"], DIRTY_WINDOW_S)
                    p = choose_mode(hosted.vm.memory.length_bytes, rate_bps, link_bps,
                                    float(mark.get("max_downtime_ms", 300.0)))
                    mode = "precopy" if p.converges else p.recommended_mode
                    row.update(status="migrating", mode=mode, dirty_rate_bps=rate_bps)
                    await publish()
                    rec = await daemon.migrate_vm(move["vm"], move["destination"], mode=mode)
                    row.update(status=rec["status"], error=rec.get("error"))
                except Exception as exc:       # reported per VM; the drain goes on
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                finally:
                    if slot is not None:
                        await self._free_slot(*slot)
                row["time_s"] = time.monotonic() - t0
                await publish()

        t0 = time.monotonic()
        await asyncio.gather(*(one(move) for move in mark["moves"]))
        status.update(state="done", time_s=time.monotonic() - t0,
                      left=sorted(daemon.vms))
        await publish()

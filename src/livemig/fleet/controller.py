"""The always-on balance controller: one daemon at a time leads, elected through etcd.

Theory of operation
-------------------
``livemig daemon --fleet URL --balance-controller`` makes the daemon a
*candidate*. It registers ``/livemig/controller/candidates/<addr>`` under its
host lease (fleet/member.py) and, while nobody leads, campaigns::

    txn  if create_revision(/livemig/controller/leader) == 0      (the key is absent)
         then put leader = {addr, pid, since} under this host's lease; get leader
         else get leader

One create-only transaction wins. The key's ``create_revision`` is the
leader's **term**: etcd's revision only grows, so every later leader has a
larger term, and a key deleted and created again never has the old one.
The key lives as long as the leader's host lease: a leader killed with
SIGKILL, or cut off from etcd, loses it at most the TTL (``--fleet-ttl``) after
its last renewal; a leader shut down cleanly resigns at once (a fenced delete).
The other candidates watch the key and campaign as soon as it is deleted (below).

**Fencing.** Every write a leader makes — the whole of a balance pass — is one
transaction comparing ``create_revision(leader) == term``. A deposed leader
(paused or partitioned past its TTL while another took over) fails that
compare and writes nothing; the failure branch reads the key, and the old
leader steps down to candidate. Reads are not fenced: a pass plans from what it
read, and only its fenced write acts on the plan.

**A pass**, every ``interval_s`` while leading (fleet/decision.py decides):

1. read the balance requests still pending (``/livemig/moves/<host>``) and fold
   the reports of hosts that finished theirs into the log of moves;
2. read the fleet (view.py) and the moved records (``/livemig/moved/<name>``);
   wait while requests are pending or host records predate the moves' end,
   else plan with ``planner.plan_balance``, never a VM moved within the window;
3. one fenced transaction: for each source host its request (compared absent,
   so an operator's ``fleet balance`` under way is never overwritten) with its
   old status deleted, a moved record per VM under a lease of ``window_s``,
   and the state record ``/livemig/controller/state`` (last pass, moves).

The sources' own MoveRunners (drain.py) run the requests at their next
renewal, ``per_host_limit`` at a time, each move committed by the etcd
ownership transaction. The window's records and the state record live in
etcd, not in the leader: a new leader goes on from them, and any host can
show them (``livemig fleet controller``).

**Watch, and a slow poll.** Each daemon watches the leader key (fleet/watch.py,
a stream of its own) from the revision after its last read, and a candidate
campaigns as soon as the key's deletion arrives (lease expiry or
resignation). A broken stream is opened again from the revision after the
last event seen (none is missed; a compacted revision means a fresh read
first). Since a member cut off from its peers may keep a watch open and
silent, a candidate also reads the key every ``SAFETY_POLL_S`` (every
``poll_s`` while no watch stream is up); a leader checks its key every
``poll_s``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

from ..aio.tasks import cancel_and_wait
from ..service.eventlog import event
from . import keys
from .decision import (MAX_LOGGED_MOVES, REQUESTED, Decision, decide, held_by_window, log_entries,
                       moved_record, settle, stale_hosts)
from .drain import DEFAULT_LINK_BPS, fleet_state, request
from ..aio.deadline import within
from .etcd import EtcdClient, EtcdError, KeyValue, b64, cmp_absent, op_get, op_put
from .view import read_fleet
from .watch import watch_key

DEFAULT_INTERVAL_S = 60.0
MIN_POLL_S = 0.2
MAX_POLL_S = 1.0
SAFETY_POLL_S = 5.0     # a candidate's read of the leader key while its watch is up
WATCH_RETRY_S = 0.5     # before opening a broken watch stream again


def cmp_term(term: int) -> dict:
    """True while the leader key is the one created at revision ``term``."""
    return {"key": b64(keys.LEADER), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(term)}


def op_delete(key: str) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def _range_kv(answer: dict, index: int) -> KeyValue | None:
    """The key read by the transaction's ``index``-th operation, or None."""
    responses = answer.get("responses") or []
    if not responses:
        return None
    kvs = (responses[index].get("response_range") or {}).get("kvs") or []
    return KeyValue.from_json(kvs[0]) if kvs else None


def _leader_addr(kv: KeyValue | None) -> str | None:
    if kv is None:
        return None
    try:
        return keys.parse_record(kv.value, what=kv.key).get("addr")
    except ValueError:
        return None


async def campaign(client: EtcdClient, addr: str, lease_id: int, *,
                   now: float) -> tuple[int, KeyValue | None]:
    """Try to become leader: (term, leader key); term 0 if another leads."""
    record = json.dumps({"addr": addr, "pid": os.getpid(), "since": now})
    ok, answer = await client.txn([cmp_absent(keys.LEADER)],
                                  [op_put(keys.LEADER, record, lease_id), op_get(keys.LEADER)],
                                  [op_get(keys.LEADER)])
    kv = _range_kv(answer, -1)
    # A retried transaction whose first attempt went through finds our own key.
    if kv is not None and (ok or (kv.lease == lease_id and _leader_addr(kv) == addr)):
        return kv.create_revision, kv
    return 0, kv


async def fenced(client: EtcdClient, term: int, success: list[dict],
                 compare: list[dict] = ()) -> tuple[bool, KeyValue | None]:
    """``success`` only while the leader key is still of ``term`` (and
    ``compare`` holds): (done, the leader key as the failure read it)."""
    ok, answer = await client.txn([cmp_term(term), *compare], success, [op_get(keys.LEADER)])
    return ok, None if ok else _range_kv(answer, -1)


class BalanceController:
    """One daemon's candidacy and, while it leads, its balance passes."""

    def __init__(self, member, *, interval_s: float = DEFAULT_INTERVAL_S,
                 window_s: float, link_bps: float = DEFAULT_LINK_BPS,
                 max_downtime_ms: float = 300.0, per_host_limit: int = 2):
        self.member = member
        self.addr = member.addr
        # Its own connection: a pass must not queue the commit point's transaction.
        self.client = EtcdClient(member.client.url, timeout_s=member.client.timeout_s)
        self.interval_s, self.window_s = float(interval_s), float(window_s)
        self.link_bps, self.max_downtime_ms = link_bps, max_downtime_ms
        self.per_host_limit = per_host_limit
        self.poll_s = max(MIN_POLL_S, min(MAX_POLL_S, member.ttl_s / 5))
        self.term = 0                      # > 0 while this daemon leads
        self.leader: str | None = None     # as last read
        self.passes = 0
        self.last_decision: dict | None = None
        self.last_error: str | None = None
        self._state: dict = {}
        self._registered_lease = 0
        self._next_pass_at = 0.0
        self._task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._leader_gone = asyncio.Event()   # the watch saw the leader key deleted
        self.watching = False                 # a watch stream is up
        self.watch_events = 0                 # deletions the watch delivered

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="fleet-balance-controller")
        self._watch_task = loop.create_task(self._watch_leader(), name="fleet-leader-watch")

    async def _pause(self) -> None:
        """Until the next step: a leader checks its key every poll; a
        candidate waits for the watch to report the key deleted, or for the
        safety poll (short while no watch stream is up)."""
        if self.term:
            await asyncio.sleep(self.poll_s)
            return
        try:
            await within(self._leader_gone.wait(),
                         SAFETY_POLL_S if self.watching else self.poll_s)
        except TimeoutError:
            pass
        self._leader_gone.clear()

    async def _watch_leader(self) -> None:
        """Keep a watch on the leader key; set ``_leader_gone`` on its deletion."""
        next_revision = 0            # 0: read the key first
        while True:
            created = False
            try:
                if not next_revision:
                    answer = await self.client.call("kv/range", {"key": b64(keys.LEADER)})
                    if not answer.get("kvs"):
                        self._leader_gone.set()
                    next_revision = int(answer.get("header", {}).get("revision", 0)) + 1
                async for item in watch_key(self.client, keys.LEADER, next_revision):
                    if isinstance(item, int):
                        created, self.watching = True, True
                        continue
                    next_revision = item.revision + 1
                    if item.kind == "DELETE":
                        self.watch_events += 1
                        self._leader_gone.set()
            except EtcdError as exc:
                if not created:
                    next_revision = 0     # refused or compacted: read afresh, then watch
                event(logging.DEBUG, f"balance controller: leader watch: {exc}",
                      event="controller-watch")
            self.watching = False
            await asyncio.sleep(WATCH_RETRY_S)

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
                self.last_error = None
            except Exception as exc:     # the task's one funnel: it must outlive any pass
                self.last_error = f"{type(exc).__name__}: {exc}"
                event(logging.WARNING, f"balance controller: {self.last_error}",
                      event="controller-error")
            await self._pause()

    async def step(self) -> None:
        """One poll: register, campaign or check the lead, and pass when due."""
        m = self.member
        if m.state != "member" or not m.lease_id:
            if self.term:
                self._step_down("this host's lease is gone")
            return
        if self._registered_lease != m.lease_id:
            await self.client.put(keys.candidate_key(self.addr), json.dumps(
                {"addr": self.addr, "pid": os.getpid()}), lease=m.lease_id)
            self._registered_lease = m.lease_id
        if not self.term:
            if not await self.campaign():
                return
        else:
            kv = await self.client.get(keys.LEADER)
            if kv is None or kv.create_revision != self.term:
                self.leader = _leader_addr(kv)
                self._step_down("the leader key is gone" if kv is None else
                                f"{self.leader or 'another host'} leads now")
                return
        if time.monotonic() >= self._next_pass_at:
            self._next_pass_at = time.monotonic() + self.interval_s
            await self.run_pass()

    async def campaign(self) -> bool:
        term, kv = await campaign(self.client, self.addr, self.member.lease_id, now=time.time())
        self.leader = _leader_addr(kv)
        if not term:
            return False
        self.term, self._next_pass_at = term, 0.0
        self._state = {}
        state_kv = await self.client.get(keys.CONTROLLER_STATE)
        if state_kv is not None:
            try:
                self._state = keys.parse_record(state_kv.value, what=state_kv.key)
            except ValueError as exc:     # start afresh: the first pass rewrites it
                event(logging.WARNING, f"balance controller: {exc}", event="controller-error")
        event(logging.INFO, f"balance controller: {self.addr} leads, term {term} "
              f"(took over from {self._state.get('leader') or 'nobody'})",
              event="controller-elected", term=term)
        return True

    def _step_down(self, why: str) -> None:
        event(logging.WARNING, f"balance controller: {self.addr} no longer leads (term "
              f"{self.term}): {why}", event="controller-deposed", term=self.term)
        self.term = 0

    async def run_pass(self) -> str:
        """One balance pass, fenced. Returns its action ("move", "wait",
        "balanced"), "deposed", or "conflict" (a request appeared meanwhile)."""
        c, now = self.client, time.time()
        view = await read_fleet(c)
        live = {h["addr"]: h for h in view.hosts if h["state"] == "live"}
        pending, reports, report_revision = set(), {}, {}
        for kv in await c.get_prefix(keys.MOVES):
            host = kv.key[len(keys.MOVES):]
            if host.endswith(keys.STATUS_SUFFIX):
                reports[host[:-len(keys.STATUS_SUFFIX)]] = keys.parse_record(kv.value,
                                                                             what=kv.key)
                report_revision[host[:-len(keys.STATUS_SUFFIX)]] = kv.mod_revision
            else:
                pending.add(host)
        moves = self._state.get("moves", [])
        waited = {e["from"] for e in moves if e["status"] == REQUESTED}
        done = {h: r for h, r in reports.items() if h in waited - pending}
        settled_revision = max([self._state.get("settled_revision", 0),
                                *(report_revision[h] for h in done)])
        moves = [e if e["status"] != REQUESTED or e["from"] in live or e["from"] in done
                 else {**e, "status": "source lost"} for e in settle(moves, done)]
        hosts, vms = fleet_state(view)
        records = {}
        for kv in await c.get_prefix(keys.MOVED):
            try:
                records[kv.key[len(keys.MOVED):]] = keys.parse_record(kv.value, what=kv.key)
            except ValueError:
                records[kv.key[len(keys.MOVED):]] = {}
        d = decide(hosts, vms, held=held_by_window(records, now), pending=pending & set(live),
                   stale=stale_hosts({a: h["record_revision"] for a, h in live.items()},
                                     settled_revision),
                   link_bps=self.link_bps, max_downtime_ms=self.max_downtime_ms,
                   per_host_limit=self.per_host_limit)
        state = {"leader": self.addr, "term": self.term,
                 "passes": int(self._state.get("passes", 0)) + 1,
                 "last_pass_at": now, "last_pass": d.to_dict(),
                 "moves": (moves + log_entries(d, now=now, term=self.term))[-MAX_LOGGED_MOVES:],
                 "settled_revision": settled_revision, "window_s": self.window_s,
                 "interval_s": self.interval_s}
        ok, leader = await fenced(c, self.term, *await self._writes(d, state, now))
        if not ok:
            if leader is None or leader.create_revision != self.term:
                self.leader = _leader_addr(leader)
                self._step_down("its pass's fenced transaction failed: another leads")
                return "deposed"
            event(logging.INFO, "balance controller: a balance request appeared meanwhile; "
                  "the next pass plans again", event="controller-conflict")
            return "conflict"
        self._state, self.passes, self.last_decision = state, self.passes + 1, d.to_dict()
        for line in d.lines():
            event(logging.INFO, line, event="controller-pass", term=self.term,
                  action=d.action)
        return d.action

    async def _writes(self, d: Decision, state: dict, now: float) -> tuple[list, list]:
        """The pass's transaction: (operations, extra compares)."""
        ops, compare = [op_put(keys.CONTROLLER_STATE, json.dumps(state))], []
        if not d.plan.moves:
            return ops, compare
        # An unused lease (the transaction fails) simply expires.
        lease = await self.client.lease_grant(max(1, math.ceil(self.window_s)))
        for m in d.plan.moves:
            ops.append(op_put(keys.moved_key(m.vm), json.dumps(
                moved_record(m, now=now, window_s=self.window_s, term=self.term)), lease))
        for src in sorted({m.source for m in d.plan.moves}):
            compare.append(cmp_absent(keys.moves_key(src)))
            ops.append(op_delete(keys.moves_status_key(src)))
            ops.append(op_put(keys.moves_key(src), request(
                [m for m in d.plan.moves if m.source == src], link_bps=self.link_bps,
                max_downtime_ms=self.max_downtime_ms, per_host_limit=self.per_host_limit)))
        return ops, compare

    def describe(self) -> dict:
        return {"role": "leader" if self.term else "candidate", "term": self.term or None,
                "leader": self.addr if self.term else self.leader, "passes": self.passes,
                "last_pass": self.last_decision, "interval_s": self.interval_s,
                "window_s": self.window_s, "poll_s": self.poll_s, "watching": self.watching,
                "error": self.last_error}

    async def close(self) -> None:
        """Stop; a leader resigns (a fenced delete) so a candidate takes over
        at its next poll rather than after the TTL."""
        await cancel_and_wait(self._task, self._watch_task)
        try:
            if self.term:
                await fenced(self.client, self.term, [op_delete(keys.LEADER)])
                event(logging.INFO, f"balance controller: {self.addr} resigned (term "
                      f"{self.term})", event="controller-resigned", term=self.term)
                self.term = 0
            await self.client.delete(keys.candidate_key(self.addr))
        except EtcdError:
            pass      # the host lease, revoked next, removes both keys anyway
        await self.client.close()


async def read_controller(client: EtcdClient) -> dict:
    """What ``livemig fleet controller`` shows: leader, term, candidates, state."""
    kv = await client.get(keys.LEADER)
    leader = None
    if kv is not None:
        try:
            rec = keys.parse_record(kv.value, what=kv.key)
        except ValueError as exc:
            rec = {"malformed": str(exc)[:200]}
        leader = {**rec, "term": kv.create_revision}
    candidates = sorted(c.key[len(keys.CANDIDATES):]
                        for c in await client.get_prefix(keys.CANDIDATES))
    state_kv = await client.get(keys.CONTROLLER_STATE)
    state = (keys.parse_record(state_kv.value, what=state_kv.key)
             if state_kv is not None else {})
    state.pop("settled_revision", None)
    return {"leader": leader, "candidates": candidates, "state": state}


__all__ = ["BalanceController", "campaign", "fenced", "cmp_term", "read_controller",
           "DEFAULT_INTERVAL_S"]

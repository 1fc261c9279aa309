"""A daemon in a fleet: its host record under a lease, and the one-owner rule.

Theory of operation
-------------------
``FleetMember.join`` grants a lease (``ttl_s``), writes the host's record
under it at ``/livemig/hosts/<addr>`` and marks the host known; a task renews
the lease every ``ttl_s / 3`` and rewrites the record (memory and CPUs free,
VMs, load, version). It also gives every VM running here that etcd does not
know yet an owner key naming this host, epoch 1 (a transaction that only
creates). If etcd cannot be reached for ``ttl_s`` the lease is gone: the
member then holds no right to commit, and says so in ``state``.

The handover's commit point is an etcd transaction, made by the destination
after it has received ``Commit`` and before it resumes the guest
(``CommitGate``, awaited by engine/destination/server.py)::

    read /livemig/vms/<name>         before the offer is accepted:
                                     owner = source, epoch = e, mod_revision = r
    txn  if mod_revision == r and this host's lease key still holds our lease
         then owner = here, epoch = e + 1

The new record says ``state: owned``: from its success on, the guest may
run here. Only a successful transaction lets the guest run here. A failed
compare (someone else owns it, or our lease is gone) refuses; an answer lost
on the way is read back until the deadline, and anything still unknown then
refuses too: a destination never runs a VM it cannot prove it owns. The read
is made before the offer is accepted (``CommitGate.admit``), so the commit
point is this one transaction.

A destination daemon killed between its commit and the resume leaves a key
naming it for a guest that never ran there. Its session journal
(engine/destination/outcomes.py) proves that at the restart — no
``resuming`` line, same kernel — and ``_reconcile`` then rewrites the key
``state: committed`` (same owner and epoch): etcd's word that the guest
never ran there, on which the source takes the VM back (a new epoch) and
resumes it.

A paused copy left in doubt here is settled from etcd at each renewal, as
``livemig vm resolve`` would (fleet/resolve.py): resumed after a reclaim when
etcd names this host, discarded once the owner it names runs the VM.

VMs that died here — with an earlier life of this daemon (SIGKILL: they
were its threads), or a post-copy abandoned for want of pages — are marked
``lost`` in etcd (``_reconcile`` at join, ``mark_lost``): same owner and
epoch, so ``fleet vms`` says where the VM was lost, and nothing counts on it.

A source that learns the destination did *not* resume the VM reclaims it
before resuming it (``SourceArbiter.reclaim``): a transaction that bumps the
epoch, so a destination transaction still in flight can no longer succeed.
If etcd names the destination (its transaction went through, but it gave up
before learning so) the reclaim takes the key back from it; if etcd cannot be
reached the source keeps the VM paused (in doubt) rather than run it unproven.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from ..aio.tasks import cancel_and_wait
from .. import failpoints
from ..errors import ControlError, LivemigError, MigrationError
from . import keys
from .drain import MoveRunner
from .blockingtxn import BlockingTxn, FastPathFailed
from .etcd import (EtcdClient, EtcdError, EtcdUnavailable, KeyValue, b64, cmp_absent,
                   cmp_mod_revision, op_get, op_put)

DEFAULT_TTL_S = 10
MAX_COMMIT_ATTEMPTS = 5     # transactions at one commit point, all within commit_timeout_s
log = logging.getLogger("livemig.fleet")


def _meminfo_bytes(field: str) -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _first_kv(response: dict) -> KeyValue | None:
    """The key a transaction's range operation read, or None."""
    kvs = (response.get("response_range") or {}).get("kvs") or []
    return KeyValue.from_json(kvs[0]) if kvs else None


def _same_revision(a: KeyValue | None, b: KeyValue | None) -> bool:
    return (a is None) == (b is None) and (a is None or a.mod_revision == b.mod_revision)


def _same_value(a: KeyValue | None, b: KeyValue | None) -> bool:
    return (a is None) == (b is None) and (a is None or a.value == b.value)


def _cmp_lease(key: str, lease_id: int) -> dict:
    return {"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease_id)}


class FleetMember:
    """One daemon's membership; attach with ``daemon.fleet = member``."""

    def __init__(self, daemon, url: str, *, ttl_s: int = DEFAULT_TTL_S,
                 commit_timeout_s: float = 5.0, fast_commit: bool = True):
        self.daemon = daemon
        self.addr = daemon.advertised
        self.client = EtcdClient(url, timeout_s=max(1.0, ttl_s / 3))
        self.ttl_s = int(ttl_s)
        self.commit_timeout_s = commit_timeout_s
        # The commit point from a blocking socket first (fleet/blockingtxn.py).
        self.fast_commit = fast_commit
        self._fast_conn: BlockingTxn | None = None   # kept alive between commit points
        self.lease_id = 0
        self.lease_expires_at = 0.0       # monotonic: past it, our lease may be gone
        self.state = "joining"
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None
        self.draining = False              # our drain mark is set (fleet/drain.py)
        self.moves = MoveRunner(self)      # drains and balance requests
        self.controller = None             # a controller.BalanceController if a candidate
        self._seen: set[str] = set()       # VMs hosted here at the last publish
        self._settling: dict[str, asyncio.Task] = {}   # paused copies in doubt being settled
        self._doubts: dict[str, str] = {}   # why each is still in doubt, as last logged
        self._claimed: set[str] = set()     # names claimed by this daemon's life

    # -- membership ---------------------------------------------------------------------
    async def join(self) -> None:
        """Raise EtcdError if etcd cannot be reached at all: the daemon must
        not pretend to be in a fleet it never joined."""
        await self._new_lease()
        await self.client.put(keys.known_key(self.addr), json.dumps({"addr": self.addr}))
        await self._reconcile()
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                            name="fleet-keepalive")

    async def _new_lease(self) -> None:
        t0 = time.monotonic()
        self.lease_id = await self.client.lease_grant(self.ttl_s)
        self.lease_expires_at = t0 + self.ttl_s
        await self._publish()
        self.state = "member"

    def record(self) -> dict:
        d = self.daemon
        return {"addr": self.addr, "pid": os.getpid(), "version": _version(),
                "memory_available_bytes": _meminfo_bytes("MemAvailable"),
                "memory_total_bytes": _meminfo_bytes("MemTotal"), "draining": self.draining,
                "cpus": os.cpu_count() or 1, "load_1m": os.getloadavg()[0],
                "vms": {name: {"memory_bytes": h.vm.memory.length_bytes,
                               "vcpus": h.vm.nvcpus, "running": h.vm.running,
                               "migrating": h.migrating,
                               "dirty_rate_bps": h.vm.dirty_rate}
                        for name, h in d.vms.items()},
                "updated_at": time.time()}

    async def _publish(self) -> None:
        await self.client.put(keys.host_key(self.addr), json.dumps(self.record()),
                              lease=self.lease_id)
        here = dict(self.daemon.vms)
        for name, hosted in here.items():
            # Once per VM that appeared here (a VM that arrived by migration
            # has its key already: the create-only transaction does nothing).
            if name not in self._seen and not hosted.migrating and hosted.unresolved is None:
                await self._claim_new(name)
        for name, hosted in here.items():
            if hosted.unresolved is not None and not hosted.vm.running:
                # A copy found lost with its host is the operator's now,
                # unless that host comes back and hands the key back.
                self._settle_later(name, hosted.unresolved["peer"] if "lost" in
                                   hosted.unresolved else None)
        for name in self._seen - set(here):   # ``_seen`` changes only once all succeeded
            # Gone from here: migrated (the key names its new owner, so the
            # compare fails and nothing changes) or stopped (the key still
            # names us, at the epoch we held: free the name).
            await self._release_if_ours(name)
        self._seen = set(here)

    async def _claim_new(self, name: str) -> None:
        """A VM started here that etcd has never seen: owner here, epoch 1."""
        key = keys.vm_key(name)
        await self.client.txn([cmp_absent(key)],
                              [op_put(key, keys.owner_record(self.addr, 1))])

    async def owner_of(self, name: str) -> tuple[str | None, int, KeyValue | None]:
        """(owner, epoch, key) as etcd has them; (None, 0, None) if unknown."""
        kv = await self.client.get(keys.vm_key(name))
        if kv is None:
            return None, 0, None
        return (*keys.parse_owner(kv.value, what=kv.key), kv)

    async def is_member(self, addr: str) -> bool:
        """Whether ``addr`` ever joined this fleet. Only a member's commit
        goes through etcd: of any other destination, etcd knows nothing."""
        return await self.client.get(keys.known_key(addr)) is not None

    async def runs_at(self, owner: str, name: str) -> tuple[bool, bool]:
        """(live, runs): whether ``owner`` holds a live record, and whether
        that record lists VM ``name`` running (whole: a post-copy arrival is
        not listed until its last page has landed)."""
        host = await self.client.get(keys.host_key(owner))
        if host is None:
            return False, False
        there = keys.parse_record(host.value, what=host.key).get("vms", {}).get(name)
        return True, isinstance(there, dict) and bool(there.get("running"))

    def _settle_later(self, name: str, lost_at: str | None = None) -> None:
        """A paused copy left in doubt here: settle it as ``livemig vm
        resolve`` would (fleet/resolve.py: etcd's owner decides, and the
        destination of the broken handover is asked when etcd names it), in
        a task of its own so that asking a silent peer never holds up the
        lease's renewal. Anything uncertain leaves it paused until the next
        renewal tries again. A copy found lost with its host ``lost_at`` is
        settled only once etcd says ``committed`` there: that host's
        restarted daemon proved it never ran the guest."""
        self._settling = {n: t for n, t in self._settling.items() if not t.done()}
        if name in self._settling:
            return
        self._settling[name] = asyncio.get_running_loop().create_task(
            self._settle(name, lost_at), name=f"fleet-settle-{name}")

    async def _settle(self, name: str, lost_at: str | None = None) -> None:
        try:
            if lost_at is not None:
                owner, _, kv = await self.owner_of(name)
                if owner != lost_at or kv is None \
                        or keys.owner_state(kv.value, what=kv.key)[0] != keys.COMMITTED:
                    return
            done = await self.daemon.resolve_vm(name)
        except (LivemigError, ValueError) as exc:
            if self._doubts.get(name) != str(exc):     # said once, not at every renewal
                self._doubts[name] = str(exc)
                log.warning("fleet: %s stays paused here, in doubt: %s", name, exc)
            return
        self._doubts.pop(name, None)
        log.warning("fleet: settled %s from etcd: %s (%s)", name, done["resolved"],
                    done["reason"])

    async def claim_name(self, name: str) -> None:
        """Before a VM named ``name`` is started (or restored) here: etcd must
        name this host its owner, now, so no other host can start or receive
        a VM of that name meanwhile. A new name gets epoch 1; a name whose
        owner is lost (its lease expired) is taken over at the next epoch.
        Raises ControlError, and nothing is started, when another live host
        owns the name, this host is marked for draining, or etcd cannot
        register it."""
        if self.draining:
            raise ControlError(self.draining_refusal(name), error_type="Refused")
        key = keys.vm_key(name)
        self._claimed.add(name)       # not one that died with an earlier life (_reconcile)
        try:
            owner, epoch, kv = await self.owner_of(name)
            lost = kv is not None and keys.owner_state(kv.value, what=kv.key)[0] == keys.LOST
            if owner == self.addr and not lost:
                return
            if lost:
                log.warning("fleet: taking the name %s over: etcd says its VM was lost with %s "
                            "(epoch %d)", name, owner, epoch)
            elif owner is not None:
                live, runs = await self.runs_at(owner, name)
                if live:
                    raise ControlError(
                        f"etcd names {owner} (epoch {epoch}) as the owner of a VM named "
                        f"{name!r}, and that host is live{' and runs it' if runs else ''}: "
                        "one name, one VM in the fleet. Choose another name (`livemig fleet "
                        "vms` lists the names in use); nothing was started",
                        error_type="VMExists")
                log.warning("fleet: taking the name %s over from %s (epoch %d), which is lost",
                            name, owner, epoch)
            compare = [cmp_absent(key) if kv is None else cmp_mod_revision(key, kv.mod_revision),
                       _cmp_lease(keys.host_key(self.addr), self.lease_id)]
            ok, _ = await self.client.txn(compare, [op_put(key, keys.owner_record(self.addr,
                                                                                  epoch + 1))])
        except (EtcdError, ValueError) as exc:
            raise ControlError(f"cannot register the name {name!r} in etcd ({exc}); nothing "
                               "was started: retry once etcd answers", error_type="Refused")
        if not ok:
            raise ControlError(f"etcd refused to register the name {name!r} for this host (it "
                               "was taken meanwhile, or this host's lease is gone); nothing was "
                               "started", error_type="Refused")

    async def release_name(self, name: str) -> None:
        """A claimed name whose VM did not start after all: free it if ours."""
        try:
            await self._release_if_ours(name)
        except (EtcdError, ValueError) as exc:
            log.warning("fleet: could not free the name %s in etcd: %s", name, exc)

    async def mark_lost(self, name: str, why: str, *, owner_addr: str | None = None) -> bool:
        """VM ``name`` died here (with a killed daemon, or a post-copy whose
        source died) — or at ``owner_addr``, as its restarted daemon told
        the source: if etcd names that host and says it runs the VM, say it
        is lost (same owner and epoch, a transaction comparing the revision).
        A key in state ``committed`` is left alone: the guest never ran
        there, and the source's paused copy is the VM (its source reclaims it).
        Returns whether the key was marked."""
        key = keys.vm_key(name)
        kv = await self.client.get(key)
        if kv is None:
            return False
        owner, epoch = keys.parse_owner(kv.value, what=key)
        if owner != (owner_addr or self.addr) \
                or keys.owner_state(kv.value, what=key)[0] != keys.OWNED:
            return False
        ok = await self._restate(kv, owner, epoch, keys.LOST, why)
        if ok:
            log.warning("fleet: VM %s is lost: %s", name, why)
        return ok

    async def _restate(self, kv: KeyValue, owner: str, epoch: int, state: str,
                       why: str | None = None) -> bool:
        """Same owner and epoch, a new state, if the key is still as read."""
        ok, _ = await self.client.txn([cmp_mod_revision(kv.key, kv.mod_revision)],
                                      [op_put(kv.key, keys.owner_record(owner, epoch, state,
                                                                        why))])
        return ok

    async def _reconcile(self) -> None:
        """At join: VMs etcd says run here that this daemon does not host
        died with an earlier life of it (killed: its VMs were threads of the
        process). Mark them lost, so that nothing counts on them — except
        those that life received and provably never resumed (it died between
        its commit and the resume): their keys say ``committed``, and their
        sources take them back."""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        unrun = self.daemon.arrivals_never_resumed()
        for kv in await self.client.get_prefix(keys.VMS):
            name = kv.key[len(keys.VMS):]
            try:
                owner, epoch = keys.parse_owner(kv.value, what=kv.key)
                state = keys.owner_state(kv.value, what=kv.key)[0]
            except ValueError:
                continue
            if owner != self.addr or name in self.daemon.vms or name in self._claimed:
                continue
            if name in unrun and state == keys.OWNED:
                if await self._restate(kv, owner, epoch, keys.COMMITTED):
                    log.warning("fleet: VM %s was committed here but never resumed (this daemon "
                                "restarted before it did): its source may take it back", name)
                continue
            await self.mark_lost(name, f"it died with the daemon on {owner} (that daemon "
                                 f"restarted at {started} UTC and no longer runs it)")

    async def _release_if_ours(self, name: str) -> None:
        key = keys.vm_key(name)
        kv = await self.client.get(key)
        if kv is not None and keys.parse_owner(kv.value, what=key)[0] == self.addr:
            await self.client.txn([cmp_mod_revision(key, kv.mod_revision)],
                                  [{"request_delete_range": {"key": b64(key)}}])

    async def _keep_alive(self) -> None:
        interval_s = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                t0 = time.monotonic()
                if self.lease_id and await self.client.lease_keepalive(self.lease_id) > 0:
                    self.lease_expires_at = t0 + self.ttl_s
                    await self._publish()
                    await self.moves.check()
                    self.state, self.last_error = "member", None
                else:
                    # The lease expired (we were cut off longer than ttl_s): rejoin.
                    self.state = "lost"
                    await self._new_lease()
            except (EtcdError, ValueError) as exc:
                self.last_error = str(exc)
                if time.monotonic() >= self.lease_expires_at:
                    self.state = "lost"
                log.warning("fleet: %s", exc)

    def draining_refusal(self, name: str) -> str:
        return (f"refusing VM {name!r}: this host ({self.addr}) is marked for draining in etcd "
                f"(`livemig fleet drain`) and takes no VM until `livemig fleet undrain "
                f"{self.addr}`")

    def describe(self) -> dict:
        return {"url": self.client.url, "addr": self.addr, "state": self.state,
                "lease_id": self.lease_id, "ttl_s": self.ttl_s, "error": self.last_error,
                "controller": self.controller.describe() if self.controller else None}

    async def close(self, *, leave: bool = True) -> None:
        if self.controller is not None:      # resigns while our lease still holds
            await self.controller.close()
        await cancel_and_wait(self._task, self.moves.task, *self._settling.values())
        if leave and self.lease_id:
            try:
                await self.client.lease_revoke(self.lease_id)
            except EtcdError:
                pass
        if self._fast_conn is not None:
            self._fast_conn.close()
        await self.client.close()

    # -- ownership: the destination's commit point --------------------------------------
    def commit_gate(self, name: str, source: str) -> "CommitGate":
        """The destination's side of one handover of ``name`` from ``source``:
        ``admit`` before the offer is accepted, the gate itself between
        Commit and resume (CommitGate)."""
        return CommitGate(self, name, source)

    # The fast path (fleet/blockingtxn.py): the same transaction from a
    # blocking socket, kept alive between commit points and checked at each
    # offer (a connection etcd closed while idle is replaced before the
    # pause). Any doubt — no clean answer, a refusal — returns None, and the
    # full path below runs as if the fast attempt's answer had been lost: it
    # reads back what etcd holds before deciding anything.
    def _fast_path(self) -> BlockingTxn | None:
        if not self.fast_commit:
            return None
        where = self.client.endpoints[self.client.endpoint_index]
        conn = self._fast_conn
        if conn is not None and conn.alive() and (conn.host, conn.port) == where:
            return conn
        if conn is not None:
            conn.close()
        try:
            self._fast_conn = BlockingTxn(*where)
        except FastPathFailed:
            self._fast_conn = None
        return self._fast_conn

    def _fast_commit(self, fast: BlockingTxn | None, name: str, first: KeyValue | None,
                     epoch: int) -> int | None:
        if fast is None:
            return None
        try:
            compare, success, failure = self._commit_ops(name, first, epoch)
            ok, _ = fast.txn(compare, success, failure)
        except (FastPathFailed, ValueError):
            return None
        return epoch if ok else None

    def _commit_ops(self, name: str, kv: KeyValue | None, epoch: int):
        """The ownership transaction: (compare, success, failure). A host
        marked for draining takes ownership of nothing."""
        key = keys.vm_key(name)
        compare = [cmp_absent(key) if kv is None else cmp_mod_revision(key, kv.mod_revision),
                   _cmp_lease(keys.host_key(self.addr), self.lease_id),
                   cmp_absent(keys.drain_key(self.addr))]
        return (compare, [op_put(key, keys.owner_record(self.addr, epoch))],
                [op_get(key), op_get(keys.drain_key(self.addr))])

    async def take_ownership(self, name: str, source: str, first: KeyValue | None,
                             epoch: int) -> int:
        """owner source, epoch e → owner here, ``epoch`` (e + 1), in one
        transaction. Returns the epoch; raises MigrationError (never run
        here) otherwise.

        The epoch is fixed by ``first``, the key as read before the offer
        was accepted (CommitGate.admit, next_epoch): whatever is read later
        may only confirm it. A transaction whose
        answer is lost is sent again only while the key still holds what was
        first read (the same owner and epoch); a key that moved on — above
        all a source that reclaimed the VM after the break (owner = source,
        epoch e+1) — refuses, since committing at the new epoch would run
        the VM here while the source runs it too."""
        key = keys.vm_key(name)
        deadline = time.monotonic() + self.commit_timeout_s
        where = (f"VM {name!r} stays paused at the source ({source}), which keeps it; "
                 "the copy here is discarded unrun")
        try:
            new = keys.owner_record(self.addr, epoch)
            kv, ok = first, False
            for _attempt in range(MAX_COMMIT_ATTEMPTS):
                compare, success, failure = self._commit_ops(name, kv, epoch)
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise EtcdUnavailable(f"no settled answer within {self.commit_timeout_s:g} s")
                try:
                    ok, answer = await self.client.txn(compare, success, failure,
                                                       timeout_s=left_s)
                except EtcdUnavailable:
                    ok, answer = False, None      # applied or not: read the key to learn
                if ok:
                    break
                if answer is not None:
                    read = [*(answer.get("responses") or []), {}, {}]
                    current, mark = _first_kv(read[0]), _first_kv(read[1])
                    if mark is not None:
                        raise MigrationError(f"{self.draining_refusal(name)}; {where}",
                                             phase="switchover")
                else:
                    current = await self._read_until(key, deadline)
                if current is not None and current.value == new:
                    ok = True    # our own transaction went through; its answer was lost
                    break
                if answer is not None and _same_revision(current, kv):
                    break        # etcd answered, the key is unchanged: our lease failed
                if not _same_value(current, first):
                    break        # the key moved on from what we first read: not ours to take
                kv = current     # rewritten as it was, or no answer: the same commit again
        except (EtcdError, ValueError) as exc:
            raise MigrationError(f"cannot prove ownership of {name!r} in etcd ({exc}); {where}",
                                 phase="switchover") from exc
        if not ok:
            raise MigrationError(f"etcd refused the ownership transaction for {name!r} (its "
                                 f"owner changed, or this host's lease is gone); {where}",
                                 phase="switchover")
        return epoch

    async def _read_until(self, key: str, deadline: float) -> KeyValue | None:
        """The key as etcd has it, asking until the deadline (then EtcdUnavailable)."""
        while True:
            try:
                return await self.client.get(key)
            except EtcdUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def resolve(self, name: str, peer: str, action: str | None, ask):
        """``livemig vm resolve`` here: what etcd says to do (fleet/resolve.py)."""
        from .resolve import resolve

        return await resolve(self, name, peer, action, ask)

    # -- ownership: the source's side ------------------------------------------------
    def arbiter(self, name: str, destination: str) -> "SourceArbiter":
        return SourceArbiter(self, name, destination)


class NotTheOwner(ValueError):
    """etcd names another host than the source as the VM's owner."""


def next_epoch(first: KeyValue | None, name: str, source: str) -> int:
    """The epoch a handover from ``source`` commits at, given the VM's key
    as read before the offer was accepted; NotTheOwner (or ValueError, for
    a record that does not parse) if the source does not own it."""
    if first is None:
        return 1        # a VM etcd does not know yet: the commit creates its key
    owner, epoch = keys.parse_owner(first.value, what=first.key)
    if owner != source:
        raise NotTheOwner(f"etcd names {owner} (epoch {epoch}) as the owner of {name!r}, "
                          f"not the source {source}")
    return epoch + 1


class CommitGate:
    """The destination's side of one handover in a fleet.

    ``admit()`` is awaited before the destination accepts the offer: it
    reads the VM's key and fixes the epoch the commit will take (the
    source's, plus one); a source etcd does not name, or a key that cannot
    be read, refuses the offer, the VM still running at the source. The
    gate itself (``await gate()``) runs between Commit and the resume: the
    ownership transaction at that epoch, the one etcd round trip inside the
    guest's pause.

    Why the read must come before the offer is accepted: a source that
    gets no word from its destination after sending Commit may take the VM
    back (``SourceArbiter``: owner = source, epoch + 1) and resume it. A
    read made after that finds the source owning the VM again, and a
    commit at the epoch above would run the VM here as well. The source
    sends Commit only on an accepted offer, so a read answered before the
    offer was accepted precedes any reclaim, and a reclaim fails every
    compare made from it."""

    def __init__(self, member: FleetMember, name: str, source: str):
        self.member, self.name, self.source = member, name, source
        self._first: KeyValue | None = None
        self._epoch: int | None = None
        self._fast: BlockingTxn | None = None

    async def admit(self) -> None:
        m = self.member
        try:
            # Asked until the commit deadline: an etcd electing a new leader
            # answers within it (the answer still comes before Accept).
            first = await m._read_until(keys.vm_key(self.name),
                                        time.monotonic() + m.commit_timeout_s)
            epoch = next_epoch(first, self.name, self.source)
        except NotTheOwner as exc:
            raise LivemigError(f"{exc}: refused; the VM stays with its owner") from exc
        except (EtcdError, ValueError) as exc:
            raise LivemigError(f"cannot read the owner of {self.name!r} in etcd ({exc}): "
                               f"refused; the VM stays at the source ({self.source})") from exc
        self._first, self._epoch = first, epoch
        self._fast = m._fast_path()     # checked (or connected) now, before the pause

    async def __call__(self) -> None:
        m, name, source = self.member, self.name, self.source
        if self._epoch is None:
            raise MigrationError(f"the owner of {name!r} was not read in etcd before the offer "
                                 "was accepted: refused; the copy here is discarded unrun",
                                 phase="switchover")
        fast = self._fast
        try:
            epoch = m._fast_commit(fast, name, self._first, self._epoch)
            if epoch is None:
                epoch = await m.take_ownership(name, source, self._first, self._epoch)
            failpoints.hit(failpoints.AFTER_COMMIT)
        finally:
            if fast is not None and fast.sock is None and m._fast_conn is fast:
                m._fast_conn = None


class SourceArbiter:
    """What a source asks etcd after a handover broke past Commit."""

    def __init__(self, member: FleetMember, name: str, destination: str):
        self.member, self.name, self.destination = member, name, destination

    async def owner(self) -> tuple[str, int] | None:
        kv = await self.member.client.get(keys.vm_key(self.name))
        return None if kv is None else keys.parse_owner(kv.value, what=kv.key)

    async def settle(self) -> str | None:
        """The destination could not be asked: decide from etcd alone. If
        etcd names this host (or no host), no destination committed: reclaim
        (a new epoch fences a commit still in flight) and return None — the
        VM may resume here. Otherwise why the VM stays paused here: etcd
        names another host, which alone may run it (it is discarded here
        once that host reports running it, fleet/resolve.py)."""
        try:
            kv = await self.member.client.get(keys.vm_key(self.name))
            owner = None if kv is None else keys.parse_owner(kv.value, what=kv.key)
            state = keys.OWNED if kv is None else keys.owner_state(kv.value, what=kv.key)[0]
            member = await self.member.is_member(self.destination)
        except (EtcdError, ValueError) as exc:
            return f"etcd could not say who owns {self.name!r}: {exc}"
        if not member:
            return (f"the destination {self.destination} is not a host of this fleet: etcd "
                    "cannot say whether it resumed the VM")
        if owner is not None and owner[0] == self.destination and state == keys.COMMITTED:
            # Its restarted daemon said in etcd that the guest never ran there.
            return await self.reclaim(destination_said_unrun=False)
        if owner is not None and owner[0] != self.member.addr:
            return (f"etcd names {owner[0]} (epoch {owner[1]}) as the owner of {self.name!r}: "
                    "this host must not run it")
        return await self.reclaim(destination_said_unrun=False)

    async def reclaim(self, *, destination_said_unrun: bool = True) -> str | None:
        """Before resuming the VM here: make etcd name this host, a new epoch.
        Returns None when it does, else why the VM must stay paused here.

        A key naming the destination is taken back only while it says
        ``committed`` (the guest never ran there), unless the destination
        itself said it never resumed the VM (``destination_said_unrun``: its
        commit may have gone through though it gave up). The state is judged
        on the very read the transaction compares, so a key that changes
        meanwhile fails the reclaim."""
        m, key = self.member, keys.vm_key(self.name)
        try:
            kv = await m.client.get(key)
            owner, epoch = ("", 0) if kv is None else keys.parse_owner(kv.value, what=key)
            if kv is not None and owner not in (m.addr, self.destination):
                return (f"etcd names {owner} (epoch {epoch}) as the owner of {self.name!r}: "
                        "this host must not run it; its copy here stays paused")
            if kv is not None and owner == self.destination and not destination_said_unrun \
                    and keys.owner_state(kv.value, what=key)[0] != keys.COMMITTED:
                return (f"etcd records that {owner} resumed {self.name!r} (epoch {epoch}): "
                        "this host must not run it; its copy here stays paused")
            compare = [cmp_mod_revision(key, kv.mod_revision) if kv is not None else
                       cmp_absent(key)]
            compare.append(_cmp_lease(keys.host_key(m.addr), m.lease_id))
            ok, _ = await m.client.txn(compare, [op_put(key, keys.owner_record(m.addr,
                                                                                epoch + 1))])
        except (EtcdError, ValueError) as exc:
            return f"etcd could not confirm this host owns {self.name!r}: {exc}"
        return None if ok else (f"etcd refused to hand {self.name!r} back to this host (its "
                                "owner changed meanwhile, or this host's lease is gone)")


def _version() -> str:
    import sys

    return getattr(sys.modules.get("livemig"), "__version__", "unknown")


__all__ = ["FleetMember", "SourceArbiter", "DEFAULT_TTL_S", "LivemigError"]

"""Planning moves over a fleet: drain a host, or even out load. Pure: no I/O.

Theory of operation
-------------------
Input is the fleet as data (``HostState``, ``VMState``) and the link; output
is a ``Plan``: one ``Move`` per VM (source, destination, mode, predicted
time, bytes and downtime) plus a schedule. The same code plans a real drain
(``livemig fleet drain``) and a generated fleet of thousands of hosts
(``livemig fleet simulate``).

* **Destination**: first-fit decreasing by memory. VMs are placed largest
  first on the host with the most headroom, headroom being the smaller of its
  free-memory and free-vCPU fractions; a host must fit the VM's memory and
  not be draining, lost, or the source. Hosts sit in a heap keyed by
  headroom, so a placement costs O(log hosts).
* **Mode**: from the VM's dirty rate and the bandwidth it will get, with the
  predictor ``livemig plan`` uses (policy.py): pre-copy when it converges
  within the downtime limit, else what the predictor recommends (hybrid
  while the dirty set shrinks, post-copy when the dirty rate reaches the
  bandwidth), each priced by its own model.
* **Schedule**: list scheduling in plan order. A move starts as soon as both
  its source and its destination run fewer than ``per_host_limit``
  migrations; it gets the link's bandwidth divided by the busier end's
  concurrent migrations at its start (a host's NIC is shared) and keeps that
  share to its end. The plan reports the total time, the peak number of
  concurrent migrations, bytes moved and the sum of the moves run alone.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field

from ..policy import Prediction, predict, predict_hybrid, predict_postcopy


@dataclass
class HostState:
    addr: str
    memory_total_bytes: int
    memory_free_bytes: int
    cpus: int
    vcpus_used: int = 0
    draining: bool = False
    live: bool = True

    def headroom(self) -> float:
        mem = self.memory_free_bytes / self.memory_total_bytes if self.memory_total_bytes else 0
        cpu = (self.cpus - self.vcpus_used) / self.cpus if self.cpus else 0
        return min(mem, cpu)

    def fits(self, vm: "VMState") -> bool:
        return self.memory_free_bytes >= vm.memory_bytes

    def load(self) -> float:
        mem = 1 - self.memory_free_bytes / self.memory_total_bytes if self.memory_total_bytes else 1
        cpu = self.vcpus_used / self.cpus if self.cpus else 1
        return max(mem, cpu)


@dataclass
class VMState:
    name: str
    host: str
    memory_bytes: int
    vcpus: int = 1
    dirty_rate_bps: float = 0.0


@dataclass
class Move:
    vm: str
    source: str
    destination: str
    memory_bytes: int
    dirty_rate_bps: float
    mode: str
    predicted_time_s: float          # alone on the link
    predicted_bytes: int
    predicted_downtime_ms: float
    start_s: float = 0.0
    end_s: float = 0.0


@dataclass
class Plan:
    moves: list[Move]
    unplaced: dict[str, str] = field(default_factory=dict)   # VM -> why it stays
    total_time_s: float = 0.0
    peak_concurrent: int = 0
    bytes_moved: int = 0
    sum_single_s: float = 0.0

    def to_dict(self) -> dict:
        return {"moves": [asdict(m) for m in self.moves], "unplaced": self.unplaced,
                "total_time_s": self.total_time_s, "peak_concurrent": self.peak_concurrent,
                "bytes_moved": self.bytes_moved, "sum_single_s": self.sum_single_s}


def choose_mode(memory_bytes: int, dirty_rate_bps: float, bandwidth_bps: float,
                max_downtime_ms: float) -> Prediction:
    """The predictor's verdict for one VM on this link."""
    p = predict(bandwidth_bps, dirty_rate_bps, memory_bytes, max_downtime_ms)
    if p.converges:
        return p
    if p.recommended_mode == "hybrid":
        return predict_hybrid(bandwidth_bps, dirty_rate_bps, memory_bytes, max_downtime_ms)
    return predict_postcopy(bandwidth_bps, memory_bytes)


class _Placer:
    """Hosts by headroom in a heap (lazy: stale entries are skipped)."""

    def __init__(self, hosts: list[HostState]):
        self.hosts = {h.addr: h for h in hosts}
        self._version = {h.addr: 0 for h in hosts}
        self._heap = [(-h.headroom(), h.addr, 0) for h in hosts if h.live and not h.draining]
        heapq.heapify(self._heap)

    def place(self, vm: VMState, *, exclude: str) -> HostState | None:
        skipped, found = [], None
        while self._heap:
            neg, addr, version = heapq.heappop(self._heap)
            if version != self._version[addr]:
                continue
            h = self.hosts[addr]
            if addr != exclude and h.fits(vm):
                found = h
                break
            skipped.append((neg, addr, version))
        for item in skipped:
            heapq.heappush(self._heap, item)
        if found is None:
            return None
        self.take(found, vm)
        return found

    def take(self, h: HostState, vm: VMState) -> None:
        h.memory_free_bytes -= vm.memory_bytes
        h.vcpus_used += vm.vcpus
        self._bump(h)

    def give(self, h: HostState, vm: VMState) -> None:
        h.memory_free_bytes += vm.memory_bytes
        h.vcpus_used -= vm.vcpus
        self._bump(h)

    def _bump(self, h: HostState) -> None:
        self._version[h.addr] += 1
        if h.live and not h.draining:
            heapq.heappush(self._heap, (-h.headroom(), h.addr, self._version[h.addr]))


def rank_hosts(hosts: list[HostState], vm: VMState) -> list[HostState]:
    """Where a new VM may go, best first: live, undrained hosts that fit it,
    most headroom first (the order the drain's placer takes them in)."""
    return sorted((h for h in hosts if h.live and not h.draining and h.fits(vm)),
                  key=lambda h: (-h.headroom(), h.addr))


def _move(vm: VMState, dest: str, link_bps: float, max_downtime_ms: float) -> Move:
    p = choose_mode(vm.memory_bytes, vm.dirty_rate_bps, link_bps, max_downtime_ms)
    return Move(vm.name, vm.host, dest, vm.memory_bytes, vm.dirty_rate_bps,
                p.recommended_mode if not p.converges else "precopy", p.total_time_s,
                int(p.total_bytes), p.expected_downtime_ms)


def plan_drain(hosts: list[HostState], vms: list[VMState], drained: set[str] | str, *,
               link_bps: float, max_downtime_ms: float = 300.0,
               per_host_limit: int = 2) -> Plan:
    """Move every VM off the ``drained`` host(s)."""
    drained = {drained} if isinstance(drained, str) else set(drained)
    for h in hosts:
        if h.addr in drained:
            h.draining = True
    placer = _Placer(hosts)
    moves, unplaced = [], {}
    leaving = sorted((v for v in vms if v.host in drained),
                     key=lambda v: (-v.memory_bytes, v.name))
    for vm in leaving:
        dest = placer.place(vm, exclude=vm.host)
        if dest is None:
            unplaced[vm.name] = (f"no live, undrained host has {vm.memory_bytes} bytes of "
                                 "memory free")
            continue
        moves.append(_move(vm, dest.addr, link_bps, max_downtime_ms))
    plan = Plan(moves, unplaced)
    schedule(plan, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
             per_host_limit=per_host_limit)
    return plan


def plan_balance(hosts: list[HostState], vms: list[VMState], *, link_bps: float,
                 max_downtime_ms: float = 300.0, per_host_limit: int = 2,
                 tolerance: float = 0.10, max_moves: int | None = None,
                 recently_moved: set[str] = frozenset()) -> Plan:
    """Move VMs from hosts loaded above the fleet's mean by more than
    ``tolerance`` to the most headroom, cheapest first (low dirty rate, small
    memory), never a VM in ``recently_moved`` and never one twice."""
    live = [h for h in hosts if h.live and not h.draining]
    if not live:
        return Plan([])
    mean = sum(h.load() for h in live) / len(live)
    placer = _Placer(hosts)
    by_host: dict[str, list[VMState]] = {}
    for v in vms:
        by_host.setdefault(v.host, []).append(v)
    moves = []
    for h in sorted(live, key=lambda h: -h.load()):
        if h.load() <= mean + tolerance:
            break
        cheap_first = sorted((v for v in by_host.get(h.addr, ()) if v.name not in recently_moved),
                             key=lambda v: (v.dirty_rate_bps * v.memory_bytes, v.memory_bytes))
        for vm in cheap_first:
            if h.load() <= mean + tolerance or (max_moves is not None and len(moves) >= max_moves):
                break
            placer.give(h, vm)
            dest = placer.place(vm, exclude=h.addr)
            if dest is None or dest.load() > mean + tolerance:
                if dest is not None:
                    placer.give(dest, vm)
                placer.take(h, vm)
                break
            moves.append(_move(vm, dest.addr, link_bps, max_downtime_ms))
    plan = Plan(moves)
    schedule(plan, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
             per_host_limit=per_host_limit)
    return plan


def schedule(plan: Plan, *, link_bps: float, max_downtime_ms: float,
             per_host_limit: int) -> None:
    """Fill in each move's start and end, the total time and the peak."""
    if per_host_limit < 1:
        raise ValueError("per_host_limit must be ≥ 1")
    active: dict[str, int] = {}
    ending: list[tuple[float, int]] = []     # (end time, move index)
    pending = list(range(len(plan.moves)))
    now, peak, running = 0.0, 0, 0
    while pending or ending:
        still = []
        for i in pending:
            m = plan.moves[i]
            a, b = active.get(m.source, 0), active.get(m.destination, 0)
            if a >= per_host_limit or b >= per_host_limit:
                still.append(i)
                continue
            share = link_bps / (max(a, b) + 1)
            p = choose_mode(m.memory_bytes, m.dirty_rate_bps, share, max_downtime_ms)
            duration = p.total_time_s if math.isfinite(p.total_time_s) else m.predicted_time_s
            m.start_s, m.end_s = now, now + duration
            active[m.source] = a + 1
            active[m.destination] = b + 1
            heapq.heappush(ending, (m.end_s, i))
            running += 1
        pending = still
        peak = max(peak, running)
        if not ending:
            break
        now, i = heapq.heappop(ending)
        m = plan.moves[i]
        active[m.source] -= 1
        active[m.destination] -= 1
        running -= 1
    plan.total_time_s = max((m.end_s for m in plan.moves), default=0.0)
    plan.peak_concurrent = peak
    plan.bytes_moved = sum(m.predicted_bytes for m in plan.moves)
    plan.sum_single_s = sum(m.predicted_time_s for m in plan.moves)


__all__ = ["HostState", "VMState", "Move", "Plan", "choose_mode", "plan_drain",
           "plan_balance", "rank_hosts", "schedule"]

"""What one pass of the balance controller decides. Pure: no I/O, time passed in.

A pass (fleet/controller.py) reads etcd and hands this module the fleet as
planner data plus three facts, and gets back a ``Decision``:

* ``pending``: hosts that still hold a balance request (``/livemig/moves/<host>``,
  the controller's last one or an operator's ``fleet balance``): **wait**. A
  plan over a fleet whose moves are under way would count VMs twice.
* ``stale``: live hosts whose record etcd wrote before the last moves were
  seen to finish: **wait**, so the next plan sees where the VMs went.
* ``held``: VMs a balance moved within its window (``/livemig/moved/<name>``
  records whose ``until`` has not passed): never moved, listed when they sit on
  a host the plan would unload.

Otherwise ``planner.plan_balance`` decides: **move** (cheapest first) or
**balanced** (every host within ``tolerance`` of the mean load, or nothing
movable). ``settle`` folds the hosts' reports into the controller's log of
moves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .planner import HostState, Plan, VMState, plan_balance

TOLERANCE = 0.10          # planner.plan_balance's: above the mean by more than this
MAX_LOGGED_MOVES = 50     # moves kept in the controller's state record
REQUESTED = "requested"   # a move written to its source host, not reported yet


@dataclass
class Decision:
    action: str                       # "move", "wait" or "balanced"
    reason: str
    plan: Plan = field(default_factory=lambda: Plan([]))
    held: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The decision as log lines, one per move."""
        out = [f"balance pass: {self.action}: {self.reason}"]
        out += [f"balance pass: move {m.vm} {m.source} -> {m.destination} ({m.mode}, "
                f"{m.memory_bytes >> 20} MiB, dirty {m.dirty_rate_bps / (1 << 20):.1f} MiB/s, "
                f"predicted {m.predicted_time_s:.1f} s)" for m in self.plan.moves]
        if self.held:
            out.append(f"balance pass: held by the window: {', '.join(self.held)}")
        return out

    def to_dict(self) -> dict:
        return {"action": self.action, "reason": self.reason, "held": self.held,
                "moves": [{"vm": m.vm, "from": m.source, "to": m.destination, "mode": m.mode,
                           "predicted_time_s": m.predicted_time_s} for m in self.plan.moves]}


def held_by_window(records: dict[str, dict], now: float) -> set[str]:
    """VMs a balance moved whose window has not passed. A record without
    ``until`` (a one-shot ``fleet balance``'s) holds for as long as its key
    lives under its lease."""
    return {name for name, rec in records.items()
            if not isinstance(rec.get("until"), (int, float)) or rec["until"] > now}


def stale_hosts(record_revisions: dict[str, int], settled_revision: int) -> list[str]:
    """Hosts whose record is no newer than the moment moves were seen done."""
    return sorted(addr for addr, rev in record_revisions.items() if rev <= settled_revision)


def decide(hosts: list[HostState], vms: list[VMState], *, held: set[str],
           pending: set[str], stale: list[str], link_bps: float, max_downtime_ms: float,
           per_host_limit: int, tolerance: float = TOLERANCE) -> Decision:
    if pending:
        return Decision("wait", "balance moves still run at " + ", ".join(sorted(pending)))
    if stale:
        return Decision("wait", "waiting for fresh records of " + ", ".join(stale))
    live = [h for h in hosts if h.live and not h.draining]
    if len(live) < 2:
        return Decision("balanced", f"{len(live)} live, undrained host(s): nowhere to move")
    mean = sum(h.load() for h in live) / len(live)
    above = {h.addr for h in live if h.load() > mean + tolerance}
    held_here = sorted(v.name for v in vms if v.host in above and v.name in held)
    plan = plan_balance(hosts, vms, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
                        per_host_limit=per_host_limit, tolerance=tolerance,
                        recently_moved=held)
    if plan.moves:
        return Decision("move", f"{len(plan.moves)} move(s) off {', '.join(sorted(above))} "
                        f"(mean load {mean:.2f})", plan, held_here)
    why = (f"every host within {tolerance:.0%} of the mean load {mean:.2f}" if not above else
           f"{', '.join(sorted(above))} above the mean load {mean:.2f}, but nothing there "
           "may move (held by the window, or no host has room)")
    return Decision("balanced", why, plan, held_here)


def moved_record(move, *, now: float, window_s: float, term: int) -> dict:
    """``/livemig/moved/<name>``: when, where, by which term, held until when."""
    return {"from": move.source, "to": move.destination, "at": now, "until": now + window_s,
            "term": term}


def log_entries(decision: Decision, *, now: float, term: int) -> list[dict]:
    return [{"vm": m.vm, "from": m.source, "to": m.destination, "mode": m.mode, "at": now,
             "term": term, "status": REQUESTED} for m in decision.plan.moves]


def settle(entries: list[dict], reports: dict[str, dict]) -> list[dict]:
    """Entries still ``requested`` whose source reported its moves done
    (``reports``: host → its ``/livemig/moves/<host>/status``) take the
    VM's outcome from it; a done report without the VM says ``unknown``."""
    out = []
    for e in entries:
        report = reports.get(e["from"])
        if e["status"] == REQUESTED and report is not None and report.get("state") == "done":
            row = (report.get("vms") or {}).get(e["vm"])
            e = {**e, "status": row.get("status", "unknown") if row else "unknown"}
            for k in ("mode", "error"):
                if row and row.get(k):
                    e[k] = row[k]
        out.append(e)
    return out[-MAX_LOGGED_MOVES:]


__all__ = ["Decision", "decide", "held_by_window", "stale_hosts", "moved_record",
           "log_entries", "settle", "REQUESTED", "TOLERANCE"]

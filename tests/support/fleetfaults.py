"""Shared by the fleet fault tests (tests/integration/test_fleet_faults*.py):
two fleet daemons, the destination behind a FrameProxy, a warm VM migrated
between them, and the invariant checked once both live (``assert_settled``).
"""
from __future__ import annotations

import signal

from support.daemons import assert_daemon_vm_matches_unmoved, start_vm, wait_hosted
from support.fleet import FleetHost, vm_row
from support.frameproxy import HOLD, Fault
from support.kills import DIRECTION, MODES
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for

TTL_S = 2           # (as support.fleet's) a lease renewed every 0.67 s: doubts are settled at that pace
WINDOW_S = 2        # how long a source asks the destination after a break past Commit
NAME = "vm1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=61, dirty_rate="8MiB/s")
WARM_STEPS = 5_000
SRC, DST, NOWHERE = "source", "destination", None
STALE = "stale"     # a copy kept paused and marked lost (the guest resumed elsewhere, then died)
# A post-copy destination whose source is gone stops waiting for it after this.
DAEMON_FLAGS = ("--postcopy-recovery-timeout", str(WINDOW_S))
WAYS = {**DIRECTION, "PageRequest": "down"}   # where each handover frame travels
EITHER = "either"      # the destination runs it, or it is lost: whether pages were still owed



def listed_copy(host: FleetHost) -> dict | None:
    return next((v for v in host.proc.client.call("vm.list") if v["name"] == NAME), None)


def start_warm(src: FleetHost, etcd) -> int:
    """Start the VM at the source; returns its epoch in etcd (the name may
    have been held by an earlier test's host: then it is taken over)."""
    start_vm(src.proc, NAME, RECIPE)
    row = wait_for("etcd to name the source", lambda: (r := vm_row(etcd, NAME)) is not None
                   and r["owner"] == src.addr and r)
    wait_for("the guest to write its pages",
             lambda: min(wait_hosted(src.proc, NAME)["steps"]) >= WARM_STEPS)
    return row["epoch"]


def migrate(src: FleetHost, dst: FleetHost, mode: str = "precopy") -> int:
    return src.proc.client.call("migrate", name=NAME, to=dst.addr, ack_timeout_s=WINDOW_S,
                                handshake_timeout_s=5, postcopy_recovery_timeout_s=WINDOW_S,
                                **MODES[mode])["id"]


def ended(src: FleetHost, mig: int) -> dict:
    return src.proc.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)


def incoming(dst: FleetHost, name: str = NAME) -> dict | None:
    """The destination's latest record of an arrival of VM ``name``."""
    recs = [m for m in dst.proc.client.call("status")["migrations"]
            if m["direction"] == "incoming" and m["vm"] == name]
    return recs[-1] if recs else None


def arrival_ended(dst: FleetHost) -> dict:
    return wait_for("the destination's record of the migration to end",
                    lambda: (r := incoming(dst)) is not None
                    and r["status"] in ("completed", "failed") and r)


def calm(hosts) -> dict | None:
    """Each host's copy of the VM (or None), once none is paused, in doubt or
    leaving; None while one is. (An arrival broken before Commit may wait out
    its idle timeout for a source that resumed the VM and will not come back:
    its copy is never listed, and can never run without Commit.)"""
    copies = {}
    for h in hosts:
        copy = listed_copy(h)
        if copy is not None and copy["state"] == "lost":
            copy = STALE           # decided: a stale copy, kept paused for the operator
        elif copy is not None and (not copy["running"] or copy["unresolved"]):
            return None
        if any(m["direction"] == "outgoing"
               and m["status"] in ("setup", "active", "postcopy-active", "in-doubt")
               for m in h.proc.client.call("status")["migrations"]):
            return None
        copies[h] = copy
    return copies


def assert_settled(etcd, hosts: dict[str, FleetHost], runs: str | None, *,
                   stale_at_source: bool = False) -> None:
    """The invariant, once both daemons live: the VM runs at ``runs`` (a key
    of ``hosts``; None: nowhere — it died with the daemon that held it, and
    etcd says it is lost) and nowhere else, no copy is in doubt, etcd names
    its host, and it is identical to a twin that never moved. With
    ``stale_at_source``, the source keeps a paused copy marked lost: the
    guest had resumed at the destination, which died with it."""
    copies = wait_for("every copy of the VM to be settled", lambda: calm(hosts.values()))
    running = sorted(side for side, h in hosts.items() if copies[h] not in (None, STALE))
    assert running == ([runs] if runs else []), (running, copies)
    stale = sorted(side for side, h in hosts.items() if copies[h] is STALE)
    assert stale == ([SRC] if stale_at_source else []), (stale, copies)
    if runs is None:
        # It died with a daemon: etcd says lost (its restarted daemon, or
        # the source told by it, marked the key), and no host runs it.
        row = wait_for("etcd to say the VM is lost",
                       lambda: (r := vm_row(etcd, NAME)) is not None and r["state"] == "lost"
                       and r)
        assert not row["running_there"], row
    if runs is not None:
        row = vm_row(etcd, NAME)
        assert row["owner"] == hosts[runs].addr, (row, hosts[runs].addr)
        assert_daemon_vm_matches_unmoved(hosts[runs].proc, NAME, RECIPE)


def pair(tmp_path, etcd, fault: Fault | None, *, src_link=None, dst_link=None, dst_extra=(),
         dst_env=None):
    src = FleetHost(tmp_path, "src", etcd, ttl_s=TTL_S, etcd_link=src_link, extra=DAEMON_FLAGS)
    try:
        dst = FleetHost(tmp_path, "dst", etcd, ttl_s=TTL_S, fault=fault, etcd_link=dst_link,
                        extra=(*DAEMON_FLAGS, *dst_extra), env=dst_env)
    except BaseException:
        src.close()
        raise
    return src, dst


# (mode, step, killed, the held frame delivered?, where the VM runs once both live)


def kill_while_held(hosts: dict[str, FleetHost], etcd, mode: str, step: str, killed: str,
                    forward: bool) -> int:
    """Migrate the warm VM from ``hosts[SRC]`` to ``hosts[DST]`` (whose proxy
    holds ``step``'s frame), SIGKILL the ``killed`` daemon once the frame is
    held, then deliver or drop it; returns the migration's id."""
    src, dst = hosts[SRC], hosts[DST]
    start_warm(src, etcd)
    mig = migrate(src, dst, mode)
    dst.link.wait_fired(f"{step} to reach the proxy")
    victim = hosts[killed].proc.proc
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    dst.link.release(forward)
    return mig


def killed_at_step(tmp_path, etcd, mode: str, step: str, killed: str, forward: bool,
                   runs: str | None, stale: bool) -> None:
    """Hold ``step``'s frame at the proxy, SIGKILL the ``killed`` daemon,
    deliver or drop the frame, restart the daemon, and check where the VM
    runs (``runs``; EITHER: at the destination if its arrival completed,
    else nowhere) and whether the source keeps a stale copy."""
    src, dst = pair(tmp_path, etcd, Fault(HOLD, step, WAYS[step]))
    hosts = {SRC: src, DST: dst}
    try:
        mig = kill_while_held(hosts, etcd, mode, step, killed, forward)
        if killed == DST:
            if ended(src, mig)["status"] == "completed" and stale:
                # The frame held was on another connection than the
                # post-copy's end: the push placed every page (the one a held
                # PageRequest asked for too) and PostcopyComplete / Complete
                # went through before the kill. The VM was whole there and the
                # source released its copy: it died with the destination.
                stale = False
        elif arrival_ended(dst)["status"] == "completed" and runs == EITHER:
            runs = DST
        if runs == EITHER:
            runs = NOWHERE
        hosts[killed].restart()
        assert_settled(etcd, hosts, runs, stale_at_source=stale)
    finally:
        src.close()
        dst.close()


def cut_at_step(tmp_path, etcd, mode: str, step: str, runs: str | None) -> None:
    """Cut the migration link as ``step``'s frame passes; check where the VM runs."""
    src, dst = pair(tmp_path, etcd, Fault("cut", step, WAYS[step]))
    try:
        start_warm(src, etcd)
        ended(src, migrate(src, dst, mode))
        assert_settled(etcd, {SRC: src, DST: dst}, runs)
    finally:
        src.close()
        dst.close()

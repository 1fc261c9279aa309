"""Faults in a fleet during post-copy and hybrid handovers, and VMs that
die with their daemon.

As tests/integration/test_fleet_faults.py (two fleet daemons, the
destination's migration port behind a FrameProxy, a warm 16 MiB VM), with
the handover steps of post-copy: Switchover ─▶ ◀ Verified ─ Commit ─▶
◀ Resumed, then the page pull (``PageRequest``: the destination, resumed,
asks for a page it lacks), ◀ PostcopyComplete ─ Complete ─▶.

What the design promises (docs/fleet.md, "Faults"):

* before the destination resumed the guest, exactly one copy runs once both
  daemons live, identical to a twin that never moved;
* once it resumed, a *source* killed takes the pages the destination still
  lacks with it: the destination stops the VM when its recovery timeout
  passes, and etcd says the VM is **lost** (unless every page had landed
  already: then the destination runs it). Nothing runs it twice, nothing is
  in doubt;
* once it resumed, a *destination* killed takes the VM with it: the source
  never resumes its copy (a rollback of the guest): it keeps it paused,
  marked lost, and etcd says lost.

Each (step, side, fault) runs here in one mode, the modes alternating;
test_fleet_faults_postcopy_modes.py runs each in the other mode (the two
files run on two test workers).
"""
from __future__ import annotations

import signal

import pytest

from livemig import failpoints
from livemig.native import postcopy
from support.daemons import assert_daemon_vm_matches_unmoved, start_vm
from support.etcd import ETCD, ETCD_MISSING
from support.fleet import FleetHost, vm_row
from support.fleetfaults import (DST, EITHER, NAME, NOWHERE, RECIPE, SRC, TTL_S,
                                 assert_settled, cut_at_step, ended, killed_at_step, listed_copy,
                                 migrate, pair, start_warm)
from support.frameproxy import HOLD, Fault
from support.waiting import wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
needs_uffd = pytest.mark.skipif(not postcopy.probe().missing, reason=f"userfaultfd MISSING "
                                f"unavailable: {postcopy.probe().reason}")


# (mode, step, killed, the held frame delivered?, where the VM runs, a stale copy at the source)
KILLS = [
    ("hybrid", "Switchover", SRC, False, NOWHERE, False),   # died with its only host
    ("postcopy", "Switchover", DST, False, SRC, False),
    ("postcopy", "Verified", SRC, False, NOWHERE, False),
    ("hybrid", "Verified", DST, False, SRC, False),
    ("hybrid", "Commit", SRC, False, NOWHERE, False),       # Commit never left
    ("postcopy", "Commit", SRC, True, NOWHERE, False),      # resumed there, pages owed: lost
    ("postcopy", "Commit", DST, False, SRC, False),         # etcd names the source: it reclaims
    ("postcopy", "Resumed", SRC, True, NOWHERE, False),
    ("hybrid", "Resumed", DST, False, NOWHERE, True),       # it ran there: the source's copy is
                                                            # stale, kept paused, marked lost
    ("postcopy", "PageRequest", SRC, False, EITHER, False),  # during the page pull
    ("postcopy", "PageRequest", DST, False, NOWHERE, True),
    ("hybrid", "PostcopyComplete", SRC, True, DST, False),   # every page had landed there
    ("postcopy", "PostcopyComplete", DST, False, NOWHERE, True),
    ("hybrid", "Complete", SRC, False, DST, False),
    ("postcopy", "Complete", DST, True, NOWHERE, False),    # the source had let go
]


def _ids(rows):
    return [f"{m}-kill-{k}-at-{s}-{'delivered' if f else 'dropped'}" for m, s, k, f, *_ in rows]


@needs_uffd
@pytest.mark.parametrize("mode,step,killed,forward,runs,stale", KILLS, ids=_ids(KILLS))
def test_a_daemon_killed_at_a_postcopy_handover_step(tmp_path, etcd, mode, step, killed,
                                                     forward, runs, stale):
    killed_at_step(tmp_path, etcd, mode, step, killed, forward, runs, stale)


# (mode, step, where the VM runs once the cut is behind)
CUTS = [("hybrid", "Switchover", SRC), ("postcopy", "Verified", SRC),
        ("hybrid", "Commit", SRC), ("postcopy", "Resumed", DST),
        ("postcopy", "PageRequest", DST), ("hybrid", "PostcopyComplete", DST)]


@needs_uffd
@pytest.mark.parametrize("mode,step,runs", CUTS, ids=[f"{m}-cut-at-{s}" for m, s, _ in CUTS])
def test_the_link_cut_at_a_postcopy_handover_step(tmp_path, etcd, mode, step, runs):
    cut_at_step(tmp_path, etcd, mode, step, runs)


def test_a_destination_killed_between_its_commit_and_its_resume(tmp_path, etcd):
    """The destination dies (a failpoint: SIGKILL) right after its commit
    transaction went through, before it resumed the guest: etcd names it
    (``owned``), so the source, unable to ask it, keeps its copy paused, in
    doubt. Restarted, the destination's session journal proves the guest
    never ran there (no ``resuming`` line, the same kernel): it says so in
    etcd (``committed``) and to the source, which takes the key back (a new
    epoch) and resumes — the VM runs at the source, identical."""
    src, dst = pair(tmp_path, etcd, None,
                    dst_env={failpoints.ENV_VAR: failpoints.AFTER_COMMIT})
    try:
        epoch = start_warm(src, etcd)
        rec = ended(src, migrate(src, dst))
        assert dst.proc.proc.wait() == -signal.SIGKILL
        assert rec["status"] == "in-doubt" and dst.addr in rec["error"], rec
        row = vm_row(etcd, NAME)
        assert (row["owner"], row["epoch"]) == (dst.addr, epoch + 1), row
        here = listed_copy(src)
        assert not here["running"] and here["unresolved"], here
        dst.restart()
        # (Its lease may have expired first: then the source found the VM
        # lost with its host, until the restarted host handed the key back.)
        wait_for("the source to take the VM back", lambda: listed_copy(src)["running"])
        assert_settled(etcd, {SRC: src, DST: dst}, SRC)
        assert vm_row(etcd, NAME)["epoch"] == epoch + 2
    finally:
        src.close()
        dst.close()


def test_a_stale_copy_is_resumed_only_as_the_operators_rollback(tmp_path, etcd):
    """The destination resumed the guest and died with it: the source's
    paused copy is marked lost and the fleet never resumes it; `vm resolve
    --resume` does, once etcd says lost, as a rollback it warns about (the
    guest goes on from the handover, identical to a twin that never moved)."""
    src, dst = pair(tmp_path, etcd, Fault(HOLD, "Resumed", "down"))
    try:
        epoch = start_warm(src, etcd)
        mig = migrate(src, dst)
        dst.link.wait_fired("Resumed to reach the proxy")
        dst.proc.proc.send_signal(signal.SIGKILL)
        dst.proc.proc.wait()
        dst.link.release(False)
        assert ended(src, mig)["status"] == "in-doubt"
        dst.restart()
        assert_settled(etcd, {SRC: src, DST: dst}, NOWHERE, stale_at_source=True)
        refused = src.proc.cli("vm", "resume", NAME, check=None)
        assert refused.returncode != 0
        done = src.proc.cli_json("vm", "resolve", NAME, "--resume")
        assert done["resolved"] == "resumed" and "rollback" in done["reason"], done
        assert "WARNING" in done["warning"], done
        row = wait_for("etcd to show the VM running at the source",
                       lambda: (r := vm_row(etcd, NAME))["state"] == "running" and r)
        assert (row["owner"], row["epoch"]) == (src.addr, epoch + 2)
        assert_settled(etcd, {SRC: src, DST: dst}, SRC)
    finally:
        src.close()
        dst.close()


def test_vms_of_a_killed_daemon_are_lost_with_it(tmp_path, etcd):
    """A daemon killed with a VM: `fleet vms` shows the VM lost with its
    host once the lease expires; restarted, the daemon marks it lost in etcd
    (it runs nowhere), nothing counts on it, and the name may be used again."""
    host = FleetHost(tmp_path, "solo", etcd, ttl_s=TTL_S)
    try:
        start_vm(host.proc, "orphan1", RECIPE)
        wait_for("etcd to name the host", lambda: (r := vm_row(etcd, "orphan1")) is not None
                 and r["state"] == "running")
        host.proc.proc.send_signal(signal.SIGKILL)
        host.proc.proc.wait()
        row = wait_for("the VM shown lost with its host",
                       lambda: (r := vm_row(etcd, "orphan1"))["state"] == "lost-with-host" and r)
        assert row["owner"] == host.addr and not row["running_there"]
        host.restart()
        row = wait_for("the restarted daemon to mark it lost",
                       lambda: (r := vm_row(etcd, "orphan1"))["state"] == "lost" and r)
        assert (row["state"], row["owner_state"]) == ("lost", "live"), row
        assert "died with the daemon" in row["why"], row
        text = host.proc.cli("vm", "list").stdout
        assert "orphan1" not in text
        start_vm(host.proc, "orphan1", RECIPE)     # the name is free again: a new VM
        row = wait_for("etcd to name the new VM", lambda: (r := vm_row(etcd, "orphan1"))
                       ["state"] == "running" and r)
        assert row["epoch"] == 2
        assert_daemon_vm_matches_unmoved(host.proc, "orphan1", RECIPE)
    finally:
        host.close()

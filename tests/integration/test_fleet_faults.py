"""Faults in a fleet: whatever breaks during a handover, etcd settles it.

Two fleet daemons on loopback and their own etcd; the destination's
migration port sits behind a FrameProxy (it advertises the proxy, so etcd
and the source name it by the address that fails). A VM migrates (pre-copy,
and post-copy in two cases) while one of these happens at a handover step
(docs/protocol.md: Switchover ─▶ ◀ Verified ─ Commit ─▶ ◀ Resumed):

* the source or the destination daemon is killed (SIGKILL) with the step's
  frame held, which is then delivered or dropped; the killed daemon is then
  started again with its state dir;
* the migration link is cut (every connection reset) at the step;
* the destination, or the source, is partitioned from etcd (a proxy in
  front of etcd refuses it) at Commit, and healed later;
* the etcd leader (of three members) is killed with Commit held.

Then, once both daemons live, the invariant: no VM runs in two places
(at most one copy runs, and no paused copy is left anywhere), none is lost
while its current host lives (the copy runs where the design says), none is
left in doubt (no copy unresolved, no migration in doubt) — settled by the
daemons on their own, from etcd, without `vm resolve` —, etcd names the host
that runs it, and the VM is identical to a twin that never moved.
"""
from __future__ import annotations


import pytest

from livemig.native import postcopy
from support.daemons import wait_hosted
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import EtcdLink, leader, vm_row
from support.fleetfaults import (DST, NAME, NOWHERE, SRC, WINDOW_S, arrival_ended, assert_settled,
                                 ended, incoming, kill_while_held, listed_copy, migrate, pair,
                                 start_warm)
from support.frameproxy import HOLD, Fault
from support.kills import DIRECTION
from support.waiting import wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)


KILLS = [
    ("precopy", "Switchover", DST, False, SRC),    # nothing handed over: the source resumes
    ("precopy", "Verified", SRC, False, NOWHERE),  # no Commit: the destination discards its copy
    ("precopy", "Commit", SRC, True, DST),         # Commit left the source: the destination
                                                   # commits and runs it
    ("precopy", "Commit", SRC, False, NOWHERE),    # it never did: the destination discards
    ("precopy", "Resumed", SRC, True, DST),
    ("precopy", "Verified", DST, False, SRC),      # before Commit: the source resumes at once
    ("precopy", "Commit", DST, False, SRC),        # after Commit, no one to ask: etcd still
                                                   # names the source, which takes it back
    ("precopy", "Resumed", DST, False, NOWHERE),   # the destination resumed it, then died: the
                                                   # VM was lost with it; the source's copy is
                                                   # stale (a rollback) and stays paused, in
                                                   # doubt while the destination's lease lives
    ("precopy", "Resumed", DST, True, NOWHERE),    # the source had let go: it died there
    ("precopy", "Complete", SRC, False, DST),      # the destination runs it, and says so
    ("postcopy", "Resumed", SRC, True, NOWHERE),   # pages only the source held are gone: the
                                                   # destination stops the VM, which etcd
                                                   # names its own, and no copy runs
    ("postcopy", "Resumed", DST, False, NOWHERE),  # as in pre-copy
]


@pytest.mark.parametrize("mode,step,killed,forward,runs", KILLS,
                         ids=[f"{m}-kill-{k}-at-{s}-{'delivered' if f else 'dropped'}"
                              for m, s, k, f, _ in KILLS])
def test_a_daemon_killed_at_a_handover_step(tmp_path, etcd, mode, step, killed, forward, runs):
    if mode != "precopy" and not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
    src, dst = pair(tmp_path, etcd, Fault(HOLD, step, DIRECTION[step]))
    hosts = {SRC: src, DST: dst}
    try:
        mig = kill_while_held(hosts, etcd, mode, step, killed, forward)
        if killed == DST:
            rec = ended(src, mig)
            if runs is None and not forward:
                # etcd names the dead destination: the source may not run
                # its copy, however long it waits, while that host is down.
                assert rec["status"] == "in-doubt", rec
                here = wait_for("the source to learn the VM was lost with its host",
                                lambda: (c := listed_copy(src))["state"] == "lost" and c)
                assert not here["running"] and "lost with its host" in here["unresolved"]["lost"]
                row = vm_row(etcd, NAME)
                assert (row["owner"], row["state"]) == (dst.addr, "lost-with-host"), row
        else:
            arrival_ended(dst)
        hosts[killed].restart()
        assert_settled(etcd, hosts, runs, stale_at_source=killed == DST and runs is None
                       and not forward)
    finally:
        src.close()
        dst.close()


# (step, where the VM runs once the cut is behind)
CUTS = [("Switchover", SRC), ("Verified", SRC), ("Commit", SRC), ("Resumed", DST)]


@pytest.mark.parametrize("step,runs", CUTS, ids=[f"cut-at-{s}" for s, _ in CUTS])
def test_the_link_cut_at_a_handover_step(tmp_path, etcd, step, runs):
    src, dst = pair(tmp_path, etcd, Fault("cut", step, DIRECTION[step]))
    try:
        start_warm(src, etcd)
        ended(src, migrate(src, dst))
        assert_settled(etcd, {SRC: src, DST: dst}, runs)
    finally:
        src.close()
        dst.close()


def test_a_destination_cut_off_from_etcd_never_runs_the_vm(tmp_path, etcd):
    """The destination is partitioned from etcd as Commit reaches it: it
    cannot prove it owns the VM, so it never runs it; the source takes the
    VM back (a new epoch, which fences a late commit) and runs on. Healed,
    the destination rejoins and nothing changes."""
    link = EtcdLink(etcd)
    try:
        src, dst = pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), dst_link=link,
                         dst_extra=("--fleet-commit-timeout", "2"))
        try:
            epoch = start_warm(src, etcd)
            mig = migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(True)
            rec = ended(src, mig)
            assert rec["status"] == "failed", rec
            arrived = arrival_ended(dst)
            assert arrived["status"] == "failed" and "etcd" in arrived["error"], arrived
            assert listed_copy(dst) is None
            row = vm_row(etcd, NAME)
            assert (row["owner"], row["epoch"]) == (src.addr, epoch + 1)
            link.heal()
            wait_for("the destination to rejoin", lambda: dst.proc.client.call("ping")["fleet"]
                     ["state"] == "member")
            assert_settled(etcd, {SRC: src, DST: dst}, SRC)
        finally:
            src.close()
            dst.close()
    finally:
        link.close()


def test_a_commit_answered_after_the_source_reclaimed_is_refused(tmp_path, etcd):
    """The split brain the commit point must not allow. The destination is
    partitioned from etcd as Commit reaches it, and keeps trying its commit
    transaction (a long commit timeout; a lease that outlives the partition,
    so that only the epoch can fence it). The source gets no answer from it
    within its window, finds that etcd still names it, takes the VM back (a
    new epoch) and resumes it. Then the partition heals while the
    destination still tries: its transaction fails its compare, and etcd's
    answer shows the source as owner at the new epoch. It must refuse —
    not commit at that epoch — and never run the VM."""
    link = EtcdLink(etcd)
    try:
        src, dst = pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), dst_link=link,
                         dst_extra=("--fleet-commit-timeout", "30", "--fleet-ttl", "60"))
        try:
            epoch = start_warm(src, etcd)
            mig = src.proc.client.call("migrate", name=NAME, to=dst.addr, ack_timeout_s=WINDOW_S,
                                       handshake_timeout_s=1)["id"]
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(True)
            rec = ended(src, mig)
            assert rec["status"] == "failed" and "etcd now names this host" in rec["error"], rec
            assert wait_hosted(src.proc, NAME)["running"]
            row = vm_row(etcd, NAME)
            assert (row["owner"], row["epoch"]) == (src.addr, epoch + 1)
            assert incoming(dst)["status"] not in ("completed", "failed"), "still trying"
            link.heal()
            arrived = arrival_ended(dst)
            assert arrived["status"] == "failed" and "refused" in arrived["error"], arrived
            assert listed_copy(dst) is None
            row = vm_row(etcd, NAME)
            assert (row["owner"], row["epoch"]) == (src.addr, epoch + 1)
            assert_settled(etcd, {SRC: src, DST: dst}, SRC)
        finally:
            src.close()
            dst.close()
    finally:
        link.close()


def test_a_source_cut_off_from_etcd_keeps_the_vm_paused_until_it_can_reclaim(tmp_path, etcd):
    """The source is partitioned from etcd, then the link breaks at Commit
    (which never arrives): the destination discards its copy and says so,
    but the source cannot take the VM back in etcd, so it keeps it paused.
    Healed, it settles from etcd on its own: etcd names it, it reclaims and
    resumes the VM."""
    link = EtcdLink(etcd)
    try:
        src, dst = pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), src_link=link)
        try:
            epoch = start_warm(src, etcd)
            mig = migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(False)
            rec = ended(src, mig)
            assert rec["status"] == "in-doubt", rec
            here = listed_copy(src)
            assert not here["running"] and here["unresolved"], here
            assert listed_copy(dst) is None
            link.heal()
            assert_settled(etcd, {SRC: src, DST: dst}, SRC)
            assert vm_row(etcd, NAME)["epoch"] == epoch + 1
        finally:
            src.close()
            dst.close()
    finally:
        link.close()


def test_the_etcd_leader_killed_during_a_handover(tmp_path):
    """Three etcd members; the leader is killed (SIGKILL) with Commit held
    on its way: the destination's commit goes through the new leader and it
    runs the VM; the source learns so and lets go."""
    with etcd_cluster(tmp_path, members=3) as cluster:
        src, dst = pair(tmp_path, cluster, Fault(HOLD, "Commit", "up"))
        try:
            start_warm(src, cluster)
            mig = migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            cluster.members[wait_for("a leader", lambda: leader(cluster) + 1) - 1].kill()
            dst.link.release(True)
            assert ended(src, mig)["status"] == "completed"
            assert_settled(cluster, {SRC: src, DST: dst}, DST)
            assert vm_row(cluster, NAME)["epoch"] == 2
        finally:
            src.close()
            dst.close()

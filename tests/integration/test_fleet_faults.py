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

import signal
import time

import pytest

from livemig.native import postcopy
from support.daemons import assert_daemon_vm_matches_unmoved, start_vm, wait_hosted
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import EtcdLink, FleetHost, leader, vm_row
from support.frameproxy import HOLD, Fault
from support.kills import DIRECTION, MODES
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
TTL_S = 2           # (as support.fleet's) a lease renewed every 0.67 s: doubts are settled at that pace
WINDOW_S = 2        # how long a source asks the destination after a break past Commit
NAME = "vm1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=61, dirty_rate="8MiB/s")
WARM_STEPS = 5_000
SRC, DST, NOWHERE = "source", "destination", None
# A post-copy destination whose source is gone stops waiting for it after this.
DAEMON_FLAGS = ("--postcopy-recovery-timeout", str(WINDOW_S))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with etcd_cluster(tmp_path_factory.mktemp("etcd"), members=1) as cluster:
        yield cluster


def _listed(host: FleetHost) -> dict | None:
    return next((v for v in host.proc.client.call("vm.list") if v["name"] == NAME), None)


def _start(src: FleetHost, etcd) -> int:
    """Start the VM at the source; returns its epoch in etcd (the name may
    have been held by an earlier test's host: then it is taken over)."""
    start_vm(src.proc, NAME, RECIPE)
    row = wait_for("etcd to name the source", lambda: (r := vm_row(etcd, NAME)) is not None
                   and r["owner"] == src.addr and r)
    wait_for("the guest to write its pages",
             lambda: min(wait_hosted(src.proc, NAME)["steps"]) >= WARM_STEPS)
    return row["epoch"]


def _migrate(src: FleetHost, dst: FleetHost, mode: str = "precopy") -> int:
    return src.proc.client.call("migrate", name=NAME, to=dst.addr, ack_timeout_s=WINDOW_S,
                                handshake_timeout_s=5, postcopy_recovery_timeout_s=WINDOW_S,
                                **MODES[mode])["id"]


def _ended(src: FleetHost, mig: int) -> dict:
    return src.proc.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)


def _incoming(dst: FleetHost) -> dict | None:
    recs = [m for m in dst.proc.client.call("status")["migrations"]
            if m["direction"] == "incoming" and m["vm"] == NAME]
    return recs[-1] if recs else None


def _arrival_ended(dst: FleetHost) -> dict:
    return wait_for("the destination's record of the migration to end",
                    lambda: (r := _incoming(dst)) is not None
                    and r["status"] in ("completed", "failed") and r)


def _calm(hosts) -> dict | None:
    """Each host's copy of the VM (or None), once none is paused, in doubt or
    leaving; None while one is. (An arrival broken before Commit may wait out
    its idle timeout for a source that resumed the VM and will not come back:
    its copy is never listed, and can never run without Commit.)"""
    copies = {}
    for h in hosts:
        copy = _listed(h)
        if copy is not None and (not copy["running"] or copy["unresolved"]):
            return None
        if any(m["direction"] == "outgoing"
               and m["status"] in ("setup", "active", "postcopy-active", "in-doubt")
               for m in h.proc.client.call("status")["migrations"]):
            return None
        copies[h] = copy
    return copies


def assert_settled(etcd, hosts: dict[str, FleetHost], runs: str | None) -> None:
    """The invariant, once both daemons live: the VM runs at ``runs`` (a key
    of ``hosts``; None: nowhere — it died with the daemon that held it) and
    nowhere else, no copy is paused or in doubt, etcd names its host, and it
    is identical to a twin that never moved."""
    copies = wait_for("every copy of the VM to be settled", lambda: _calm(hosts.values()))
    running = sorted(side for side, h in hosts.items() if copies[h] is not None)
    assert running == ([runs] if runs else []), (running, copies)
    if runs is not None:
        row = vm_row(etcd, NAME)
        assert row["owner"] == hosts[runs].addr, (row, hosts[runs].addr)
        assert_daemon_vm_matches_unmoved(hosts[runs].proc, NAME, RECIPE)


def _pair(tmp_path, etcd, fault: Fault, *, src_link=None, dst_link=None, dst_extra=()):
    src = FleetHost(tmp_path, "src", etcd, ttl_s=TTL_S, etcd_link=src_link, extra=DAEMON_FLAGS)
    try:
        dst = FleetHost(tmp_path, "dst", etcd, ttl_s=TTL_S, fault=fault, etcd_link=dst_link,
                        extra=(*DAEMON_FLAGS, *dst_extra))
    except BaseException:
        src.close()
        raise
    return src, dst


# (mode, step, killed, the held frame delivered?, where the VM runs once both live)
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
    ("precopy", "Resumed", DST, False, SRC),       # the destination committed, then died: the
                                                   # source stays paused while it is dead;
                                                   # restarted, it says nothing runs there,
                                                   # and the source takes the VM back
    ("precopy", "Resumed", DST, True, NOWHERE),    # the source had let go: it died there
    ("precopy", "Complete", SRC, False, DST),      # the destination runs it, and says so
    ("postcopy", "Resumed", SRC, True, NOWHERE),   # pages only the source held are gone: the
                                                   # destination stops the VM, which etcd
                                                   # names its own, and no copy runs
    ("postcopy", "Resumed", DST, False, SRC),      # as in pre-copy
]


@pytest.mark.parametrize("mode,step,killed,forward,runs", KILLS,
                         ids=[f"{m}-kill-{k}-at-{s}-{'delivered' if f else 'dropped'}"
                              for m, s, k, f, _ in KILLS])
def test_a_daemon_killed_at_a_handover_step(tmp_path, etcd, mode, step, killed, forward, runs):
    if mode != "precopy" and not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
    src, dst = _pair(tmp_path, etcd, Fault(HOLD, step, DIRECTION[step]))
    hosts = {SRC: src, DST: dst}
    try:
        _start(src, etcd)
        mig = _migrate(src, dst, mode)
        dst.link.wait_fired(f"{step} to reach the proxy")
        victim = hosts[killed].proc.proc
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        dst.link.release(forward)
        if killed == DST:
            rec = _ended(src, mig)
            if runs == SRC and step == "Resumed":
                # etcd names the dead destination: the source may not run
                # its copy, however long it waits, while that host is down.
                assert rec["status"] == "in-doubt", rec
                time.sleep(TTL_S)     # three renewals, each trying to settle it
                here = _listed(src)
                assert here is not None and not here["running"] and here["unresolved"], here
                assert vm_row(etcd, NAME)["owner"] == dst.addr
        else:
            _arrival_ended(dst)
        hosts[killed].restart()
        assert_settled(etcd, hosts, runs)
    finally:
        src.close()
        dst.close()


# (step, where the VM runs once the cut is behind)
CUTS = [("Switchover", SRC), ("Verified", SRC), ("Commit", SRC), ("Resumed", DST)]


@pytest.mark.parametrize("step,runs", CUTS, ids=[f"cut-at-{s}" for s, _ in CUTS])
def test_the_link_cut_at_a_handover_step(tmp_path, etcd, step, runs):
    src, dst = _pair(tmp_path, etcd, Fault("cut", step, DIRECTION[step]))
    try:
        _start(src, etcd)
        _ended(src, _migrate(src, dst))
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
        src, dst = _pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), dst_link=link,
                         dst_extra=("--fleet-commit-timeout", "2"))
        try:
            epoch = _start(src, etcd)
            mig = _migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(True)
            rec = _ended(src, mig)
            assert rec["status"] == "failed", rec
            arrived = _arrival_ended(dst)
            assert arrived["status"] == "failed" and "etcd" in arrived["error"], arrived
            assert _listed(dst) is None
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
        src, dst = _pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), dst_link=link,
                         dst_extra=("--fleet-commit-timeout", "30", "--fleet-ttl", "60"))
        try:
            epoch = _start(src, etcd)
            mig = src.proc.client.call("migrate", name=NAME, to=dst.addr, ack_timeout_s=WINDOW_S,
                                       handshake_timeout_s=1)["id"]
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(True)
            rec = _ended(src, mig)
            assert rec["status"] == "failed" and "etcd now names this host" in rec["error"], rec
            assert wait_hosted(src.proc, NAME)["running"]
            row = vm_row(etcd, NAME)
            assert (row["owner"], row["epoch"]) == (src.addr, epoch + 1)
            assert _incoming(dst)["status"] not in ("completed", "failed"), "still trying"
            link.heal()
            arrived = _arrival_ended(dst)
            assert arrived["status"] == "failed" and "refused" in arrived["error"], arrived
            assert _listed(dst) is None
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
        src, dst = _pair(tmp_path, etcd, Fault(HOLD, "Commit", "up"), src_link=link)
        try:
            epoch = _start(src, etcd)
            mig = _migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            link.partition()
            dst.link.release(False)
            rec = _ended(src, mig)
            assert rec["status"] == "in-doubt", rec
            here = _listed(src)
            assert not here["running"] and here["unresolved"], here
            assert _listed(dst) is None
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
        src, dst = _pair(tmp_path, cluster, Fault(HOLD, "Commit", "up"))
        try:
            _start(src, cluster)
            mig = _migrate(src, dst)
            dst.link.wait_fired("Commit to reach the proxy")
            cluster.members[wait_for("a leader", lambda: leader(cluster) + 1) - 1].kill()
            dst.link.release(True)
            assert _ended(src, mig)["status"] == "completed"
            assert_settled(cluster, {SRC: src, DST: dst}, DST)
            assert vm_row(cluster, NAME)["epoch"] == 2
        finally:
            src.close()
            dst.close()

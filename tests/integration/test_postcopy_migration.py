"""Post-copy and hybrid migrations end to end, checked against an unmoved VM.

The oracle: a VM migrated (pages arriving after it resumed) and a VM that
never moved, both run to the same step, must agree on the memory digest,
every vCPU's registers and the console output.
"""
import asyncio
import os

import numpy as np
import pytest

from livemig.engine.destination import arrival as destination

from livemig.native import postcopy
from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.errors import HandshakeRefused, MigrationError
from livemig.engine.source.session import MigrationControl, migrate
from livemig.vm.machine import VM
from support.faultproxy import FaultProxy
from support.oracle import fill_then_start
from support.waiting import PATIENCE_S, wait_for, wait_for_async

pytestmark = pytest.mark.skipif(not postcopy.probe().missing,
                                reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")

MEM = "16MiB"
RAW = CodecConfig().without("lz4")   # guest pages compress ~100x; keep the wire busy
WORKLOADS = ["idle", "uniform", "hotset", "sweep", "memtest", "rewrite"]


def _observe(vm):
    return (vm.digest(), [vm.registers(i) for i in range(vm.nvcpus)],
            [vm.console(i) for i in range(vm.nvcpus)])


def check_against_unmoved(moved: VM, workload: str, seed: int, dirty_rate, *, extra_steps=2000):
    moved.pause()
    target = max(moved.steps()) + extra_steps
    moved.set_dirty_rate(None)   # pacing changes timing only: run both at full speed
    with VM(MEM, moved.nvcpus, workload, seed=seed) as ref:
        ref.run_to(target)
        moved.run_to(target)
        want, got = _observe(ref), _observe(moved)
    assert got[0] == want[0], "memory digest differs"
    assert got[1] == want[1], "registers differ"
    assert got[2] == want[2], "console differs"


async def _migrate_and_receive(vm, cfg, *, server_cfg=None, via_proxy=None, control=None):
    async with MigrationServer("127.0.0.1", 0, config=server_cfg or cfg) as srv:
        port = srv.port
        if via_proxy is not None:
            proxy = await FaultProxy("127.0.0.1", port).start()
            try:
                stats = await via_proxy(proxy, migrate(vm, "127.0.0.1", proxy.port, config=cfg,
                                                       control=control))
            finally:
                await proxy.close()
        else:
            stats = await migrate(vm, "127.0.0.1", port, config=cfg, control=control)
        arrival, moved = await srv.completed.get()
        assert not srv.sessions
    return stats, arrival, moved


def _run_migration(run, workload, cfg, *, seed=11, dirty_rate="32MiB/s", vcpus=2,
                   fill=False, **kw):
    """Migrate a fresh VM; ``fill``: first run it until most pages hold data
    (a fresh guest is mostly zero pages)."""
    if workload == "idle":
        dirty_rate = None    # idle writes nothing: it takes no dirty rate
    vm = VM(MEM, vcpus, workload, seed=seed, dirty_rate=dirty_rate)
    try:
        if fill:
            fill_then_start(vm)
        else:
            vm.start()
        stats, arrival, moved = run(_migrate_and_receive(vm, cfg, **kw))
    finally:
        vm.close()
    try:
        check_against_unmoved(moved, workload, seed, dirty_rate)
    finally:
        moved.close()
    return stats, arrival


@pytest.mark.parametrize("workload", WORKLOADS)
def test_postcopy_matches_unmoved_vm(run, workload):
    stats, arrival = _run_migration(run, workload, MigrationConfig(mode="postcopy"))
    assert stats.status == "completed" and arrival.stats.status == "completed"
    assert stats.mode == "postcopy" and stats.downtime_ms is not None
    dst = arrival.stats
    # every page the guest touched that was not zero came by request or push
    assert dst.pages_sent >= dst.pages_pushed
    # every requested page was waited for by a vCPU; some faults were served by a push
    assert dst.fault_latency.count >= dst.pages_requested
    assert dst.mode == "postcopy"
    assert dst.postcopy_duration_ms > 0


@pytest.mark.parametrize("workload", WORKLOADS)
def test_hybrid_matches_unmoved_vm(run, workload):
    cfg = MigrationConfig(mode="hybrid", hybrid_postcopy_after_rounds=1, max_downtime_ms=0.001)
    stats, arrival = _run_migration(run, workload, cfg)
    assert stats.status == "completed"
    assert len(stats.rounds) >= 1
    assert stats.decisions[-1].action.name == "POSTCOPY"


@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_memtest_faster_than_a_capped_link(run, mode):
    # memtest dirtying 64 MiB/s over a 32 MiB/s link of uncompressed pages:
    # pre-copy alone could not converge; post-copy sends each owed page once.
    extra = {"hybrid_postcopy_after_rounds": 1} if mode == "hybrid" else {}
    cfg = MigrationConfig(mode=mode, codec=RAW, max_bandwidth_bps=32 << 20, max_downtime_ms=1.0,
                          **extra)
    stats, arrival = _run_migration(run, "memtest", cfg, dirty_rate="64MiB/s", fill=True)
    assert stats.status == "completed"
    assert arrival.stats.pages_pushed > 0


def test_faults_are_requested_and_timed(run):
    # A slow push (capped link) leaves the guest faulting: requests are
    # answered on the urgent channel and their latency is recorded.
    cfg = MigrationConfig(mode="postcopy", max_bandwidth_bps=16 << 20, codec=RAW)
    stats, arrival = _run_migration(run, "memtest", cfg, dirty_rate="8MiB/s", fill=True)
    dst = arrival.stats
    assert dst.urgent_requests > 0 and dst.pages_requested > 0
    assert dst.fault_latency.count > 0
    assert dst.fault_latency.percentile(50) > 0
    assert stats.pages_pushed + dst.pages_requested >= dst.pages_pushed


def test_postcopy_on_request_during_precopy(run):
    control = MigrationControl()
    control.request_postcopy()
    cfg = MigrationConfig(mode="precopy", max_downtime_ms=0.001, max_rounds=5)
    stats, _ = _run_migration(run, "uniform", cfg, control=control)
    assert stats.status == "completed" and stats.postcopy_duration_ms > 0
    assert len(stats.rounds) == 1


def test_recovery_after_repeated_cuts(run):
    cuts = []

    async def cut_during_postcopy(proxy, migration):
        task = asyncio.ensure_future(migration)
        for _ in range(3):
            # wait until post-copy pages flow, then cut every connection
            await proxy.wait_forwarded(proxy.forwarded["up"] + (1 << 20), "up")
            if task.done():
                break
            proxy.drop()
            cuts.append(proxy.forwarded["up"])
        return await task

    cfg = MigrationConfig(mode="postcopy", max_bandwidth_bps=12 << 20, codec=RAW,
                          postcopy_recovery_timeout_s=PATIENCE_S)
    stats, arrival = _run_migration(run, "sweep", cfg, dirty_rate="8MiB/s", fill=True,
                                    via_proxy=cut_during_postcopy)
    assert stats.status == "completed"
    assert stats.recoveries >= 1 and stats.recoveries == arrival.stats.recoveries
    assert len(cuts) >= 1


def _open_fds() -> list[str]:
    """What our fds point at; userfaultfds and sockets are what a leak would hold."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(t for t in out if "userfaultfd" in t or t.startswith("socket:"))


def test_source_gone_for_good_stops_the_destination_vm(run):
    async def scenario():
        cfg = MigrationConfig(mode="postcopy", max_bandwidth_bps=2 << 20, codec=RAW,
                              postcopy_recovery_timeout_s=0.3)
        failures = []

        def hook(name, peer, stats):
            arrival = destination.Arrival(name, peer, stats)
            arrival.on_status = lambda: failures.append((arrival.status, arrival.error))
            return arrival

        async with MigrationServer("127.0.0.1", 0, config=cfg, on_incoming=hook) as srv:
            vm = VM(MEM, 2, "memtest", seed=4, dirty_rate="8MiB/s")
            try:
                fill_then_start(vm)
                task = asyncio.ensure_future(migrate(vm, "127.0.0.1", srv.port, config=cfg))
                await wait_for_async("post-copy at the destination",
                                     lambda: any(s == "postcopy-active" for s, _ in failures))
                incoming = next(iter(srv.sessions.values()))
                await asyncio.sleep(0.05)    # some post-copy traffic; its amount does not matter
                task.cancel()            # the source dies mid post-copy
                with pytest.raises(asyncio.CancelledError):
                    await task
                await wait_for_async("the destination to give the VM up",
                                     lambda: srv.sessions == {} and failures[-1][0] == "failed")
            finally:
                vm.close()
            assert failures[-1][0] == "failed"
            assert "cannot be completed" in failures[-1][1]
            assert incoming.vm is None and (incoming.pm is None or incoming.pm.closed)
            assert srv.completed.empty()

    before = _open_fds()
    run(scenario())

    def released():
        # Outside the loop (a running uvloop holds a socket pair of its own),
        # after one more turn of it: transports finish closing on a later turn.
        run(asyncio.sleep(0))
        after = _open_fds()
        return not [t for t in after if "userfaultfd" in t] and len(after) <= len(before)

    wait_for("the userfaultfd and the sockets to be closed", released)


def test_userfaultfd_unavailable_refuses_postcopy_but_precopy_works(run, monkeypatch):
    reason = "userfaultfd is disabled on this host (simulated)"
    monkeypatch.setattr(postcopy, "probe", lambda: postcopy.PostcopyProbe(False, False, False,
                                                                        reason))
    monkeypatch.setattr(destination, "_POSTCOPY_REASON", None)
    vm = VM(MEM, 2, "uniform", seed=1, dirty_rate="16MiB/s")
    try:
        vm.start()
        with pytest.raises(MigrationError) as info:
            run(_migrate_and_receive(vm, MigrationConfig(mode="postcopy")))
        assert isinstance(info.value, HandshakeRefused) or isinstance(
            info.value.__cause__, HandshakeRefused)
        assert reason in str(info.value) and "pre-copy is still possible" in str(info.value)
        assert vm.running
        stats, _, moved = run(_migrate_and_receive(vm, MigrationConfig(mode="precopy")))
        assert stats.status == "completed"
        moved.close()
    finally:
        vm.close()
        monkeypatch.setattr(destination, "_POSTCOPY_REASON", None)


def test_owed_bitmap_covers_only_unsent_or_dirty_pages(run):
    # Hybrid after one full round of an idle guest: almost nothing is owed.
    cfg = MigrationConfig(mode="hybrid", hybrid_postcopy_after_rounds=1, max_downtime_ms=0.001)
    stats, arrival = _run_migration(run, "idle", cfg, dirty_rate=None)
    npages = (16 << 20) // 4096
    assert arrival.stats.pages_pushed + arrival.stats.pages_requested < npages // 8
    assert np.isfinite(stats.downtime_ms)


def test_precopy_of_raw_pages_while_the_guest_writes(run):
    # Uncompressed pages of a running guest are sent while it writes them:
    # the frame checksum must cover the bytes actually sent.
    cfg = MigrationConfig(mode="precopy", codec=RAW, max_bandwidth_bps=64 << 20)
    stats, _ = _run_migration(run, "uniform", cfg, dirty_rate="64MiB/s", fill=True)
    assert stats.status == "completed" and stats.pages_by_encoding["raw"] > 0


def test_recover_now_cuts_the_backoff_short(run, monkeypatch):
    from livemig.engine.source import session as source
    monkeypatch.setattr(source, "RECOVERY_BACKOFF_S", (30.0,))   # only a forced retry helps
    control = MigrationControl()

    async def cut_once(proxy, migration):
        task = asyncio.ensure_future(migration)
        await proxy.wait_forwarded(proxy.forwarded["up"] + (1 << 20), "up")
        proxy.drop()
        # A window for a wrong early end to show; only a forced retry ends it.
        await asyncio.sleep(0.1)
        assert not task.done()
        # Ask until it has recovered: a request made before the source has
        # noticed the cut and entered its backoff is not kept for later.
        await wait_for_async("the forced retry to recover the migration",
                             lambda: control.recover_now() or task.done())
        return await task

    cfg = MigrationConfig(mode="postcopy", max_bandwidth_bps=16 << 20, codec=RAW,
                          postcopy_recovery_timeout_s=20.0)
    stats, arrival = _run_migration(run, "sweep", cfg, dirty_rate="8MiB/s", fill=True,
                                    via_proxy=cut_once, control=control)
    assert stats.status == "completed" and stats.recoveries == 1


def test_hybrid_invalidates_before_the_pause_and_discards_little_in_the_stop(run):
    # A guest writing 64 MiB/s of a 16 MiB memory re-dirties much of what the
    # first round sent; invalidation rounds take those pages back before the
    # pause, so the stop only discards what was written during the last one.
    cfg = MigrationConfig(mode="hybrid", hybrid_postcopy_after_rounds=1, max_downtime_ms=0.001,
                          codec=RAW, max_bandwidth_bps=64 << 20)
    stats, arrival = _run_migration(run, "uniform", cfg, dirty_rate="64MiB/s", fill=True)
    src, dst = stats, arrival.stats
    assert src.status == "completed" and dst.status == "completed"
    assert len(src.invalidation_rounds) >= 1
    assert [r["pages"] for r in dst.invalidation_rounds] == \
        [r["pages"] for r in src.invalidation_rounds]
    first = src.invalidation_rounds[0]["pages"]
    assert first > 0
    assert dst.stop_invalidated_pages == src.stop_invalidated_pages
    assert src.stop_invalidated_pages <= max(first, 256)

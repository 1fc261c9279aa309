"""Pre-copy end to end, under both event loops, checked against unmoved twins.

Every migration here ends with the determinism oracle (support.oracle): the
moved VM and a VM that never moved are run to the same step and must agree
on memory digest, registers and console of every vCPU, with no guest fault
(the memtest guest faults by itself on a corrupted page).
"""
import asyncio

import pytest

from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination.server import Arrival, IncomingMigration, MigrationServer
from livemig.errors import HandoverInDoubt, MigrationError
from livemig.policy import Action
from livemig.engine.source.session import migrate
from support.oracle import Recipe, assert_matches_unmoved
from support.waiting import wait_for_async

LOCAL = "127.0.0.1"
# Incompressible pages that are never sent as deltas: the link, not the codec,
# decides whether pre-copy keeps up.
LINK_BOUND = CodecConfig(encodings=("zero", "dup", "lz4"))


async def _migrate(recipe: Recipe, config: MigrationConfig | None = None, *,
                   warmup_s: float = 0.1, server_config: MigrationConfig | None = None):
    """Start the recipe's VM, migrate it over loopback; return (stats, moved VM)."""
    vm = recipe.build()
    try:
        vm.start()
        await asyncio.sleep(warmup_s)   # the guest dirties memory; nothing depends on how much
        async with MigrationServer(LOCAL, 0, config=server_config) as server:
            stats = await migrate(vm, LOCAL, server.port, config=config, name="t")
            arrival, moved = await server.completed.get()
        assert arrival.status == "completed" and arrival.name == "t"
        assert moved.running
        return stats, moved
    finally:
        vm.close()


def _check_moved(moved, recipe):
    try:
        assert_matches_unmoved(moved, recipe)
    finally:
        moved.close()


@pytest.mark.parametrize("workload,rate", [
    ("idle", None), ("uniform", "48MiB/s"), ("hotset", "48MiB/s"), ("sweep", "48MiB/s"),
    ("memtest", "48MiB/s"), ("rewrite", "16MiB/s")])
def test_each_workload_migrates_bit_identical(run, workload, rate):
    recipe = Recipe("32MiB", 2, workload, seed=11, dirty_rate=rate)

    async def main():
        stats, moved = await _migrate(recipe)
        assert stats.status == "completed" and stats.converged
        assert stats.downtime_ms > 0 and stats.bytes_sent > 0
        _check_moved(moved, recipe)
    run(main())


def test_random_memory_needs_several_rounds_and_converges(run):
    recipe = Recipe("32MiB", 2, "uniform", seed=5, dirty_rate="32MiB/s", fill_seed=9)
    config = MigrationConfig(max_bandwidth_bps=200e6, max_downtime_ms=10, codec=LINK_BOUND)

    async def main():
        stats, moved = await _migrate(recipe, config)
        assert len(stats.decisions) > 1, [d.reason for d in stats.decisions]  # live rounds
        assert stats.converged and stats.decisions[-1].action is Action.SWITCHOVER
        assert all(d.action is Action.CONTINUE for d in stats.decisions[:-1])
        # round 0 is all of memory; what follows is only the dirty set, which
        # never holds the code pages (how much of the data it holds depends
        # on how long round 0 took on a loaded machine)
        sent = [r.pages_sent for r in stats.rounds]
        assert sent[0] == 8192 and max(sent[1:]) < sent[0], sent
        assert stats.bytes_sent > 32 << 20  # random data: round 0 alone is the memory
        _check_moved(moved, recipe)
    run(main())


FAST_GUEST = Recipe("16MiB", 2, "uniform", seed=2, dirty_rate="256MiB/s", fill_seed=3)


def test_dirty_rate_above_capped_link_gives_up_and_source_keeps_running(run):
    config = MigrationConfig(max_bandwidth_bps=64e6, max_downtime_ms=50, max_rounds=5,
                             codec=LINK_BOUND)

    async def main():
        vm = FAST_GUEST.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0) as server:
                with pytest.raises(MigrationError, match="did not converge") as info:
                    await migrate(vm, LOCAL, server.port, config=config)
                assert server.completed.empty()
            err = info.value
            assert err.source_resumed and err.phase == "precopy"
            assert err.stats.status == "failed" and not err.stats.converged
            assert [d.action for d in err.stats.decisions][-1] is Action.GIVE_UP
            assert len(err.stats.rounds) == 5
            assert vm.running
            steps = vm.steps()
            await wait_for_async("the source VM to run on",
                                 lambda: all(b > a for a, b in zip(steps, vm.steps())))
            assert_matches_unmoved(vm, FAST_GUEST)
        finally:
            vm.close()
    run(main())


def test_auto_converge_throttles_until_a_capped_link_keeps_up(run):
    config = MigrationConfig(max_bandwidth_bps=64e6, max_downtime_ms=50, max_rounds=20,
                             codec=LINK_BOUND, auto_converge=True, throttle_initial_pct=60,
                             throttle_increment_pct=20)

    async def main():
        stats, moved = await _migrate(FAST_GUEST, config, warmup_s=0.05)
        throttles = [d for d in stats.decisions if d.action is Action.THROTTLE]
        assert throttles, [d.reason for d in stats.decisions]
        assert throttles[0].throttle_pct == 60
        assert "not converging" in throttles[0].reason
        assert stats.converged and stats.throttle_pct >= 60
        _check_moved(moved, FAST_GUEST)
    run(main())


def _corrupt_before_switchover(monkeypatch, page: int) -> None:
    """Make the destination flip one byte of guest memory after the pages landed
    (a bad DIMM, a decoder bug) — only a full digest can see that."""
    original = IncomingMigration._handover

    async def corrupted(self, sw):
        self.vm.memory.bytes[page * 4096 + 100] ^= 0x5A
        return await original(self, sw)
    monkeypatch.setattr(IncomingMigration, "_handover", corrupted)


@pytest.mark.parametrize("where", ["source", "both"])
def test_full_digest_catches_a_corrupted_page_and_the_source_resumes(run, monkeypatch, where):
    recipe = Recipe("16MiB", 2, "memtest", seed=4, dirty_rate="16MiB/s")
    _corrupt_before_switchover(monkeypatch, page=1000)
    full = MigrationConfig(verify="full")

    async def main():
        vm = recipe.build()
        try:
            vm.start()
            await asyncio.sleep(0.05)   # the guest dirties memory; nothing depends on how much
            async with MigrationServer(LOCAL, 0, config=full if where == "both" else None) as srv:
                with pytest.raises(MigrationError, match="digest") as info:
                    await migrate(vm, LOCAL, srv.port, config=full)
                assert srv.completed.empty()
            assert info.value.phase == "switchover" and info.value.source_resumed
            assert "differs from ours" in info.value.stats.error
            assert vm.running and not isinstance(info.value, HandoverInDoubt)
            assert_matches_unmoved(vm, recipe)
        finally:
            vm.close()
    run(main())


def test_full_digest_chosen_by_the_source_alone_succeeds(run):
    recipe = Recipe("16MiB", 2, "memtest", seed=6, dirty_rate="16MiB/s")

    async def main():
        stats, moved = await _migrate(recipe, MigrationConfig(verify="full"))
        assert stats.status == "completed"
        _check_moved(moved, recipe)
    run(main())


def test_library_api_both_sides_back_and_forth_in_one_program(run):
    recipe = Recipe("32MiB", 2, "memtest", seed=8, dirty_rate="32MiB/s")
    resumed = []

    def host(name, peer, stats):
        arrival = Arrival(name, peer, stats)
        arrival.on_resumed = lambda vm: resumed.append((name, vm))
        return arrival

    async def main():
        vm = recipe.build()
        vm.start()
        await asyncio.sleep(0.05)   # the guest dirties memory; nothing depends on how much
        async with MigrationServer(LOCAL, 0, on_incoming=host) as a, \
                MigrationServer(LOCAL, 0, on_incoming=host) as b:
            for hop, server in enumerate([b, a, b]):
                stats = await migrate(vm, LOCAL, server.port, name=f"hop{hop}")
                assert stats.status == "completed" and not vm.running
                vm.close()
                arrival, vm = await server.completed.get()
                assert arrival.name == f"hop{hop}" and resumed[-1] == (f"hop{hop}", vm)
                await asyncio.sleep(0.03)   # runs a while at each stop; how long does not matter
            assert not a.errors and not b.errors
        _check_moved(vm, recipe)
    run(main())

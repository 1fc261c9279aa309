"""A bandwidth cap on the native streams, end to end, under both event loops.

A capped migration runs on the streams (not the Python path), its pre-copy
rounds average no more than the cap (with room for one burst and a frame per
stream), and a change of the cap while a round runs (what `livemig
migrate-set` calls) changes the rate the threads send at. Bounds are upper
bounds on what the cap allows, so a slow machine never fails them; the one
lower bound (the raised cap is in effect) asks for a small fraction of the
machine's speed. Each migration is checked against a twin that never moved.
"""
import asyncio
import time

import pytest

from livemig.config import MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import MigrationControl, migrate
from livemig.native.streams import probe
from support.daemons import daemon_pair
from support.oracle import Recipe, assert_matches_unmoved
from support.waiting import wait_for, wait_for_async

LOCAL = "127.0.0.1"
OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
MiB = 1 << 20
# Random memory (every page RAW), written slowly: far below any cap here.
RECIPE = Recipe("48MiB", 2, "uniform", seed=43, dirty_rate="256KiB/s", fill_seed=5)
QUICK = dict(handshake_timeout_s=10, switchover_timeout_s=30, ack_timeout_s=10)
BAND = 1.3


async def _migrate(config: MigrationConfig, control: MigrationControl, server, during=None):
    """Migrate a fresh VM of RECIPE; ``during(control)`` runs alongside."""
    vm = RECIPE.build()
    try:
        vm.start()
        task = asyncio.ensure_future(migrate(vm, LOCAL, server.port, config=config, name="p",
                                             control=control))
        if during is not None:
            try:
                await during(control)
            except BaseException:
                task.cancel()
                raise
        stats = await task
        assert stats.status == "completed" and stats.converged
        arrival, moved = await asyncio.wait_for(server.completed.get(), 30)
        assert arrival.status == "completed"
        try:
            assert_matches_unmoved(moved, RECIPE)
        finally:
            moved.close()
        return stats
    finally:
        vm.close()


def test_a_capped_migration_runs_on_the_streams_at_the_cap(run):
    cap_bps = 24 * MiB

    async def main():
        control = MigrationControl()
        async with MigrationServer(LOCAL, 0) as server:
            stats = await _migrate(MigrationConfig(streams=2, max_bandwidth_bps=cap_bps, **QUICK),
                                   control, server)
        assert stats.data_path == "native-streams ×2"
        duration_s = sum(r.duration_s for r in stats.rounds)
        sent_bytes = sum(r.bytes_sent for r in stats.rounds)
        assert duration_s >= 1.0 and sent_bytes >= 40 * MiB
        assert sent_bytes / duration_s <= BAND * cap_bps, (sent_bytes, duration_s)
        paced = control.streams.pace.stats()
        assert paced["waits"] > 0 and paced["bytes"] >= sent_bytes
    run(main())


def test_changing_the_cap_mid_round_changes_the_rate(run):
    low_bps, high_bps = 4 * MiB, 64 * MiB

    async def window(pace, nbytes):
        """(bytes, seconds) of the next ``nbytes`` the streams take."""
        b0, t0 = pace.stats()["bytes"], time.monotonic()
        got = await wait_for_async(f"{nbytes} more bytes through the cap",
                                   lambda: (b := pace.stats()["bytes"]) >= b0 + nbytes and b)
        return got - b0, time.monotonic() - t0

    async def during(control):
        streams = await wait_for_async("the streams", lambda: control.streams)
        pace = streams.pace
        # Past the first burst, then a window of 8 MiB at the low cap.
        await wait_for_async("the first burst", lambda: pace.stats()["bytes"] >= 4 * MiB)
        nbytes, seconds = await window(pace, 8 * MiB)
        assert seconds >= 1.0 and nbytes / seconds <= BAND * low_bps, (nbytes, seconds)
        control.set_max_bandwidth(high_bps)        # what migrate-set calls
        nbytes, seconds = await window(pace, 16 * MiB)
        assert nbytes / seconds > 2 * low_bps, (nbytes, seconds)
        assert nbytes / seconds <= BAND * high_bps + 4 * MiB / seconds, (nbytes, seconds)

    async def main():
        control = MigrationControl()
        async with MigrationServer(LOCAL, 0) as server:
            stats = await _migrate(MigrationConfig(streams=2, max_bandwidth_bps=low_bps, **QUICK),
                                   control, server, during)
        assert stats.data_path == "native-streams ×2"
    run(main())


def test_lifting_the_cap_releases_a_waiting_stream(run):
    """A cap so low the round would take minutes is lifted mid-round: the
    threads stop waiting at once and the migration completes."""
    async def during(control):
        streams = await wait_for_async("the streams", lambda: control.streams)
        await wait_for_async("a thread waiting for tokens",
                             lambda: streams.pace.stats()["waits"] > 0)
        control.set_max_bandwidth(None)            # migrate-set --unlimited-bandwidth

    async def main():
        control = MigrationControl()
        async with MigrationServer(LOCAL, 0) as server:
            stats = await _migrate(MigrationConfig(streams=2, max_bandwidth_bps=256 << 10,
                                                   **QUICK), control, server, during)
        # 48 MiB at the first cap would have taken over three minutes.
        assert stats.total_time_ms < 120_000
    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_migrate_set_reaches_a_stream_migration_through_the_daemon(tmp_path, loop):
    """`livemig migrate-set` on a capped migration that runs on the streams:
    the rate moves from the low cap to well above it, and it completes."""
    with daemon_pair(tmp_path, loop) as (a, b):
        a.cli("vm", "start", "paced", "--memory", "64MiB", "--vcpus", "1", "--workload",
              "rewrite", "--dirty-rate", "16MiB/s")
        started = a.cli_json("migrate", "paced", "--to", b.address, "--max-bandwidth",
                             "2MiB/s", "--no-wait")

        def record():
            return a.client.call("migration.find", key="paced")

        def sent_bytes():
            live = record()
            assert live["status"] in ("setup", "active", "completed"), live
            return (live.get("stats") or {}).get("bytes_sent", 0)   # none before setup

        def window(nbytes):
            """(bytes, seconds) until ``nbytes`` more were sent or it ended."""
            b0, t0 = sent_bytes(), time.monotonic()
            wait_for(f"{nbytes} more bytes, or the end", lambda: sent_bytes() >= b0 + nbytes
                     or record()["status"] == "completed")
            return sent_bytes() - b0, time.monotonic() - t0

        wait_for("past the first burst", lambda: sent_bytes() >= 4 * MiB)
        nbytes, seconds = window(4 * MiB)
        assert record()["status"] == "active"
        assert nbytes / seconds <= BAND * 2 * MiB + 2 * MiB / seconds, (nbytes, seconds)
        live = record()
        assert live["stats"]["data_path"].startswith("native-streams"), live["stats"]
        changed = a.cli_json("migrate-set", "paced", "--max-bandwidth", "64MiB/s")
        assert changed["id"] == started["id"]
        nbytes, seconds = window(8 * MiB)
        assert nbytes / seconds > 2 * (2 * MiB), (nbytes, seconds)
        end = a.client.call("migration.wait", id=started["id"], timeout_s=120)
        assert end["status"] == "completed", end
        b.cli("vm", "stop", "paced")

"""Pre-copy on native bulk streams, end to end, under both event loops.

Every migration that completes is checked against a twin that never moved
(support.oracle). Streams 1, 2 and 4 carry the pages; a peer of wire version
1 (either side) and a TLS migration on a host whose streams cannot speak TLS
fall back to the Python path and say so
in the stats; a stream cut (without resumable pre-copy) or corrupted mid-round
fails the migration before Commit, with the source's VM resumed, intact, and
migratable again.
"""
import asyncio
import dataclasses
import socket

import numpy as np
import pytest

from livemig.aio import channel as aio_channel
from livemig.aio.tls import make_test_pki
from livemig.config import MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.engine.source.streams import SourceStreams
from livemig.errors import MigrationError
from livemig.native import postcopy
from livemig.native import tls as native_tls
from livemig.native.memory import GuestMemory
from livemig.native.streams import SourceStream, lz4_probe, probe
from livemig.protocol import spec
from livemig.protocol import connection
from support.oracle import Recipe, assert_arrival_matches_unmoved, moved_and_checked
from support.streamsaboteur import StreamSaboteur

LOCAL = "127.0.0.1"
OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
# Random memory (the streams carry every page RAW) written while it moves.
RECIPE = Recipe("32MiB", 2, "uniform", seed=41, dirty_rate="24MiB/s", fill_seed=4)
MEMTEST = Recipe("16MiB", 2, "memtest", seed=42, dirty_rate="24MiB/s")
RECIPE_PAGES = (32 << 20) // 4096
QUICK = dict(handshake_timeout_s=10, switchover_timeout_s=10, ack_timeout_s=10)


async def _migrate_checked(recipe: Recipe, config: MigrationConfig, *, server, **kw):
    """Migrate a fresh VM of ``recipe`` to ``server``; check it against its twin."""
    stats, arrived = await moved_and_checked(
        recipe, server, lambda vm: migrate(vm, LOCAL, server.port, config=config, name="s", **kw))
    assert stats.converged and arrived.status == "completed"
    return stats, arrived


@pytest.mark.parametrize("nstreams", [1, 2, 4])
def test_streams_migrate_bit_identical(run, nstreams):
    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            src, dst = await _migrate_checked(RECIPE, MigrationConfig(streams=nstreams),
                                              server=server)
        assert src.data_path == dst.data_path == f"native-streams ×{nstreams}"
        assert len(src.rounds) >= 2   # round 0, and the stop's round, at least
        assert src.rounds[0].pages_sent == RECIPE_PAGES
        assert src.pages_sent == dst.pages_sent and src.bytes_sent == dst.bytes_sent
        assert src.pages_by_encoding["raw"] > 0 and src.stream_cpu_s > 0
        assert dst.stream_cpu_s > 0
        assert src.pages_by_encoding == dst.pages_by_encoding
        if src.pages_sent > RECIPE_PAGES:
            # Pages written again after round 0 changed by a word or a few:
            # what the destination holds is known, so they go as BLOCK pages.
            assert src.pages_by_encoding["block"] > 0
    run(main())


def test_self_checking_guest_moves_on_streams_and_python_path_alike(run):
    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            native, _ = await _migrate_checked(MEMTEST, MigrationConfig(streams=2),
                                               server=server)
            python, _ = await _migrate_checked(MEMTEST, MigrationConfig(streams=0),
                                               server=server)
        assert native.data_path == "native-streams ×2"
        assert python.data_path == "python: native streams disabled by configuration (streams=0)"
    run(main())


@pytest.mark.skipif(not lz4_probe()[0], reason=f"no LZ4 on the streams: {lz4_probe()[1]}")
def test_streams_send_lz4_where_it_pays_and_not_when_switched_off(run):
    """The memtest guest's pages are a few words each: its runs go LZ4 on the
    streams and land bit-identical; with "lz4" off in the codec none do."""
    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            on, on_dst = await _migrate_checked(MEMTEST, MigrationConfig(streams=2),
                                                server=server)
            base = MigrationConfig(streams=2)
            off, _ = await _migrate_checked(
                MEMTEST, dataclasses.replace(base, codec=base.codec.without("lz4")),
                server=server)
        assert on.pages_by_encoding["lz4"] > 0
        assert on.pages_by_encoding == on_dst.pages_by_encoding
        assert on.bytes_by_encoding["lz4"] < on.pages_by_encoding["lz4"] * 4096 * 0.875
        assert off.pages_by_encoding["lz4"] == 0
        assert on.bytes_sent < off.bytes_sent
    run(main())


@pytest.mark.skipif(not postcopy.probe().missing, reason="userfaultfd MISSING unavailable")
def test_hybrid_runs_its_rounds_on_streams_then_post_copy(run):
    config = MigrationConfig(mode="hybrid", streams=2, hybrid_postcopy_after_rounds=1)

    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            vm = RECIPE.build()
            try:
                vm.start()
                await asyncio.sleep(0.05)
                stats = await migrate(vm, LOCAL, server.port, config=config, name="h")
                assert stats.status == "completed"
                assert stats.data_path == "native-streams ×2"
                assert stats.rounds[0].pages_sent == RECIPE_PAGES
                await assert_arrival_matches_unmoved(server, RECIPE)
            finally:
                vm.close()
    run(main())


@pytest.mark.parametrize("old_side", ["source", "destination"])
def test_a_version_1_peer_migrates_on_the_python_path(run, monkeypatch, old_side):
    # A peer of wire version 1 offers (or accepts) nothing above it.
    module = aio_channel if old_side == "source" else connection
    monkeypatch.setattr(module, "SUPPORTED_VERSIONS", (1, 1))

    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            src, dst = await _migrate_checked(RECIPE, MigrationConfig(streams=2), server=server)
        assert src.data_path == ("python: wire version 1 was negotiated, which has no streams")
        assert dst.data_path.startswith("python:")
    run(main())


def test_tls_migration_on_a_host_without_tls_streams_uses_the_python_path(run, tmp_path,
                                                                         monkeypatch):
    # (tests/integration/test_tls_streams.py has TLS on the native streams.)
    monkeypatch.setattr(native_tls, "probe", lambda: (False, "built without OpenSSL"))
    pki = make_test_pki(tmp_path)

    async def main():
        async with MigrationServer(LOCAL, 0, ssl=pki.server_context()) as server:
            src, dst = await _migrate_checked(MEMTEST, MigrationConfig(streams=2),
                                              server=server, ssl=pki.client_context(),
                                              server_hostname="localhost")
        assert src.data_path == ("python: the migration uses TLS, which the native streams "
                                 "cannot speak here: built without OpenSSL")
        assert dst.data_path.startswith("python:")
    run(main())


@pytest.mark.parametrize("action, victim", [("cut", 2), ("cut", 3), ("corrupt", 3)])
def test_a_stream_harmed_mid_round_fails_cleanly_and_the_source_resumes(run, action, victim):
    # Without resumable pre-copy (tests/integration/test_resumable_precopy.py
    # has the cut resumed); a corrupted frame fails either way.
    config = MigrationConfig(streams=2, precopy_resume_timeout_s=0, **QUICK)

    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0, config=MigrationConfig(**QUICK)) as server:
                # 4 MiB into a stream: inside round 0 (16 MiB per stream), past
                # the handshake, inside a page batch's payload.
                async with StreamSaboteur(server.port, victim=victim, after_bytes=4 << 20,
                                          action=action) as relay:
                    with pytest.raises(MigrationError) as info:
                        await migrate(vm, LOCAL, relay.port, config=config, name="s")
                    assert relay.harmed.is_set()
                err = info.value
                assert err.source_resumed and err.phase == "precopy", err
                assert "bulk stream" in str(err), err
                assert err.stats.data_path == "native-streams ×2"
                assert vm.running and server.completed.empty()
                # The VM is whole here, and moves on a second try.
                stats = await migrate(vm, LOCAL, server.port, config=config, name="s")
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RECIPE)
        finally:
            vm.close()
    run(main())


@pytest.mark.parametrize("peer", ["reads nothing", "never acks"])
def test_a_round_fails_when_the_streams_stall_not_when_they_are_slow(run, peer):
    async def main():
        mem = GuestMemory(8 << 20)
        mem.words[:] = 7
        a, b = socket.socketpair()
        streams = SourceStreams([SourceStream(mem, None)])
        streams.streams[0].attach_fd(a.detach(), version=spec.STREAMS_VERSION)
        drained = 0

        def drain():
            nonlocal drained
            try:
                drained += len(b.recv(1 << 20))
            except BlockingIOError:
                pass
        try:
            if peer == "never acks":
                b.setblocking(False)
                asyncio.get_running_loop().add_reader(b.fileno(), drain)
            with pytest.raises(MigrationError, match="no progress on any stream for 0.5 s"):
                await streams.send_round(0, np.arange(mem.npages, dtype=np.uint64), 0.5)
            if peer == "never acks":
                assert drained >= mem.length_bytes   # the whole round went out first
        finally:
            if peer == "never acks":
                asyncio.get_running_loop().remove_reader(b.fileno())
            streams.close()
            b.close()
            mem.close()
    run(main())

"""livemig plan's stream probe: the link measured on the native bulk streams.

The probe runs on the streams a migration would use and the plan says so; it
runs on the TLS streams under TLS; it falls back to the control channel with
a stated reason (streams=0, a peer without the "stream-probe" capability on either side); a hostile
source cannot make the destination map more than one capped window, run
past the granted time, or take more streams than granted.
"""
import asyncio
import json
import os

import pytest

from livemig.aio.channel import open_channel
from livemig.aio.tls import make_test_pki
from livemig.analysis.plan import plan_migration, probe_bandwidth, probe_link
from livemig.config import MAX_STREAMS, MigrationConfig
from livemig.engine.destination import server as server_mod
from livemig.engine.destination import streamprobe as dest_probe
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.engine.source.streamprobe import FIRST_ROUND_BYTES
from livemig.errors import LivemigError
from livemig.native.postcopy import probe as postcopy_probe
from livemig.native.streams import probe
from livemig.protocol import connection
from livemig.protocol import (Abort, ChannelKind, StreamProbe, StreamProbeEnd,
                              StreamProbeGrant, spec)
from support.oracle import Recipe, assert_matches_unmoved
from support.waiting import PATIENCE_S, wait_for_async

LOCAL = "127.0.0.1"
MIB = 1 << 20
PAGE = 4096
OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
RECIPE = Recipe("16MiB", 1, "uniform", seed=5, dirty_rate="4MiB/s", fill_seed=6)
STREAM_CAPS = frozenset({spec.STREAMS_CAPABILITY, spec.STREAM_PROBE_CAPABILITY})


def test_plan_probes_on_the_native_streams_and_says_so(run):
    """The probe's pages go through the migration's stream threads (RAW, as
    incompressible pages do), both sides count the same bytes, the predictor
    gets the probe's rate; the server keeps nothing and still migrates."""
    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            vm = RECIPE.build()
            try:
                vm.start()
                plan = await plan_migration(vm, LOCAL, srv.port, window_s=0.2,
                                            probe_time_s=0.3, probe_bytes=24 * MIB,
                                            config=MigrationConfig(streams=2))
                # The window is unmapped once any pre-faulting of it has stopped.
                await wait_for_async("the probe's window unmapped", lambda: not srv.probe_slot.busy)
                assert srv.errors == []
                stats = await migrate(vm, LOCAL, srv.port, config=MigrationConfig(streams=2),
                                      name="p")
                assert stats.status == "completed"
                _, moved = await asyncio.wait_for(srv.completed.get(), 10)
                try:
                    assert_matches_unmoved(moved, RECIPE)
                finally:
                    moved.close()
            finally:
                vm.close()
            return plan
    plan = run(main())
    p = plan.probe
    assert p.kind == "streams" and p.fallback_reason is None
    st = p.streams
    assert st["nstreams"] == 2 and len(st["rounds"]) >= 1
    assert st["dest_bytes"] == p.bytes > 0 and st["dest_pages"] == st["pages"]
    assert st["pages_by_encoding"]["raw"] == st["pages"]
    assert st["source_cpu_s"] > 0 and st["dest_cpu_s"] > 0
    assert p.bytes <= 24 * MIB + st["pages"] * 64     # the budget, plus run headers
    assert plan.bandwidth_bps == p.bytes_per_s > 0
    d = plan.to_dict()
    assert d["probe"]["kind"] == "streams" and json.dumps(d)


def test_plan_under_tls_probes_on_the_tls_streams(run, tmp_path):
    pki = make_test_pki(tmp_path)

    async def main():
        async with MigrationServer(LOCAL, 0, ssl=pki.server_context()) as srv:
            est = await probe_link(LOCAL, srv.port, config=MigrationConfig(streams=2),
                                   max_time_s=0.2, max_bytes=8 * MIB,
                                   ssl=pki.client_context(), server_hostname="localhost")
            # The window is unmapped once any pre-faulting of it has stopped.
            await wait_for_async("the probe's window unmapped", lambda: not srv.probe_slot.busy)
            assert srv.errors == []
            return est
    est = run(main())
    assert est.kind == "streams" and est.fallback_reason is None
    assert est.streams["nstreams"] == 2 and est.streams["dest_bytes"] == est.bytes > 0


@pytest.mark.parametrize("first_touch", ["fill", "prefault"])
def test_the_probe_places_its_rounds_as_a_migration_places_pages(run, monkeypatch, first_touch):
    """The probe's window is placed as a VM's memory is: by the first-touch
    fill (UFFDIO_COPY into pages made absent again after every round) where
    this host has it, else pre-faulted; each round then finds it fresh."""
    monkeypatch.setenv("LIVEMIG_FIRST_TOUCH", "prefault" if first_touch == "prefault" else "uffd")
    if first_touch == "fill" and not postcopy_probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy_probe().reason}")
    seen = []

    class Watched(dest_probe.StreamProbeSink):
        def stop(self):
            if not self.streams.closed:
                placed = sum(s.stats()["pages"] for s in self.streams.streams)
                seen.append((self, placed, self.fill.pm.stats if self.fill else None))
            super().stop()
    monkeypatch.setattr(dest_probe, "StreamProbeSink", Watched)

    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            await probe_link(LOCAL, srv.port, config=MigrationConfig(streams=2),
                             max_bytes=24 * MIB, max_time_s=0.5)
            # The window is unmapped once any pre-faulting of it has stopped.
            await wait_for_async("the probe's window unmapped", lambda: not srv.probe_slot.busy)
            assert srv.errors == []
            [(sink, placed, pm_stats)] = seen
            assert (sink.fill is not None) == (first_touch == "fill") and placed > 0
            if sink.fill is None:
                return
            # Round 0 landed on the fresh window: every page by UFFDIO_COPY.
            assert pm_stats["pages_copied"] >= FIRST_ROUND_BYTES // PAGE
            # Freshening after a round makes every page absent again once
            # fewer than half are absent (here nothing else places pages).
            fresh = dest_probe.StreamProbeSink(StreamProbeGrant(1, 100, 64 * PAGE),
                                               dest_probe.ProbeSlot(), lambda ch: None)
            try:
                fresh.fill.pm.place(0, bytes(range(256)) * 16 * 8, 8)
                fresh.fill.pm.place(40, b"\x01" * PAGE, 1)
                fresh._make_fresh()       # room left for a round of half the window
                assert fresh.fill.pm.missing == 64 - 9
                fresh.fill.pm.place(8, b"\x02" * (24 * PAGE), 24)
                fresh._make_fresh()       # not any more
                assert fresh.fill.pm.missing == 64
                assert not fresh.memory.words.any()
            finally:
                fresh.close()
    run(main())


@pytest.mark.parametrize("config,tls,reason", [
    (MigrationConfig(streams=0), False, "native streams disabled by configuration (streams=0)"),
    (MigrationConfig(streams=0), True, "native streams disabled by configuration (streams=0)"),
])
def test_the_control_probe_is_used_with_a_stated_reason(run, tmp_path, config, tls, reason):
    pki = make_test_pki(tmp_path) if tls else None

    async def main():
        async with MigrationServer(LOCAL, 0, ssl=pki.server_context() if tls else None) as srv:
            return await probe_link(LOCAL, srv.port, config=config, max_time_s=0.1,
                                    max_bytes=4 * MIB,
                                    ssl=pki.client_context() if tls else None,
                                    server_hostname="localhost" if tls else None)
    est = run(main())
    assert est.kind == "control" and est.fallback_reason == reason
    assert est.bytes_per_s > 0 and est.control["frames"] >= 1 and est.streams is None


def test_a_destination_without_the_capability_gets_the_control_probe(run, monkeypatch):
    """New source, old destination: no "stream-probe" in the Welcome."""
    monkeypatch.setattr(server_mod, "stream_probe_offered", lambda config, **_: False)

    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            est = await probe_link(LOCAL, srv.port, config=MigrationConfig(streams=2),
                                   max_time_s=0.1, max_bytes=4 * MIB)
            assert srv.errors == []
            return est
    est = run(main())
    assert est.kind == "control"
    assert est.fallback_reason.startswith("the destination does not offer the stream probe")


def test_a_version_1_destination_gets_the_control_probe(run, monkeypatch):
    monkeypatch.setattr(connection, "SUPPORTED_VERSIONS", (1, 1))   # what answer_hello speaks

    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            return await probe_link(LOCAL, srv.port, config=MigrationConfig(streams=2),
                                    max_time_s=0.1, max_bytes=4 * MIB)
    est = run(main())
    assert est.kind == "control"
    assert est.fallback_reason == ("wire version 1 was negotiated, which has no streams "
                                   "(an older peer)")


def test_a_source_without_the_capability_probes_as_before_and_cannot_skip_it(run):
    """Old source, new destination: the control probe is served as ever; a
    StreamProbe on a channel that did not negotiate the capability is a
    protocol violation, refused before anything is mapped."""
    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            old = await probe_bandwidth(LOCAL, srv.port, max_time_s=0.1, max_bytes=4 * MIB)
            ch = await open_channel(LOCAL, srv.port, kind=ChannelKind.CONTROL,
                                    session_id=os.urandom(16))
            assert spec.STREAM_PROBE_CAPABILITY not in ch.conn.capabilities
            await ch.send(StreamProbe(2, 100, 4 * MIB))
            answer = await asyncio.wait_for(ch.recv(), 10)
            await ch.close()
            assert not srv.probe_slot.busy
            return old, answer
    old, answer = run(main())
    assert old.bytes > 0
    assert isinstance(answer, Abort) and "did not negotiate" in answer.reason


async def _ask(port: int, ask: StreamProbe):
    ch = await open_channel(LOCAL, port, kind=ChannelKind.CONTROL, session_id=os.urandom(16),
                            capabilities=STREAM_CAPS)
    await ch.send(ask)
    grant = await asyncio.wait_for(ch.recv(), 10)
    assert isinstance(grant, StreamProbeGrant)
    return ch, grant


def test_a_hostile_probe_request_is_capped_and_bounded_in_time(run):
    """Asked for 1000 streams, an hour and a TiB: granted at most 16 streams,
    5 s and 64 MiB. One probe per connection and per host at a time; a
    stream beyond the grant is refused; streams that never end are closed at
    the granted duration plus the grace, and the scratch memory goes."""
    async def main():
        async with MigrationServer(LOCAL, 0) as srv:
            ch, huge = await _ask(srv.port, StreamProbe(1000, 3_600_000, 1 << 40))
            assert (huge.nstreams, huge.duration_ms, huge.window_bytes) == (
                MAX_STREAMS, dest_probe.MAX_DURATION_MS, dest_probe.MAX_WINDOW_BYTES)
            await ch.send(StreamProbe(1, 100, MIB))
            again = await asyncio.wait_for(ch.recv(), 10)
            other, busy = await _ask(srv.port, StreamProbe(1, 100, MIB))
            await other.close()
            await ch.close()
            await wait_for_async("the first probe's slot freed", lambda: not srv.probe_slot.busy)

            ch, grant = await _ask(srv.port, StreamProbe(1, 200, 2 * MIB))
            assert (grant.nstreams, grant.duration_ms, grant.window_bytes) == (1, 200, 2 * MIB)
            bulk = [await open_channel(LOCAL, srv.port, kind=ChannelKind.BULK,
                                       session_id=ch.conn.session_id,
                                       capabilities={spec.STREAMS_CAPABILITY})
                    for _ in range(2)]
            # The second stream is one too many: the destination drops it at once.
            extra = await asyncio.wait_for(_eof(bulk[1]), 10)
            # The first never gets a page nor an end: the deadline closes it
            # (without one this would wait forever).
            held = await asyncio.wait_for(_eof(bulk[0]), PATIENCE_S / 2)
            await wait_for_async("the stream probe ended", lambda: not srv.probe_slot.busy)
            # StreamProbeEnd after the deadline still gets what arrived: nothing.
            await ch.send(StreamProbeEnd(0, 0))
            result = await asyncio.wait_for(ch.recv(), 10)
            for c in (*bulk, ch):
                await c.close()
            return again, busy, extra, held, result
    again, busy, extra, held, result = run(main())
    assert again.nstreams == 0 and again.reason == "one stream probe per connection"
    assert busy.nstreams == 0 and busy.reason == "another stream probe runs on this host"
    assert extra and held
    assert (result.pages, result.bytes) == (0, 0)


async def _eof(ch) -> bool:
    """True once the destination ended the channel (it sends nothing on a stream)."""
    try:
        return await ch.recv() is None
    except LivemigError:
        return True

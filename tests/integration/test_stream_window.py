"""The post-copy push's window of chunks in flight, end to end.

The push keeps up to PUSH_WINDOW_CHUNKS chunks (stream rounds) open per
stream, sending the next before the previous one's StreamAck. A fast
destination acknowledges a chunk about as soon as it is sent, so whether
two were ever open at once would be a matter of timing: here a relay holds
the push streams' acknowledgements (support/ackgate.py) until a chosen
number of StreamEnds went through, so the window fills for certain. Every
migration arrives bit-identical (support/oracle.py).

* a plain push fills its window (push_in_flight_max == 3) and the timeline
  of post-copy's milestones is in both sides' stats;
* a push stream cut, or with a byte flipped, while several chunks are open
  is a break the two sides recover from;
* page faults are answered on the urgent path while the window is full;
* a push on TLS streams keeps more than one chunk in flight too, and takes
  every ack of a full window that reaches it in one read.

Pre-copy rounds are not windowed: the engine hands the streams one round
and waits for its acknowledgements (SourceStreams.send_round) before
RoundEnd, and leaves the window at 1, so a pre-copy stream's in_flight_max
is 1 by construction; tests/native/test_round_window.py forces a window
on a stream pair instead.
"""
import asyncio

import pytest

from livemig.aio.tls import make_test_pki
from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.postcopy import PUSH_WINDOW_CHUNKS
from livemig.engine.source.session import migrate
from livemig.engine.source.streams import SourceStreams
from livemig.errors import MigrationError
from livemig.native import postcopy
from livemig.native import streams as native_streams
from livemig.native import tls as native_tls
from support.ackgate import AckGate
from support.oracle import Recipe, moved_and_checked
from support.waiting import PATIENCE_S, wait_for_async

pytestmark = [
    pytest.mark.skipif(not postcopy.probe().missing,
                       reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}"),
    pytest.mark.skipif(not native_streams.probe()[0],
                       reason=f"native streams unavailable: {native_streams.probe()[1]}"),
]

LOCAL = "127.0.0.1"
RAW = CodecConfig().without("lz4")
NSTREAMS = 2
PUSH_CONNECTIONS = (4, 5)     # after control, urgent, bulk
PLAIN_PATH = f"native-streams ×{NSTREAMS}"
TLS_PATH = f"{PLAIN_PATH} over TLS"
SOURCE_MILESTONES = ("push_first_queued", "postcopy_complete_received", "complete_sent",
                     "served", "end")
DEST_MILESTONES = ("all_present", "postcopy_complete_sent", "complete_received",
                   "threads_joined", "end")


def _recipe(seed: int) -> Recipe:
    # 48 MiB of random pages: six chunks of 1024 pages per stream, every
    # page RAW, so the window (three) fills with chunks to spare
    return Recipe(memory="48MiB", vcpus=2, workload="uniform", seed=seed,
                  dirty_rate="16MiB/s", fill_seed=seed)


def _config(**extra) -> MigrationConfig:
    return MigrationConfig(**({"mode": "postcopy", "streams": NSTREAMS, "codec": RAW} | extra))


async def _migrate(recipe: Recipe, cfg: MigrationConfig, gate_args: dict, *,
                   during=None, tls=None):
    """Migrate a fresh VM of ``recipe`` through an AckGate; ``during(gate,
    server)`` runs alongside. Returns (source stats, destination stats,
    gate) once the VM was checked against its unmoved twin."""
    server_kw = {} if tls is None else {"ssl": tls.server_context()}
    client_kw = {} if tls is None else {"ssl": tls.client_context(),
                                        "server_hostname": "localhost"}
    async with MigrationServer(LOCAL, 0, config=cfg, **server_kw) as srv:
        async with AckGate(srv.port, gated=PUSH_CONNECTIONS, **gate_args) as gate:
            async def move(vm):
                moving = asyncio.ensure_future(
                    migrate(vm, LOCAL, gate.port, config=cfg, **client_kw))
                try:
                    if during is not None:
                        await during(gate, srv)
                    return await moving
                finally:
                    if not moving.done():
                        moving.cancel()
                        await asyncio.gather(moving, return_exceptions=True)
            stats, arrived = await moved_and_checked(recipe, srv, move)
    return stats, arrived, gate


def _assert_timeline(src, dst):
    s, d = src.postcopy_timeline_ms, dst.postcopy_timeline_ms
    assert set(SOURCE_MILESTONES) <= set(s), s
    assert set(DEST_MILESTONES) <= set(d), d
    assert all(v >= 0 for v in (*s.values(), *d.values()))
    ordered = [s[m] for m in SOURCE_MILESTONES]
    assert ordered == sorted(ordered), s
    assert d["all_present"] <= d["postcopy_complete_sent"] <= d["complete_received"] \
        <= d["threads_joined"] <= d["end"], d
    assert src.to_dict()["postcopy"]["timeline_ms"] == s
    assert src.to_dict()["postcopy"]["push_in_flight_max"] == src.push_in_flight_max


def test_the_push_fills_its_window_of_chunks(run):
    # Acks held until every push stream sent three StreamEnds: the third went
    # out with the first two unacknowledged, so in flight was three for sure.
    stats, dst, gate = run(_migrate(_recipe(61), _config(), {"ends": PUSH_WINDOW_CHUNKS}))
    assert gate.full.is_set() and not gate.met_quiet
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.push_path == dst.push_path == PLAIN_PATH
    assert stats.push_in_flight_max == PUSH_WINDOW_CHUNKS
    assert 0 < dst.pages_pushed <= stats.pages_pushed
    assert stats.recoveries == dst.recoveries == 0
    _assert_timeline(stats, dst)


@pytest.mark.parametrize("action", ["cut", "corrupt"])
def test_a_push_stream_harmed_mid_window_is_a_break_to_recover_from(run, action):
    # The first push stream's acks are held until it sent two StreamEnds;
    # 64 KiB into its third chunk (three open) it is reset, or one byte of
    # that chunk's first page batch is flipped (its checksum then fails at
    # the destination). Either is a break: the two sides reconnect, the
    # source resyncs to what the destination holds and pushes the rest.
    cfg = _config(postcopy_recovery_timeout_s=PATIENCE_S)
    gate_args = {"ends": 2, "harm": action, "victim": PUSH_CONNECTIONS[0],
                 "harm_after_bytes": 64 << 10}
    try:
        stats, dst, gate = run(_migrate(_recipe(62), cfg, gate_args))
    except MigrationError as err:
        # Allowed for a corrupted chunk only: a clean failure that says where
        # the VM is (it never lands with wrong bytes: the oracle above).
        assert action == "corrupt", err
        assert "post" in str(err) and ("source" in str(err) or "destination" in str(err)), err
        return
    assert gate.harmed.is_set()
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.recoveries >= 1 and dst.recoveries >= 1
    assert stats.push_path == PLAIN_PATH
    assert stats.push_in_flight_max >= 2


def _faults_answered(server: MigrationServer) -> int:
    """Pages the destination has had answered on the urgent path so far,
    read live: the native fault thread's own counter (folded into the stats
    only now and then), or the Python path's stats."""
    total = 0
    for incoming in list(server.sessions.values()):
        faults = incoming.faults
        if faults is None:
            continue
        if faults.native is not None:
            total += faults.native.stats()["pages_replied"]
        else:
            total += incoming.stats.pages_requested
    return total


def test_faults_are_served_while_the_push_window_is_full(run):
    # The window stays full (three chunks sent on every push stream, their
    # acks held) until the guest, running at the destination, has faulted on
    # pages not yet there and had them answered on the urgent path.
    seen = {}

    async def during(gate, server):
        await wait_for_async("a full push window on every stream", gate.full.is_set)
        before = _faults_answered(server)
        await wait_for_async("faults answered while the push window is full",
                             lambda: _faults_answered(server) > before)
        seen["answered"] = _faults_answered(server) - before
        assert not any(g.opened.is_set() for g in gate.conns.values())
        gate.open()

    stats, dst, gate = run(_migrate(_recipe(63), _config(),
                                    {"ends": PUSH_WINDOW_CHUNKS, "manual": True},
                                    during=during))
    assert seen["answered"] > 0
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.push_in_flight_max == PUSH_WINDOW_CHUNKS
    assert stats.recoveries == dst.recoveries == 0
    assert dst.pages_requested > 0 and dst.fault_latency.count > 0
    assert dst.fault_latency.percentile(50) > 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def push_streams(monkeypatch):
    """The source's push streams of each channel set, as the session makes them."""
    made = []
    real_push = SourceStreams.push.__func__

    def push(cls, *args, **kw):
        streams = real_push(cls, *args, **kw)
        made.append(streams)
        return streams
    monkeypatch.setattr(SourceStreams, "push", classmethod(push))
    return made


def _first_push_counters(made, key: str, at_least: int) -> bool:
    """Every stream of the first push set has ``key`` >= ``at_least`` (its
    live counters); raises if those streams were already closed."""
    if not made:
        return False
    try:
        return all(s.stats()[key] >= at_least for s in made[0].streams)
    except TypeError:      # the handles were released: that push broke off
        raise AssertionError(f"the push streams ended before their {key} reached "
                             f"{at_least}") from None


def _tls_skip():
    ok, why = native_tls.probe()
    if not ok:
        pytest.skip(f"native TLS streams: {why}")


def test_a_tls_push_keeps_more_than_one_chunk_in_flight(run, pki, push_streams):
    """A relay cannot read TLS frames; it holds every reply on the push
    streams once past their handshake, and the source's own counters say
    when each stream has its three chunks sent and unacknowledged."""
    _tls_skip()

    async def during(gate, server):
        await wait_for_async("three chunks in flight on every TLS push stream",
                             lambda: _first_push_counters(push_streams, "in_flight_max",
                                                          PUSH_WINDOW_CHUNKS))
        assert not any(g.opened.is_set() for g in gate.conns.values())
        gate.open()

    cfg = _config(handshake_timeout_s=10)
    stats, dst, gate = run(_migrate(_recipe(64), cfg, {"tls": True, "manual": True},
                                    during=during, tls=pki))
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.push_path == dst.push_path == TLS_PATH
    assert stats.push_in_flight_max == PUSH_WINDOW_CHUNKS
    assert stats.recoveries == dst.recoveries == 0
    _assert_timeline(stats, dst)


def test_a_tls_push_takes_acks_that_arrive_together(run, pki, push_streams):
    """Acks that reach the source in one read are all taken. OpenSSL reads
    ahead: the first ack's SSL_read also pulls the later acks' records off
    the socket, where poll(2) no longer sees them (a stream thread that
    waited on the socket for them waited for the next ack to arrive, which
    never comes while the window is full). The relay holds every push
    stream's acks until the window is full, lets them go in one write and
    holds again: each stream must close all three chunks with nothing more
    arriving."""
    _tls_skip()

    async def during(gate, server):
        await wait_for_async("three chunks in flight on every TLS push stream",
                             lambda: _first_push_counters(push_streams, "in_flight_max",
                                                          PUSH_WINDOW_CHUNKS))
        await wait_for_async("their three acks held by the relay",
                             lambda: len(gate.conns) == len(PUSH_CONNECTIONS) and all(
                                 g.held_records >= PUSH_WINDOW_CHUNKS
                                 for g in gate.conns.values()))
        gate.pulse()
        await wait_for_async("every stream's three acks taken",
                             lambda: _first_push_counters(push_streams, "rounds",
                                                          PUSH_WINDOW_CHUNKS))
        gate.open()

    cfg = _config(handshake_timeout_s=10)
    stats, dst, gate = run(_migrate(_recipe(65), cfg, {"tls": True, "manual": True},
                                    during=during, tls=pki))
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.push_path == TLS_PATH and stats.recoveries == 0

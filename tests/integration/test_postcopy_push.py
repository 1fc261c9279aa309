"""Post-copy's push of owed pages on the native streams, end to end.

Each migration's guest keeps writing at the destination while its pages
arrive, and the VM must agree with a twin that never moved (support/oracle).
The push path is reported on both sides, a fallback says why, and a push
stream cut or corrupted in the middle of post-copy is a break the two sides
reconnect after.
"""

import pytest

from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.native import postcopy
from livemig.native import streams as native_streams
from support.oracle import Recipe, moved_and_checked
from support.streamsaboteur import StreamSaboteur
from support.waiting import PATIENCE_S

pytestmark = [
    pytest.mark.skipif(not postcopy.probe().missing,
                       reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}"),
    pytest.mark.skipif(not native_streams.probe()[0],
                       reason=f"native streams unavailable: {native_streams.probe()[1]}"),
]

RAW = CodecConfig().without("lz4")
NSTREAMS = 2
# Connections in the order the source opens them: control, urgent, bulk,
# then the push streams (pre-copy streams of a hybrid come after those).
FIRST_PUSH_CONNECTION = 4


def _recipe(seed: int) -> Recipe:
    # random data pages: incompressible, and few zero pages to skip
    return Recipe(memory="16MiB", vcpus=2, workload="uniform", seed=seed,
                  dirty_rate="16MiB/s", fill_seed=seed)


async def _migrate(recipe: Recipe, cfg: MigrationConfig, *, server_cfg=None, saboteur=None):
    async with MigrationServer("127.0.0.1", 0, config=server_cfg or cfg) as srv:
        async def move(vm):
            if saboteur is None:
                return await migrate(vm, "127.0.0.1", srv.port, config=cfg)
            async with saboteur(srv.port) as sab:
                stats = await migrate(vm, "127.0.0.1", sab.port, config=cfg)
                assert sab.harmed.is_set(), "the push stream was never harmed"
                return stats
        return await moved_and_checked(recipe, srv, move)


@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_push_on_streams_matches_unmoved_vm(run, mode):
    # hybrid: one pre-copy round, then post-copy (no convergence at 1 µs)
    hybrid = ({"hybrid_postcopy_after_rounds": 1, "max_downtime_ms": 0.001} if mode == "hybrid"
              else {})
    cfg = MigrationConfig(mode=mode, streams=NSTREAMS, codec=RAW, **hybrid)
    stats, dst = run(_migrate(_recipe(5), cfg))
    assert stats.status == "completed" and dst.status == "completed"
    label = f"native-streams ×{NSTREAMS}"
    assert stats.push_path == label and dst.push_path == label
    # the streams pushed pages (the last chunk may still be on its way when
    # every page is there: the destination places no more than was sent)
    assert 0 < dst.pages_pushed <= stats.pages_pushed
    assert stats.recoveries == dst.recoveries == 0


@pytest.mark.parametrize("source_cfg, server_streams, reason", [
    ({"streams": 0}, NSTREAMS, "native streams disabled by configuration (streams=0)"),
    ({"postcopy_push_streams": False}, NSTREAMS,
     "post-copy push on native streams disabled by configuration"),
    ({}, 0, "the destination does not offer native streams for the post-copy push"),
])
def test_push_falls_back_to_the_event_loop_with_a_reason(run, source_cfg, server_streams,
                                                         reason):
    cfg = MigrationConfig(mode="postcopy", codec=RAW, **{"streams": NSTREAMS, **source_cfg})
    server_cfg = MigrationConfig(streams=server_streams)
    stats, dst = run(_migrate(_recipe(6), cfg, server_cfg=server_cfg))
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.push_path.startswith("python: ") and reason in stats.push_path
    assert dst.push_path.startswith("python: ")
    assert stats.pages_pushed > 0


@pytest.mark.parametrize("action", ["cut", "corrupt"])
def test_a_harmed_push_stream_is_a_break_to_recover_from(run, action):
    # The cap keeps the push going long enough to be harmed in the middle.
    cfg = MigrationConfig(mode="postcopy", streams=NSTREAMS, codec=RAW,
                          max_bandwidth_bps=16 << 20, postcopy_recovery_timeout_s=PATIENCE_S)

    def saboteur(port):
        return StreamSaboteur(port, victim=FIRST_PUSH_CONNECTION, after_bytes=1 << 20,
                              action=action)

    stats, dst = run(_migrate(_recipe(7), cfg, saboteur=saboteur))
    assert stats.status == "completed" and dst.status == "completed"
    assert stats.recoveries >= 1 and dst.recoveries >= 1
    assert stats.push_path == f"native-streams ×{NSTREAMS}"

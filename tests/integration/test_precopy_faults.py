"""Pre-copy under adversity, under both event loops.

The peer vanishes in each phase — the handshake, mid-round, at switchover
before Verified, after Verified before Commit — through the fault proxy in
front of a real destination, or a scripted fake destination speaking the
protocol over a real channel; destinations that lie or talk garbage. Until
Commit the source must resume its VM, which must still match a twin that
never moved, and the migration must succeed on a second try. A destination
server must survive every hostile peer and keep serving its other migrations.
"""
import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from livemig.aio.channel import Channel, serve_channels
from livemig.config import MigrationConfig
from livemig.engine.destination.server import Arrival, MigrationServer
from livemig.errors import HandoverInDoubt, MigrationError
from livemig.protocol import (Accept, Commit, MigrationOffer, PageBatch, RoundAck, RoundEnd,
                              Switchover, Verified, VerifyFailed)
from livemig.engine.source.session import migrate
from support.faultproxy import FaultProxy
from support.oracle import Recipe, assert_arrival_matches_unmoved, assert_matches_unmoved
from support.waiting import wait_for_async

LOCAL = "127.0.0.1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=21, dirty_rate="24MiB/s")
RANDOM = Recipe("16MiB", 2, "uniform", seed=22, dirty_rate="24MiB/s", fill_seed=1)
ENDED = ("completed", "failed", "cancelled")
OUTCOME_WINDOW_S = 3.0


class FakeDestination:
    """A destination that follows the protocol up to ``vanish_at``, then drops
    the connection (or lies, for ``vanish_at="lie"`` / ``"bad-ack"``)."""

    def __init__(self, vanish_at: str):
        self.vanish_at = vanish_at
        self.seen: list[str] = []

    async def __call__(self, ch) -> None:
        if self.seen:
            ch.abort()      # gone: a reconnection finds no one to answer it
            return
        offer = await ch.recv()
        self.seen.append(type(offer).__name__)
        assert isinstance(offer, MigrationOffer)
        if self.vanish_at == "offer":
            ch.abort()
            return
        await ch.send(Accept())
        batches = pages = 0
        while (ev := await ch.recv()) is not None:
            self.seen.append(type(ev).__name__)
            if isinstance(ev, PageBatch):
                batches += 1
                pages += ev.npages
                if self.vanish_at == "round" and batches == 2:
                    ch.abort()
                    return
            elif isinstance(ev, RoundEnd):
                wrong = 1 if self.vanish_at == "bad-ack" else 0
                await ch.send(RoundAck(ev.round, pages + wrong))
                pages = 0
            elif isinstance(ev, Switchover):
                if self.vanish_at == "switchover":
                    ch.abort()
                elif self.vanish_at == "lie":
                    await ch.send(VerifyFailed(ev.digest, bytes(16), "we do not like it"))
                elif self.vanish_at == "verified":
                    await ch.send(Verified())
                    ch.abort()  # gone before Commit arrives
                return


async def _migrate_again_and_check(vm, recipe) -> None:
    """The source VM, after a failed attempt, moves fine to a real destination."""
    async with MigrationServer(LOCAL, 0) as server:
        stats = await migrate(vm, LOCAL, server.port)
        await assert_arrival_matches_unmoved(server, recipe)
    assert stats.status == "completed"


@pytest.mark.parametrize("vanish_at,phase,match", [
    ("offer", "handshake", "closed|lost|reset"),
    ("round", "precopy", "closed|lost|reset"),
    ("bad-ack", "precopy", "acked as round"),
    ("switchover", "switchover", "closed|lost|reset"),
    ("lie", "switchover", "we do not like it"),
])
def test_source_resumes_when_the_destination_fails_before_verified(run, vanish_at, phase,
                                                                   match):
    async def main():
        fake = FakeDestination(vanish_at)
        vm = RECIPE.build()
        try:
            vm.start()
            await asyncio.sleep(0.05)   # the guest dirties memory; nothing depends on how much
            async with await serve_channels(LOCAL, 0, fake) as server:
                with pytest.raises(MigrationError, match=match) as info:
                    await migrate(vm, LOCAL, server.port)
            err = info.value
            assert not isinstance(err, HandoverInDoubt)
            assert err.source_resumed and err.phase == phase, (err.phase, str(err))
            assert err.stats.status == "failed" and err.stats.error
            assert vm.running
            await _migrate_again_and_check(vm, RECIPE)
        finally:
            vm.close()
    run(main())


def test_destination_gone_after_verified_leaves_the_handover_in_doubt(run):
    """After Verified the source has sent Commit and cannot know whether it
    landed: it must not resume on its own. The destination never got Commit,
    so an operator may resume the VM here, and it is intact."""
    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            await asyncio.sleep(0.05)   # the guest dirties memory; nothing depends on how much
            async with await serve_channels(LOCAL, 0, FakeDestination("verified")) as server:
                # The source tries to learn the outcome for ack_timeout_s; the
                # fake is gone for good, so a short window ends in the same doubt.
                with pytest.raises(HandoverInDoubt) as info:
                    await migrate(vm, LOCAL, server.port,
                                  config=MigrationConfig(ack_timeout_s=OUTCOME_WINDOW_S))
            assert not info.value.source_resumed
            assert "handover in doubt" in info.value.stats.error
            assert not vm.running
            steps = vm.steps()
            await asyncio.sleep(0.02)   # a window for a wrongly running vCPU to show
            assert vm.steps() == steps, "an in-doubt VM stays paused"
            vm.resume()
            await _migrate_again_and_check(vm, RECIPE)
        finally:
            vm.close()
    run(main())


@pytest.mark.parametrize("direction,cut_bytes,phase", [
    ("down", 40, "handshake"),        # the Welcome is cut short
    ("up", 3 << 20, "precopy"),       # mid round 0 (16 MiB of random pages)
])
def test_connection_cut_by_the_proxy_source_resumes_server_lives_on(run, direction, cut_bytes,
                                                                    phase):
    async def main():
        vm = RANDOM.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0) as server, \
                    FaultProxy(LOCAL, server.port, cut_after_bytes=cut_bytes,
                               cut_direction=direction) as proxy:
                with pytest.raises(MigrationError) as info:   # without resumable pre-copy
                    await migrate(vm, LOCAL, proxy.port,
                                  config=MigrationConfig(precopy_resume_timeout_s=0))
                assert proxy.cuts == 1
                assert info.value.source_resumed and info.value.phase == phase
                assert vm.running
                # the same server, directly: the failed migration left nothing behind
                stats = await migrate(vm, LOCAL, server.port)
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RANDOM)
                assert server.completed.empty()
        finally:
            vm.close()
    run(main())


def test_garbage_peers_never_hurt_a_destination_or_its_other_migrations(run):
    async def garbage(port: int, payload: bytes) -> None:
        reader, writer = await asyncio.open_connection(LOCAL, port)
        writer.write(payload)
        try:
            await writer.drain()
            await asyncio.wait_for(reader.read(), 3)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        writer.close()

    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0) as server:
                real = asyncio.create_task(migrate(vm, LOCAL, server.port))
                hello_then_noise = b"LMIG" + os.urandom(4000)
                await asyncio.gather(*(garbage(server.port, p) for p in (
                    os.urandom(1 << 16), b"GET / HTTP/1.1\r\n\r\n", hello_then_noise, b"")))
                stats = await real
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RECIPE)
                assert server.errors, "the garbage peers should have been recorded"
        finally:
            vm.close()
    run(main())


def test_a_garbage_destination_fails_the_handshake_and_the_source_resumes(run):
    async def main():
        async def babble(reader, writer):
            writer.write(os.urandom(256))
            await writer.drain()
            await reader.read(1 << 16)
            writer.close()
        listener = await asyncio.start_server(babble, LOCAL, 0)
        vm = RECIPE.build()
        try:
            vm.start()
            port = listener.sockets[0].getsockname()[1]
            with pytest.raises(MigrationError) as info:
                await migrate(vm, LOCAL, port)
            assert info.value.phase == "handshake" and info.value.source_resumed
            assert vm.running
            await _migrate_again_and_check(vm, RECIPE)
        finally:
            vm.close()
            listener.close()
            await listener.wait_closed()
    run(main())


def test_link_lost_right_after_commit_the_destination_still_owns_the_vm(run, monkeypatch):
    """The link is reset the moment Commit leaves the source: the destination
    has resumed the VM and cannot say Resumed. The VM must still be handed to
    the host (not left running where nobody owns it), and it is intact; the
    source learns that by reconnecting and releases its copy."""
    original_send = Channel.send

    async def send_then_die(self, event):
        await original_send(self, event)
        if isinstance(event, Commit):
            # Commit is in the peer's socket already (loopback); reset now,
            # before the peer has read it and could answer Resumed
            self.abort()

    monkeypatch.setattr(Channel, "send", send_then_die)

    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            await asyncio.sleep(0.05)   # the guest dirties memory; nothing depends on how much
            async with MigrationServer(LOCAL, 0) as server:
                stats = await migrate(vm, LOCAL, server.port)
                assert stats.status == "completed" and stats.recoveries == 1
                assert not vm.running
                arrival, moved = await server.completed.get()
            assert arrival.status == "completed" and moved.running
            try:
                assert_matches_unmoved(moved, RECIPE)
            finally:
                moved.close()
        finally:
            vm.close()
    run(main())


@settings(max_examples=14, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.tuples(st.just("up"), st.integers(0, 30_000)),
                     st.tuples(st.just("down"), st.integers(0, 240))))
def test_wherever_the_link_is_cut_the_vm_runs_on_exactly_one_side(run, cut):
    """Cut the stream at any byte, in either direction: the migration either
    completes, fails with the source resumed, or is in doubt with the source
    paused. Never do both sides run the VM, and whichever runs it is intact."""
    direction, cut_bytes = cut

    arrivals = []

    def host(name, peer, stats):
        arrivals.append(Arrival(name, peer, stats))
        return arrivals[-1]

    async def main():
        vm = RECIPE.build()
        moved = None
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0, on_incoming=host) as server, \
                    FaultProxy(LOCAL, server.port, cut_after_bytes=cut_bytes,
                               cut_direction=direction) as proxy:
                try:
                    stats = await migrate(vm, LOCAL, proxy.port)
                    outcome = "completed"
                except HandoverInDoubt:
                    outcome = "in doubt"
                except MigrationError as exc:
                    assert exc.source_resumed
                    outcome = "resumed"
                # The destination reaches its own verdict (in doubt, it may
                # still be resuming): wait for it. An offer the cut came
                # before never became an arrival.
                await wait_for_async("the destination's verdict on the VM",
                                     lambda: all(a.status in ENDED for a in arrivals))
                if any(a.status == "completed" for a in arrivals):
                    _, moved = await server.completed.get()
            if outcome == "completed":
                # A cut in the rounds is resumed (resumable pre-copy).
                assert moved is not None and proxy.cuts <= stats.precopy_resumes
            if outcome == "resumed":
                assert vm.running and moved is None
            if outcome == "in doubt":
                assert not vm.running
                if moved is None:       # Commit never landed: the source may resume
                    vm.resume()
            assert vm.running != (moved is not None), "the VM runs on both sides or none"
            assert_matches_unmoved(moved or vm, RECIPE)
        finally:
            if moved is not None:
                moved.close()
            vm.close()
    run(main())

"""Orderings around the post-copy handover that used to leave a VM in doubt, forced.

A post-copy source that saw a break after Commit reconnects with the same
session id. Once, a destination refused that reconnection ("no migration
with this session id is waiting to be resumed here": code 4) whenever its
session was not, or no longer, running post-copy — and the source declared
the handover in doubt (2 of 6 post-copy runs of an idle guest in
``bench convergence --profile quick``). Each test forces one ordering with a
FrameProxy, or with channels that deliver in a chosen loop turn, and checks
that the VM ends in exactly one place, identical to a twin, without doubt:

1. The reconnection arrives while Commit is still on its way (held at the
   proxy past the source's wait for Resumed): the destination decides from
   what it has read — Commit never came — discards its copy and says so;
   the source resumes. The held Commit, delivered afterwards, resumes
   nothing.
2. The reconnection arrives when every page has landed and the destination
   waits only for Complete (PostcopyComplete lost in a black hole): the
   destination completes, and answers that very connection with the outcome
   (one reconnection, not a second attempt after an unanswered one).
3. The destination closes the urgent channel in the same loop turn in which
   the source's Complete goes out (a fast, idle guest's post-copy ends
   within a millisecond): the source's serve ends normally, no reconnection.
"""
import asyncio

import numpy as np
import pytest

from livemig.codec.encoder import BatchEncoder
from livemig.config import MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.postcopy import PostcopySender
from livemig.engine.source.session import MigrationControl, migrate
from livemig.errors import MigrationError
from livemig.native import postcopy
from livemig.protocol import Complete, OutcomeCode, PostcopyComplete
from livemig.stats import MigrationStats
from support.frameproxy import HOLD, Fault, FrameProxy
from support.oracle import Recipe, assert_matches_unmoved
from support.waiting import wait_for_async

pytestmark = pytest.mark.skipif(not postcopy.probe().missing,
                                reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")

LOCAL = "127.0.0.1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=61, dirty_rate="16MiB/s")
# The source waits briefly (for Resumed, or for a silent link); the destination
# waits long (for Commit, or for Complete): the source's reconnection always
# reaches a destination that is still waiting.
SOURCE = dict(mode="postcopy", ack_timeout_s=1, handshake_timeout_s=5,
              postcopy_recovery_timeout_s=20)
DESTINATION = dict(mode="postcopy", ack_timeout_s=60, postcopy_recovery_timeout_s=20)


def test_reconnection_before_the_destination_read_commit(run):
    async def scenario():
        vm = RECIPE.build()
        vm.start()
        control = MigrationControl()
        try:
            async with MigrationServer(LOCAL, 0, config=MigrationConfig(**DESTINATION)) as server, \
                    FrameProxy(LOCAL, server.port, Fault(HOLD, "Commit", "up")) as proxy:
                with pytest.raises(MigrationError) as failed:
                    await migrate(vm, LOCAL, proxy.port, config=MigrationConfig(**SOURCE),
                                  control=control)
                assert failed.value.source_resumed, str(failed.value)
                assert "Commit never reached it" in str(failed.value)
                assert proxy.fired.is_set() and proxy.accepted > 3      # it reconnected
                record = server.outcomes.get(control.session_id)
                assert record is not None and record.code is OutcomeCode.NOT_COMMITTED
                # The Commit that was on its way arrives now: nothing resumes.
                proxy.release(True)
                await wait_for_async("the destination's session to end",
                                     lambda: not server.sessions)
                await asyncio.sleep(0.2)
                assert server.completed.empty()
            assert vm.running
            assert_matches_unmoved(vm, RECIPE)
        finally:
            vm.close()
    run(scenario())


def test_reconnection_once_every_page_landed_is_answered_at_once(run):
    async def scenario():
        vm = RECIPE.build()
        vm.start()
        moved = None
        try:
            async with MigrationServer(LOCAL, 0, config=MigrationConfig(**DESTINATION)) as server, \
                    FrameProxy(LOCAL, server.port,
                               Fault("black-hole", "PostcopyComplete", "down")) as proxy:
                # a keepalive slow enough that a loaded machine never trips it
                # before the black hole does
                patient = MigrationConfig(**{**SOURCE, "ack_timeout_s": 4})
                moving = asyncio.ensure_future(migrate(vm, LOCAL, proxy.port, config=patient))
                await proxy.fired.wait()
                before = proxy.accepted
                stats = await moving
                assert stats.status == "completed" and stats.recoveries == 1
                # one resumed control channel, answered: no second attempt
                assert proxy.accepted == before + 1, (before, proxy.accepted)
                _, moved = await server.completed.get()
            assert not vm.running and moved.running
            assert_matches_unmoved(moved, RECIPE)
        finally:
            vm.close()
            if moved is not None:
                moved.close()
    run(scenario())


class _Channel:
    """Just enough of a Channel for PostcopySender.serve: a queue to receive
    from, a list of what was sent, and an action run as an event is sent."""

    def __init__(self, events=(), on_send=None):
        self.queue: asyncio.Queue = asyncio.Queue()
        for e in events:
            self.queue.put_nowait(e)
        self.sent = []
        self.on_send = on_send

    async def recv(self):
        return await self.queue.get()

    async def send(self, event):
        self.sent.append(event)
        if self.on_send is not None:
            self.on_send(event)


def test_urgent_channel_closed_as_complete_goes_out_is_the_end(run):
    async def scenario():
        vm = RECIPE.build()
        try:
            encoder = BatchEncoder(vm.memory, MigrationConfig(mode="postcopy").codec_for_mode)
            encoder.set_postcopy()
            nothing_owed = np.zeros(vm.memory.npages, dtype=bool)
            sender = PostcopySender(encoder, nothing_owed, MigrationStats(), round_index=1,
                                    batch_bytes=1 << 20)
            urgent = _Channel()
            digest = encoder.sent_hashes.digest()
            # The destination closes the urgent channel as it reads Complete:
            # here, in the very turn Complete is sent.
            control = _Channel([PostcopyComplete(0, digest)],
                               on_send=lambda e: isinstance(e, Complete)
                               and urgent.queue.put_nowait(None))
            await sender.serve(control, urgent, _Channel(), silence_s=30)
            assert [type(e) for e in control.sent] == [Complete]
        finally:
            vm.close()
    run(scenario())

"""Resumable pre-copy against hostile peers, under both event loops.

A destination that, when the source reconnects after a link break, answers
with a lying or malformed ResumeReport — pages never sent, a round from the
future, landed pages that did not land, another guest's page count, an
oversized or truncated frame, another session's Outcome, a message of the
wrong type, silence, or a report followed by a close every time. The source
never trusts it blindly: it either resends what it cannot prove landed, so
that the destination's final verification catches the lie before Commit, or
fails in pre-copy saying where the VM is. Either way the VM runs on at the
source, identical to a twin that never moved, within bounded time.

The mirror case: a hostile source reopening control channels of sessions it
does not own, repeatedly, with garbage, or going silent each time on one it
does own. The destination refuses with code SESSION, frees a held copy only
per its rules (never past its hold time) and keeps serving other migrations.
"""
import asyncio
import dataclasses
import os
import struct

import pytest

from livemig.aio.channel import open_channel, serve_channels
from livemig.config import MigrationConfig
from livemig.engine.destination import resume as dest_resume
from livemig.engine.destination.admission import MemoryBudget
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.errors import ConnectionLost, HandshakeRefused, HandoverInDoubt, MigrationError
from livemig.protocol import (ChannelKind, MigrationOffer, Mode, Outcome, OutcomeCode,
                              RefuseCode, ResumeReport, RoundAck, RoundStart)
from livemig.protocol.spec import MESSAGE_IDS, NO_ROUND, RESUME_PRECOPY_CAPABILITY as RESUME_PRECOPY
from livemig.protocol.wire import DEFAULT_MAX_PAYLOAD_BYTES
from support.frameproxy import Fault, FrameProxy
from support.hostile import frame, hello_body
from support.oracle import Recipe, assert_arrival_matches_unmoved, assert_matches_unmoved
from support.resumefakes import ResumeScript, send_raw
from support.waiting import wait_for_async

LOCAL = "127.0.0.1"
# 4 MiB of random bytes: round 0 is 64 batches of 64 KiB
RECIPE = Recipe("4MiB", 1, "uniform", seed=41, dirty_rate="1MiB/s", fill_seed=5)
NPAGES = (4 << 20) // 4096
BATCH_BYTES = 64 << 10
REPORT_PREFIX = struct.Struct("<IIQ")    # acked_round, reserved, npages
ABORT_ID, REFUSE_ID = MESSAGE_IDS["Abort"], MESSAGE_IDS["Refuse"]


def _config(**kw) -> MigrationConfig:
    return MigrationConfig(**({"streams": 0, "batch_bytes": BATCH_BYTES,
                               "switchover_timeout_s": 10.0,
                               "precopy_resume_timeout_s": 60.0} | kw))


def _report_body(acked_round: int, npages: int, bitmap: bytes) -> bytes:
    return REPORT_PREFIX.pack(acked_round, 0, npages) + bitmap


def _assert_runs_on_at_the_source(err: MigrationError, vm, *, phase: str, match: str) -> None:
    assert not isinstance(err, HandoverInDoubt)
    assert err.phase == phase and err.source_resumed, (err.phase, str(err))
    text = str(err)
    assert match in text, text
    assert "runs on there" in text or "runs on at the source" in text, text
    assert err.stats.status == "failed"
    assert vm.running
    assert_matches_unmoved(vm, RECIPE)


# -- a scripted destination: what it says when the source comes back ----------------------------
async def _future_round(ch, attempt):
    await ch.send(ResumeReport(7, NPAGES, bytes(NPAGES // 8)))


async def _another_guest(ch, attempt):
    """A report for another session's guest: twice as many pages."""
    await ch.send(ResumeReport(NO_ROUND, 2 * NPAGES, bytes(2 * NPAGES // 8)))


async def _truncated(ch, attempt):
    send_raw(ch, "ResumeReport", _report_body(NO_ROUND, NPAGES, bytes(NPAGES // 8 - 1)))


async def _oversized(ch, attempt):
    """A header announcing more than the source accepts; the body never comes."""
    send_raw(ch, "ResumeReport", _report_body(NO_ROUND, NPAGES, b""),
             length=DEFAULT_MAX_PAYLOAD_BYTES + 1)


async def _garbage_bits(ch, attempt):
    """A bitmap with padding bits set past npages (NPAGES + 3 pages claimed)."""
    send_raw(ch, "ResumeReport", _report_body(NO_ROUND, NPAGES + 3, bytes(NPAGES // 8) + b"\xff"))


async def _wrong_type(ch, attempt):
    send_raw(ch, RoundAck(0, NPAGES))


async def _other_sessions_outcome(ch, attempt):
    """The record of another session: 'committed, running here'."""
    await ch.send(Outcome(OutcomeCode.COMMITTED, os.urandom(16), "resumed here; the VM is "
                          "this host's"))


async def _ended_outcome(ch, attempt):
    """The session ended there unresumed (true of a destination that gave up)."""
    await ch.send(Outcome(OutcomeCode.NOT_COMMITTED, bytes(16), "the session ended here before "
                          "Commit arrived"))


async def _silence(ch, attempt):
    pass


async def _report_then_close(ch, attempt):
    """An honest-looking report (nothing held), then the link drops again."""
    await ch.send(ResumeReport(NO_ROUND, NPAGES, bytes(NPAGES // 8)))
    await asyncio.sleep(0)
    ch.abort()


async def _move_to_script(answer, **config) -> tuple[MigrationError, ResumeScript, object]:
    script = ResumeScript(answer)
    vm = RECIPE.build()
    try:
        vm.start()
        async with await serve_channels(LOCAL, 0, script,
                                        capabilities={RESUME_PRECOPY}) as server:
            with pytest.raises(MigrationError) as info:
                await migrate(vm, LOCAL, server.port, config=_config(**config))
        assert script.broke.is_set() and script.resumes >= 1
        return info.value, script, vm
    except BaseException:
        vm.close()
        raise


@pytest.mark.parametrize("answer, match", [
    (_future_round, "acknowledges round 7, which was never sent"),
    (_another_guest, f"covers {2 * NPAGES} pages, but the guest has {NPAGES}"),
    (_truncated, "does not cover"),
    (_garbage_bits, "padding bits"),
    (_oversized, "payload"),
    (_wrong_type, "RoundAck"),
    (_other_sessions_outcome, "answered that the session was committed there, but the "
                              "pre-copy never reached the switchover"),
    (_ended_outcome, "could not be resumed: the destination ended the session (the session "
                     "ended here before Commit arrived)"),
], ids=["future-round", "another-guest", "truncated", "padding-bits", "oversized",
        "wrong-type", "another-sessions-outcome", "ended-there"])
def test_a_report_that_cannot_be_true_fails_the_precopy_at_once(run, answer, match):
    """One reconnect, no retry: the report itself proves the peer wrong."""
    async def main():
        err, script, vm = await _move_to_script(answer)
        try:
            assert script.resumes == 1
            _assert_runs_on_at_the_source(err, vm, phase="precopy", match=match)
        finally:
            vm.close()
    run(main())


@pytest.mark.parametrize("answer, match, config", [
    # The test sets the silence it waits out: 0.5 s per answer, 2 s in all.
    (_silence, "could not be resumed: not within 2 s (last: timed out waiting for resume report",
     {"handshake_timeout_s": 0.5, "precopy_resume_timeout_s": 2.0}),
    (_report_then_close, "could not be resumed: not within 2 s",
     {"precopy_resume_timeout_s": 2.0}),
], ids=["silence", "report-then-close"])
def test_a_destination_that_never_lets_the_rounds_go_on_is_given_up_in_bounded_time(
        run, answer, match, config):
    """A peer that answers nothing, or answers and breaks again before it
    acknowledges any round, gets the resume window once — not once per
    reconnect — and then the source gives up with the VM running here."""
    async def main():
        err, script, vm = await _move_to_script(answer, **config)
        try:
            _assert_runs_on_at_the_source(err, vm, phase="precopy", match=match)
            # Backoff between reconnects (20 ms ... 1 s): a handful in 2 s.
            assert script.resumes < 30, script.resumes
        finally:
            vm.close()
    run(main())


# -- a real destination whose report lies: its own verification catches it -----------------------
IDLE = Recipe("16MiB", 1, "idle", seed=42, fill_seed=6)


def _claim_all_landed(true: ResumeReport) -> ResumeReport:
    return dataclasses.replace(true, landed=b"\xff" * len(true.landed))


def _claim_round_acked(true: ResumeReport) -> ResumeReport:
    """Round 0, half of it here, reported applied in full (nothing of round 1
    landed, which is true: it never started)."""
    return dataclasses.replace(true, acked_round=0, landed=bytes(len(true.landed)))


def _claim_unsent_pages(true: ResumeReport) -> ResumeReport:
    return dataclasses.replace(true, landed=b"\xff" * len(true.landed))


@pytest.mark.parametrize("fault, lie, phase, match", [
    (Fault("cut", "PageBatch", "up", occurrence=100), _claim_all_landed, "switchover",
     "digest"),
    (Fault("cut", "PageBatch", "up", occurrence=100), _claim_round_acked, "switchover",
     "digest"),
    # Round 0 is acked (the ack lost): a claim on round 1, never sent, is refused.
    (Fault("cut", "RoundAck", "down", occurrence=1), _claim_unsent_pages, "precopy",
     "claims pages of round 1 or later that no such round carried"),
], ids=["pages-that-did-not-land", "a-round-only-half-applied", "pages-never-sent"])
def test_a_real_destination_lying_in_its_report_never_gets_the_vm(run, monkeypatch, fault, lie,
                                                                  phase, match):
    true_report = dest_resume.RoundProgress.report
    monkeypatch.setattr(dest_resume.RoundProgress, "report", lambda self: lie(true_report(self)))

    async def main():
        vm = IDLE.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0, config=MigrationConfig(idle_timeout_s=5.0)
                                       ) as server, \
                    FrameProxy(LOCAL, server.port, fault) as proxy:
                with pytest.raises(MigrationError) as info:
                    await migrate(vm, LOCAL, proxy.port, config=_config())
                assert proxy.fired.is_set()
                await wait_for_async("the destination to free its copy",
                                     lambda: not server.sessions)
                assert server.completed.empty()
            err = info.value
            assert not isinstance(err, HandoverInDoubt)
            assert err.phase == phase and err.source_resumed, (err.phase, str(err))
            assert match in str(err) and "runs on there" in str(err), str(err)
            assert vm.running
            assert_matches_unmoved(vm, IDLE)
        finally:
            vm.close()
    run(main())


# -- the mirror: a hostile source against a real destination ------------------------------------
async def _resume_hello(port: int, session_id: bytes, kind=ChannelKind.CONTROL):
    return await open_channel(LOCAL, port, kind=kind, session_id=session_id, resume=True,
                              capabilities=frozenset({RESUME_PRECOPY}), timeout_s=30.0)


def test_resumes_of_sessions_not_owned_are_refused_while_a_migration_goes_on(run):
    """Hundreds of resumed Hellos for made-up sessions, on every channel kind,
    some followed by garbage, while a real migration runs through the same
    server: each is refused (SESSION or CHANNEL), nothing is held, and the
    real migration arrives intact."""
    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            budget = MemoryBudget(1 << 30)
            async with MigrationServer(LOCAL, 0, budget=budget) as server:
                real = asyncio.ensure_future(migrate(vm, LOCAL, server.port, config=_config()))
                codes = []
                for i in range(200):
                    kind = (ChannelKind.CONTROL, ChannelKind.BULK, ChannelKind.URGENT)[i % 3]
                    try:
                        ch = await _resume_hello(server.port, os.urandom(16), kind)
                    except HandshakeRefused as exc:
                        codes.append(exc.code)
                    else:
                        await ch.close()
                        raise AssertionError(f"a resumed {kind.name} channel was welcomed")
                for _ in range(20):     # garbage right behind the Hello
                    reader, writer = await asyncio.open_connection(LOCAL, server.port)
                    body = bytearray(hello_body())
                    body[5] = 1         # resume
                    writer.write(frame("Hello", 0, bytes(body)) + os.urandom(4096))
                    answer = await reader.read()    # one frame, then end of stream
                    assert answer[:4] == b"LMIG" and answer[6] in (ABORT_ID, REFUSE_ID), answer
                    writer.close()
                assert set(codes) == {RefuseCode.SESSION, RefuseCode.CHANNEL}
                assert codes.count(RefuseCode.SESSION) == 67
                stats = await real
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RECIPE)
                assert not server.sessions and budget.reserved_bytes == 0
        finally:
            vm.close()
    run(main())


async def _held_session(server, npages: int) -> bytes:
    """A session of ours at ``server``: offered, a few batches of round 0,
    then the link dropped — the destination holds it for its source."""
    session_id = os.urandom(16)
    ch = await open_channel(LOCAL, server.port, kind=ChannelKind.CONTROL, session_id=session_id,
                            capabilities=frozenset({RESUME_PRECOPY}), timeout_s=30.0)
    await ch.send(MigrationOffer({"name": "held", "memory_bytes": npages * 4096, "vcpus": 1,
                                  "workload": "idle"}, Mode.PRECOPY, npages))
    assert type(await ch.recv()).__name__ == "Accept"
    await ch.send(RoundStart(0))
    ch.abort()
    await wait_for_async("the destination to hold the session",
                         lambda: session_id in server.sessions)
    return session_id


def test_a_source_that_comes_back_and_says_nothing_cannot_hold_a_copy_forever(run):
    """The owner of a held session reconnects again and again and never sends
    a round: the copy is freed once the hold time since the break is spent,
    not held anew on every reconnect. (The test sets the silences it waits
    out: a 1 s hold and a 0.5 s idle timeout.)"""
    async def main():
        budget = MemoryBudget(1 << 30)
        config = MigrationConfig(precopy_resume_timeout_s=1.0, idle_timeout_s=0.5)
        async with MigrationServer(LOCAL, 0, budget=budget, config=config) as server:
            session_id = await _held_session(server, NPAGES)
            assert budget.reserved_bytes == NPAGES * 4096
            reconnects = 0
            while session_id in server.sessions:
                try:
                    ch = await _resume_hello(server.port, session_id)
                except HandshakeRefused:
                    break
                except ConnectionLost:
                    continue
                reconnects += 1
                report = await ch.recv()
                if isinstance(report, Outcome):
                    await ch.close()
                    break
                assert isinstance(report, ResumeReport) and report.acked_round == NO_ROUND
                with pytest.raises(ConnectionLost):   # silence: the idle timeout drops us
                    await ch.recv()
                await ch.close()
                assert reconnects < 100, "the held copy outlived every hold time"
            await wait_for_async("the held copy to be freed",
                                 lambda: not server.sessions and budget.reserved_bytes == 0)
            record = server.outcomes.get(session_id)
            assert record is not None and record.code == OutcomeCode.NOT_COMMITTED
            ch = await _resume_hello(server.port, session_id)   # from now on: the outcome
            answer = await ch.recv()
            await ch.close()
            assert isinstance(answer, Outcome) and answer.code == OutcomeCode.NOT_COMMITTED
    run(main())


def test_garbage_on_a_resumed_channel_ends_only_that_session(run):
    """The owner of a held session comes back and sends garbage after the
    report: a protocol error is final — the copy is freed, its outcome is
    NOT_COMMITTED — and a real migration through the same server completes."""
    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            budget = MemoryBudget(1 << 30)
            async with MigrationServer(LOCAL, 0, budget=budget) as server:
                session_id = await _held_session(server, NPAGES)
                ch = await _resume_hello(server.port, session_id)
                assert isinstance(await ch.recv(), ResumeReport)
                ch._transport.write(os.urandom(8192))
                # (The session leaves ``sessions`` before its memory is freed.)
                await wait_for_async("the session to end and free its copy",
                                     lambda: not server.sessions and budget.reserved_bytes == 0)
                await ch.close()
                assert server.outcomes.get(session_id).code == OutcomeCode.NOT_COMMITTED
                stats = await migrate(vm, LOCAL, server.port, config=_config())
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RECIPE)
        finally:
            vm.close()
    run(main())


def test_a_flood_of_resumed_channels_for_one_session_leaves_one_open(run):
    """The owner of a held session opens twenty resumed control channels at
    once: the newest one taken up carries the rounds on, and every other one
    is closed while the session still holds its copy — not kept open until
    the session ends."""
    async def main():
        config = MigrationConfig(precopy_resume_timeout_s=600.0, idle_timeout_s=600.0)
        async with MigrationServer(LOCAL, 0, config=config) as server:
            session_id = await _held_session(server, NPAGES)
            channels = await asyncio.gather(*(_resume_hello(server.port, session_id)
                                              for _ in range(20)))
            await wait_for_async("every resumed channel but one to be closed",
                                 lambda: sum(not ch.closed for ch in channels) == 1)
            survivor = next(ch for ch in channels if not ch.closed)
            report = await survivor.recv()
            assert isinstance(report, ResumeReport) and report.acked_round == NO_ROUND
            assert session_id in server.sessions
            for ch in channels:
                await ch.close()
    run(main())

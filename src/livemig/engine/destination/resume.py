"""A pre-copy the destination holds while its source reconnects after a link break.

Theory of operation
-------------------
During the pre-copy rounds the destination applies pages in place. When the
control channel breaks (reset, end of stream, silence) before Switchover and
both sides agreed on the "resume-precopy" capability, the session is not torn
down: it waits, with its guest memory and its admission reservation
(docs/limits.md) still held, for a control channel reopened with
``Hello(resume=True)`` and the same session id, for at most
``precopy_resume_timeout_s``. That is the machinery post-copy recovery uses:
the server routes the resumed Hello to the session (``adopt``), which aborts
the old channel, so a source that noticed the break first is served at once.
The session answers ``ResumeReport`` from its :class:`RoundProgress` (the last
round it acknowledged, and the pages of the round after it that landed), and
the rounds go on on the new channel. If the source does not come back in
time the session fails as without resume: memory freed here, the outcome
NOT_COMMITTED recorded, the VM running at the source.

A resumed Hello naming a session that is not waiting is answered as before
(its outcome, or Refuse "no migration with this session id"); the report is
bounded by the guest size agreed in the offer (one bit per page).

On the native bulk streams the threads mark landed pages in the progress's
bitmap themselves; a break stops and joins every thread before the report
(a stream that refused a frame ends the session instead), and the source
opens a fresh set of streams on the resumed session
(:meth:`DestStreams.restart`). What the report says is settled: it is
cleared once sent, so the next report speaks only of what landed since.
"""
from __future__ import annotations

import asyncio

import numpy as np

from ...aio.channel import Channel
from ...errors import MigrationError
from ...protocol import Mode, Phase, ResumeReport
from ...protocol.spec import NO_ROUND, RESUME_PRECOPY_CAPABILITY as RESUME_PRECOPY


class RoundProgress:
    """Which round the destination acknowledged last and which pages landed
    since: since that round ended, or since the last report, whichever came
    later. ``held`` (the session's pages-landed-so-far array, if given)
    receives every landed page at each of those two moments.

    On the native streams the threads mark pages in :attr:`landed_bits`
    themselves (it is their ``held`` array); it is read and cleared only
    while no thread writes it: at RoundEnd (every stream acknowledged the
    round, and the source starts the next only after our RoundAck) and at a
    report (every thread joined first)."""

    def __init__(self, npages: int, held: np.ndarray | None = None):
        self.npages = npages
        self.acked_round = NO_ROUND
        self.acks_sent = 0
        self.landed_bits = np.zeros(npages, dtype=bool)
        self._held = held

    def landed(self, pages: np.ndarray) -> None:
        """``pages`` (indices) of the round in progress are applied."""
        self.landed_bits[np.asarray(pages, dtype=np.int64)] = True

    def acked(self, round_no: int) -> None:
        """RoundAck(round_no) is about to be sent: the next round starts with nothing landed."""
        self.acked_round = round_no
        self.acks_sent += 1
        self._settle()

    def report(self) -> ResumeReport:
        """What to tell a resumed source; what it says is settled (see
        engine/source/resume.py: the source folds it into the pages it owes)."""
        bitmap = np.packbits(self.landed_bits, bitorder="little").tobytes()
        self._settle()
        return ResumeReport(self.acked_round, self.npages, bitmap)

    def _settle(self) -> None:
        if self._held is not None:
            self._held |= self.landed_bits
        self.landed_bits[:] = False


def granted(config) -> set:
    """The capability this destination grants a source that offers it."""
    return {RESUME_PRECOPY} if config.precopy_resume_timeout_s > 0 else set()


def waits(session) -> bool:
    """In its pre-copy rounds a resumed control channel may continue the session."""
    return session.progress is not None and session.phase is Phase.PRECOPY


async def receive(session) -> None:
    """The session's rounds (``session._receive``), each break in them waited
    out while the source may come back. The hold time runs from the first
    break after the last RoundAck: a source that comes back and breaks again
    (or falls silent) before finishing a round does not get it anew, so no
    peer holds the copy here for longer than that plus one idle timeout."""
    since_ack = None      # (acks sent, the loop time the hold ends)
    while True:
        try:
            return await session._receive()
        except BaseException as exc:
            if not may_wait(session, exc):
                raise
            if session._streams is not None:
                # Join the threads before anything is reported: a page placed
                # after the report would be missing from it, or land after
                # its newer version. A stream that refused a frame is final.
                session._streams.restart(session.stats)
            acks = session.progress.acks_sent
            if since_ack is None or since_ack[0] != acks:
                since_ack = (acks, asyncio.get_running_loop().time()
                             + session.config.precopy_resume_timeout_s)
            session.ch = await source_back(session, exc, since_ack[1])


def may_wait(session, exc: BaseException) -> bool:
    """Whether ``exc`` (raised while receiving rounds) is a break to wait out."""
    if not waits(session):
        return False
    # A reset or an end of stream mid-round (ConnectionLost is a ConnectionError).
    # A batch that does not decode or a message out of place is final.
    if isinstance(exc, (ConnectionError, OSError)):
        return True
    return isinstance(exc, MigrationError) and isinstance(exc.__context__, TimeoutError)


def progress_for(session, ch: Channel) -> RoundProgress | None:
    """A RoundProgress when the session's pre-copy can be resumed (capability
    agreed on its control channel, pre-copy mode), on either data path."""
    if RESUME_PRECOPY in ch.conn.capabilities and session.mode is Mode.PRECOPY:
        return RoundProgress(int(session.vm.memory.npages), session._held)
    return None


async def source_back(session, cause: BaseException, hold_ends: float) -> Channel:
    """Wait for the source's resumed control channel, report what is held on
    it and return it; MigrationError once the loop's clock passed ``hold_ends``."""
    timeout_s = session.config.precopy_resume_timeout_s
    session.ch.abort()
    try:
        async with asyncio.timeout_at(hold_ends):
            while session._resumed_control is None:
                session._channel_arrived.clear()
                await session._channel_arrived.wait()
    except TimeoutError:
        raise MigrationError(
            f"the link to the source broke during pre-copy ({cause}) and the source did not "
            f"come back and finish a round within {timeout_s:g} s: the partial copy here was "
            "freed; the VM runs on at the source", phase="precopy") from None
    ch, session._resumed_control = session._resumed_control, None
    await ch.send(session.progress.report())
    session.stats.precopy_resumes += 1
    return ch


__all__ = ["RoundProgress", "granted", "may_wait", "progress_for", "receive", "source_back",
           "waits"]

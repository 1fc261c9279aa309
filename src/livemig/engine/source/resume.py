"""What the source must resend when a pre-copy interrupted by a link break resumes.

Theory of operation
-------------------
Rounds are applied at the destination in order, and a page always travels on
the same stream, so at any moment the destination holds every page of every
round it acknowledged, plus some pages of the one round in progress there.
After a break it reports both (``ResumeReport``: ``acked_round`` and the
``landed`` bitmap of the round after it). The source keeps, for every round
it sent that the destination has not acknowledged, the set of pages it sent
(one bitmap per round: ``npages / 8`` bytes each; the destination acks each
round before the next one is long under way, so only a couple are kept). On
resume it resends::

    (sent in round acked+1  minus  landed)
    ∪ sent in every later round
    ∪ dirtied since the last collect    (the caller collects the tracker)

Why that is exactly enough: a page's newest content is at the destination
unless (a) the round that carried its newest version was never applied — it
is then in one of the unacknowledged rounds' sets and not in ``landed`` — or
(b) the guest wrote it after that version was read, and then the tracker
reports it in the next collect, which either started a later round (so it
is in that round's set) or has not happened yet (the caller's collect). A
page that landed in round acked+1 and was sent again later is in the later
round's set, so ``landed`` never hides a newer version. The per-page hashes
behind the final digest are updated as pages are resent, so the digest of
what was sent matches the digest of what landed.

A report is checked before it is believed: ``npages`` must be the guest's,
``acked_round`` may not name a round never sent, and ``landed`` may only
claim pages that round really carried. A report that fails is a remote
protocol error: the migration fails as without resume (VM running here).

A report settles what it says: the destination forgets it once sent, and
here every unacknowledged round is folded into the pages owed, which the
next round must carry; so a later report speaks only of that round, and a
break before it starts loses nothing owed. On the native streams the same
holds: both sides join their stream threads before the report, and a fresh
set of streams carries the next round (:meth:`PrecopyResumer.resume`). The
final round is resumed the same way, the VM kept paused meanwhile.

Encoders that refer to what the receiver holds (DUP by content hash, DELTA
against the last version sent) must forget the pages being resent: the
caller resets its encoder's caches for them (or starts a fresh encoder).
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Sequence

import numpy as np

from ...aio.channel import Channel, recv_within
from ...errors import HandshakeRefused, MigrationCancelled, MigrationError, RemoteProtocolError
from ...protocol import ChannelKind, OutcomeCode, RefuseCode, ResumeReport
from ...protocol.spec import NO_ROUND, RESUME_PRECOPY_CAPABILITY as RESUME_PRECOPY


def _bits(npages: int) -> np.ndarray:
    return np.zeros(npages, dtype=bool)


class UnackedRounds:
    """The pages sent in each round the destination has not acknowledged, and
    the pages a resume found missing there that no round carried yet."""

    def __init__(self, npages: int):
        self.npages = npages
        self._sent: dict[int, np.ndarray] = {}
        self._carry = _bits(npages)     # owed since a report, until the next round starts
        self.last_acked = NO_ROUND
        self.last_started = NO_ROUND
        self.acks_received = 0          # RoundAcks read (a report's claim is no ack)
        self.resent_pages = 0           # pages sent again: their version never landed
        self.avoided_pages = 0          # pages of interrupted rounds that landed: not resent

    def start(self, round_no: int, pages: np.ndarray | None = None) -> None:
        """Round ``round_no`` begins; ``pages`` (indices), if given, go out in
        it. A round after a resume carries at least what the resume owes."""
        if round_no in self._sent or (self.last_started != NO_ROUND
                                      and round_no <= self.last_started):
            raise ValueError(f"round {round_no} started twice or out of order")
        self._sent[round_no] = self._carry
        self._carry = _bits(self.npages)
        self.last_started = round_no
        if pages is not None:
            self.sent(round_no, pages)

    def sent(self, round_no: int, pages: np.ndarray) -> None:
        """``pages`` (indices) went out in ``round_no``."""
        self._sent[round_no][np.asarray(pages, dtype=np.int64)] = True

    def acked(self, round_no: int) -> None:
        """The destination acknowledged ``round_no`` with a RoundAck."""
        self._applied(round_no)
        self.acks_received += 1

    def _applied(self, round_no: int) -> None:
        """The destination applied ``round_no`` (and so every round before it)."""
        for old in [r for r in self._sent if r <= round_no]:
            del self._sent[old]
        self.last_acked = round_no

    @property
    def held_bytes(self) -> int:
        return sum(bits.nbytes for bits in self._sent.values()) + self._carry.nbytes

    def resend(self, report: ResumeReport, dirtied_since: np.ndarray) -> np.ndarray:
        """Indices of the pages to send again after ``report``; ``dirtied_since``
        is the tracker's collect taken once the link came back (indices).

        The destination forgets what it reported once it sent the report, so
        everything sent before is settled here too: the rounds not
        acknowledged are folded into the pages owed, which the next round
        must carry (:meth:`start`), and a later report speaks only of what
        landed since. A page sent in two unacknowledged rounds (possible only
        before a report settles them) is resent whatever landed: the report
        does not say which version did."""
        self._check(report)
        if report.acked_round != NO_ROUND:
            self._applied(report.acked_round)
        landed = _landed(report)
        times_sent = np.zeros(self.npages, dtype=np.uint8)
        for bits in self._sent.values():
            times_sent += bits
        unlanded = (times_sent > 1) | ((times_sent == 1) & ~landed)
        self.resent_pages += int(np.count_nonzero(unlanded & ~self._carry))
        self.avoided_pages += int(np.count_nonzero((times_sent == 1) & landed))
        todo = self._carry | unlanded
        todo[np.asarray(dirtied_since, dtype=np.int64)] = True
        self._sent.clear()
        self._carry = todo
        return np.flatnonzero(todo).astype(np.uint64)

    def _check(self, report: ResumeReport) -> None:
        def refuse(why: str):
            raise RemoteProtocolError(f"the destination's resume report {why}; the pre-copy "
                                      "cannot go on from it", phase="precopy")
        if report.npages != self.npages:
            refuse(f"covers {report.npages} pages, but the guest has {self.npages}")
        acked = report.acked_round
        if acked != NO_ROUND and (self.last_started == NO_ROUND or acked > self.last_started):
            refuse(f"acknowledges round {acked}, which was never sent")
        if acked != NO_ROUND and self.last_acked != NO_ROUND and acked < self.last_acked:
            refuse(f"acknowledges round {acked}, but round {self.last_acked} was acked before")
        carried = _bits(self.npages)
        for round_no, bits in self._sent.items():
            if acked == NO_ROUND or round_no > acked:
                carried |= bits
        landed = _landed(report)
        if (landed & ~carried).any():
            first = 0 if acked == NO_ROUND else acked + 1
            refuse(f"claims pages of round {first} or later that no such round carried")


def offered(config) -> set:
    """The capability a source's control Hello offers for resumable pre-copy:
    in pre-copy mode (the destination holds only a pre-copy session: the
    rounds of a hybrid or post-copy migration end in invalidation and
    post-copy, which have their own recovery)."""
    return ({RESUME_PRECOPY} if config.precopy_resume_timeout_s > 0 and config.mode == "precopy"
            else set())


def is_break(exc: BaseException) -> bool:
    """A link break the rounds may be resumed after: a reset or closed
    connection, a peer gone silent (MigrationError from a timeout), or an Abort (a destination whose channel
    saw ours break sends one). A refusal or a cancel is final. Resuming after
    an Abort that was the destination's own decision costs one Hello: it no
    longer holds the session and answers Refuse or Outcome."""
    if isinstance(exc, (HandshakeRefused, MigrationCancelled)):
        return False
    # ConnectionLost (reset, or end of stream mid-conversation) is a
    # ConnectionError; any other protocol error (a wrong RoundAck) is final.
    return isinstance(exc, (ConnectionError, OSError, MigrationError))


class PrecopyResumer:
    """Reconnects a control channel after a break in the rounds and asks the
    destination what it holds, with backoff, for up to ``timeout_s`` in all."""

    def __init__(self, npages: int, *, timeout_s: float, answer_timeout_s: float,
                 backoff_s: Sequence[float], open_control: Callable[[], Awaitable[Channel]]):
        self.rounds = UnackedRounds(npages)
        self.timeout_s = timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.backoff_s = tuple(backoff_s)
        self._open_control = open_control
        self.resumes = 0
        # The window and the backoff run from the first break after the last
        # RoundAck: a destination that answers every reconnect and breaks
        # again before acknowledging a round cannot keep the rounds going
        # (and resending) for ever. (acks_received, deadline, attempt)
        self._since_ack: tuple[int, float, int] | None = None

    @classmethod
    def agreed(cls, session, backoff_s: Sequence[float], limiter) -> "PrecopyResumer | None":
        """A resumer for ``session`` (a SourceSession past its handshake) when
        both sides agreed on resumable pre-copy, on either data path."""
        config = session.config
        if RESUME_PRECOPY not in session._ch.conn.capabilities:
            return None
        return cls(session.vm.memory.npages, timeout_s=config.precopy_resume_timeout_s,
                   answer_timeout_s=config.handshake_timeout_s, backoff_s=backoff_s,
                   open_control=lambda: session._open(ChannelKind.CONTROL, resume=True,
                                                      rate_limiter=limiter))

    async def resume(self, session, cause: BaseException, round_no: int, *,
                     paused: bool) -> np.ndarray:
        """After ``cause`` broke round ``round_no``: drop the broken channels
        (the native streams' threads joined first), reconnect, learn what the
        destination holds, reopen the streams, and return the pages the next
        round must carry. A break while reopening starts over (the pages owed
        are kept, see UnackedRounds.resend). ``paused``: the final round, the
        VM stopped here meanwhile. MigrationError once a window is spent."""
        while True:
            session._ch.abort()
            await session._drop_streams()
            ch, report = await self.reconnect(cause, round_no, paused=paused)
            session._ch = session.control._capped(ch)
            todo = self.rounds.resend(report, session._tracker.collect())
            session._encoder.forget(todo)   # no DUP source, DELTA or BLOCK base the peer may lack
            stats = session.stats
            stats.precopy_resumes = self.resumes
            stats.resent_pages = self.rounds.resent_pages
            stats.resend_avoided_pages = self.rounds.avoided_pages
            if not session._data_path.native:
                return todo
            try:
                await session._open_streams()
                return todo
            except BaseException as exc:
                if not is_break(exc):
                    raise
                cause = exc

    async def reconnect(self, cause: BaseException, round_no: int, *, paused: bool = False
                        ) -> tuple[Channel, ResumeReport]:
        """A new control channel and the destination's report; MigrationError
        (the VM runs on at the source) once the window is spent or the
        destination no longer holds the session."""
        acks = self.rounds.acks_received
        if self._since_ack is None or self._since_ack[0] != acks:
            self._since_ack = (acks, time.monotonic() + self.timeout_s, 0)
        _, deadline_s, attempt = self._since_ack
        last: BaseException = cause
        if attempt:     # broke again before any round was acknowledged
            if time.monotonic() >= deadline_s:
                raise self._gave_up(round_no, cause, f"not within {self.timeout_s:g} s: the "
                                    "link broke again each time before a round was "
                                    "acknowledged", paused)
            await asyncio.sleep(self._backoff_s(attempt - 1, deadline_s))
        while True:
            ch = None
            try:
                ch = await self._open_control()
                answer = await recv_within(ch, self.answer_timeout_s, "resume report",
                                           peer="destination", phase="precopy")
            except HandshakeRefused as exc:
                if ch is not None:
                    await ch.close()
                if exc.code == RefuseCode.SESSION:    # it holds nothing for us any more
                    raise self._gave_up(round_no, cause, "the destination no longer holds the "
                                        f"session ({exc.reason})", paused) from exc
                last = exc
            except BaseException as exc:
                if ch is not None:
                    await ch.close()
                if not is_break(exc):
                    raise
                last = exc
            else:
                if isinstance(answer, ResumeReport):
                    self.resumes += 1
                    self._since_ack = (acks, deadline_s, attempt + 1)
                    return ch, answer
                await ch.close()    # an Outcome: the session ended there, unresumed
                if getattr(answer, "code", None) == OutcomeCode.COMMITTED:
                    raise RemoteProtocolError(
                        "the destination answered that the session was committed there, but "
                        "the pre-copy never reached the switchover", phase="precopy")
                raise self._gave_up(round_no, cause, "the destination ended the session ("
                                    + getattr(answer, "reason", type(answer).__name__) + ")",
                                    paused)
            if time.monotonic() >= deadline_s:
                raise self._gave_up(round_no, cause, f"not within {self.timeout_s:g} s "
                                    f"(last: {last})", paused)
            await asyncio.sleep(self._backoff_s(attempt, deadline_s))
            attempt += 1

    def _backoff_s(self, attempt: int, deadline_s: float) -> float:
        delay_s = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
        return min(delay_s, max(0.0, deadline_s - time.monotonic()))

    def _gave_up(self, round_no: int, cause: BaseException, why: str,
                 paused: bool) -> MigrationError:
        where = (f"the final round {round_no} (VM paused)" if paused
                 else f"pre-copy round {round_no}")
        return MigrationError(
            f"the link to the destination broke during {where} ({cause}) and the migration "
            f"could not be resumed: {why}; the VM runs on at the source: migrate it again "
            "when the link is back", phase="precopy")


def _landed(report: ResumeReport) -> np.ndarray:
    raw = np.frombuffer(report.landed, dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:report.npages].astype(bool)


__all__ = ["RESUME_PRECOPY", "PrecopyResumer", "UnackedRounds", "is_break", "offered"]

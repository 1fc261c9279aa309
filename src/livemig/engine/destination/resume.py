"""Partial pre-copies the destination holds for a source that lost its link.

Theory of operation
-------------------
During the pre-copy rounds the destination applies pages in place. When the
control channel (or a bulk stream) breaks before Switchover and both sides
offered the "resume-precopy" capability, the session is not torn down: it is
put on hold here, under its session id, with a deadline (the configured
``precopy_resume_timeout_s``). Its guest memory keeps its admission
reservation (docs/limits.md) until it is claimed or freed, so holding never
lets a daemon exceed its incoming-memory limit.

A source reconnecting with ``Hello(resume=True)`` and the same session id
claims the held session; the destination answers ``ResumeReport`` from the
session's :class:`RoundProgress` and the rounds go on. A Hello naming no held
session is refused (RefuseCode.SESSION) as before. When a deadline passes,
:meth:`HeldSessions.expire` hands the session back to the caller, which frees
its memory and records NOT_COMMITTED in the outcome book; the source, having
given up by then too, runs its VM on.

Time is passed in (``now_s``), never read, so the book is tested without
waiting. The report is bounded by the guest size both sides agreed on in the
offer: one bit per page.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...protocol import ResumeReport
from ...protocol.spec import NO_ROUND

# A daemon holds at most this many interrupted pre-copies at once; holding
# one more frees the oldest (their memory is bounded by admission anyway).
MAX_HELD = 64


class RoundProgress:
    """Which round the destination acknowledged last and which pages of the
    round after it have been applied since."""

    def __init__(self, npages: int):
        self.npages = npages
        self.acked_round = NO_ROUND
        self._landed = np.zeros(npages, dtype=bool)

    def landed(self, pages: np.ndarray) -> None:
        """``pages`` (indices) of the round in progress are applied."""
        self._landed[np.asarray(pages, dtype=np.int64)] = True

    def acked(self, round_no: int) -> None:
        """RoundAck(round_no) was sent: the next round starts with nothing landed."""
        self.acked_round = round_no
        self._landed[:] = False

    def report(self) -> ResumeReport:
        bitmap = np.packbits(self._landed, bitorder="little").tobytes()
        return ResumeReport(self.acked_round, self.npages, bitmap)


@dataclass
class HeldSession:
    session: Any            # the destination's session object, opaque here
    progress: RoundProgress
    deadline_s: float


class HeldSessions:
    """Interrupted pre-copies by session id, each until its deadline."""

    def __init__(self, *, max_held: int = MAX_HELD):
        self.max_held = max_held
        self._held: collections.OrderedDict[bytes, HeldSession] = collections.OrderedDict()

    def hold(self, session_id: bytes, session: Any, progress: RoundProgress, *,
             now_s: float, hold_s: float) -> list[HeldSession]:
        """Keep ``session`` until ``now_s + hold_s``; returns any sessions
        pushed out (over ``max_held``) or expired, for the caller to free."""
        gone = self.expire(now_s)
        self._held[session_id] = HeldSession(session, progress, now_s + hold_s)
        while len(self._held) > self.max_held:
            gone.append(self._held.popitem(last=False)[1])
        return gone

    def claim(self, session_id: bytes, *, now_s: float) -> HeldSession | None:
        """The held session a resumed Hello names, taken off hold; None if
        there is none (or its hold ran out)."""
        held = self._held.get(session_id)
        if held is None or now_s > held.deadline_s:
            return None
        return self._held.pop(session_id)

    def expire(self, now_s: float) -> list[HeldSession]:
        """Take every session whose hold ran out; the caller frees them."""
        gone = [sid for sid, held in self._held.items() if now_s > held.deadline_s]
        return [self._held.pop(sid) for sid in gone]

    def next_deadline_s(self) -> float | None:
        return min((held.deadline_s for held in self._held.values()), default=None)

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._held

    def __len__(self) -> int:
        return len(self._held)


__all__ = ["MAX_HELD", "HeldSession", "HeldSessions", "RoundProgress"]

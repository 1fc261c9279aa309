"""After Commit: a broken link is a reason to reconnect and learn the outcome.

Theory of operation
-------------------
Once the source has sent ``Commit`` it may not resume its copy on its own:
the destination may have received Commit and resumed the guest. But while
both hosts live the outcome is knowable, so the source never gives up on a
break; it reconnects (with backoff) a control channel with
``Hello(resume=True)`` and the same session id, and the destination answers::

    PresentReport(pages held)   the session runs on there in post-copy:
                                reopen the page channels, owe what it lacks
    Outcome(COMMITTED, digest)  it resumed the VM and keeps it: release ours
                                (after checking the digest of what it holds)
    Outcome(NOT_COMMITTED)      Commit never arrived; it discarded its copy
                                unresumed: resume ours
    Outcome(ABANDONED)          post-copy could not complete there and the VM
                                was stopped: ours is the only copy
    Refuse(SESSION)             it knows nothing of the session (it restarted,
                                or the record expired): unknown

A destination that is still waiting for Commit on the old connection drops it
when the resumed Hello arrives and decides from what it has read, so the
answer never waits for its timeout (engine/destination/outcomes.py). Only
while the destination cannot be reached is the outcome in doubt; the caller
then keeps its VM paused and says how to resolve it later (``ask`` once more,
from ``livemig vm resolve``).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from ...aio.channel import Channel, open_channel, recv_within
from ...aio.deadline import within
from ...errors import HandshakeRefused, LivemigError, RemoteProtocolError
from ...protocol import ChannelKind, Outcome, OutcomeCode, PresentReport, RefuseCode

# What the destination said (Learned.kind)
COMMITTED = "committed"          # it runs the VM: release ours
NOT_COMMITTED = "not-committed"  # it never resumed it and discarded its copy: resume ours
ABANDONED = "abandoned"          # it stopped the VM in post-copy: ours is the only copy
POSTCOPY = "postcopy"            # the session runs on at the destination
UNKNOWN = "unknown"              # the destination has no record of the session
UNREACHABLE = "unreachable"      # no answer within the window
RECLAIMED = "reclaimed"          # no answer, but etcd names this host: it took the VM back
KINDS = {OutcomeCode.COMMITTED: COMMITTED, OutcomeCode.NOT_COMMITTED: NOT_COMMITTED,
         OutcomeCode.ABANDONED: ABANDONED}


@dataclass
class Learned:
    """What the destination said (``kind``), and what came with it."""

    kind: str
    reason: str = ""
    digest: bytes = bytes(16)
    channel: Channel | None = None       # POSTCOPY: the resumed control channel
    present: np.ndarray | None = None    # POSTCOPY: bool per page, held there


OpenControl = Callable[[], Awaitable[Channel]]


async def ask(open_control: OpenControl, *, npages: int, timeout_s: float) -> Learned:
    """One attempt: open a resumed control channel and read the answer.
    Raises ConnectionError/LivemigError when the destination cannot be asked."""
    try:
        ch = await open_control()
    except HandshakeRefused as exc:
        if exc.code == RefuseCode.SESSION:
            return Learned(UNKNOWN, exc.reason)
        raise
    try:
        answer = await recv_within(ch, timeout_s, "the outcome of the handover",
                                   peer="destination", phase="switchover")
        if isinstance(answer, PresentReport):
            if answer.npages != npages:
                raise RemoteProtocolError(f"PresentReport for {answer.npages} pages, the VM has "
                                          f"{npages}", phase="postcopy")
            present = np.unpackbits(np.frombuffer(answer.bitmap, dtype=np.uint8),
                                    count=npages, bitorder="little").astype(bool)
            return Learned(POSTCOPY, channel=ch, present=present)
        if isinstance(answer, Outcome):
            await ch.close()
            return Learned(KINDS[answer.code], answer.reason, answer.digest)
        raise RemoteProtocolError(f"expected PresentReport or Outcome, got "
                                  f"{type(answer).__name__}", phase="switchover")
    except BaseException:
        ch.abort()
        await ch.close()
        raise


async def learn(open_control: OpenControl, *, npages: int, window_s: float, timeout_s: float,
                backoff_s: tuple[float, ...], wake: asyncio.Event, arbiter=None) -> Learned:
    """Ask until the destination answers or ``window_s`` has passed (then
    UNREACHABLE, with the last error as the reason). Each attempt waits its
    backoff first, cut short when ``wake`` is set (``livemig recover``).
    With an ownership ``arbiter`` (fleet/member.py), NOT_COMMITTED stands only
    once etcd names this host again; otherwise the VM stays paused here. And
    a destination that cannot be asked within the window is not the only
    witness: if etcd still names this host (no destination committed), the
    arbiter takes the VM back at a new epoch, fencing a late commit, and the
    answer is RECLAIMED: the VM may resume here."""
    deadline = time.monotonic() + window_s
    last = "no attempt made"
    for attempt in itertools.count():
        delay = backoff_s[min(attempt, len(backoff_s) - 1)]
        wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await within(wake.wait(), min(delay, max(0.0, deadline - time.monotonic())))
        try:
            learned = await ask(open_control, npages=npages, timeout_s=timeout_s)
            why = None
            if arbiter is not None and learned.kind == NOT_COMMITTED:
                why = await arbiter.reclaim()
            return learned if why is None else Learned(UNREACHABLE, why)
        except (ConnectionError, LivemigError, OSError) as exc:
            last = describe(exc)
        if time.monotonic() >= deadline:
            break
    if arbiter is not None:
        why = await arbiter.settle()
        if why is None:
            return Learned(RECLAIMED, f"the destination could not be asked ({last}), and etcd "
                           "showed that no destination resumed it (it named this host, or a "
                           "destination that committed but never resumed); etcd now names "
                           "this host at a new epoch")
        last = f"{last}; {why}"
    return Learned(UNREACHABLE, last)


async def ask_peer(host: str, port: int, session_id: bytes, *, npages: int, ssl=None,
                   server_hostname: str | None = None, timeout_s: float = 10.0) -> Learned:
    """Ask once, later (``livemig vm resolve``): UNREACHABLE if the destination
    cannot be asked. A post-copy session found running there is left as it
    was: our channel closes and it waits for its own source, or its timeout."""
    async def open_control() -> Channel:
        return await open_channel(host, port, kind=ChannelKind.CONTROL, session_id=session_id,
                                  ssl=ssl, server_hostname=server_hostname or host,
                                  resume=True, timeout_s=timeout_s)
    try:
        learned = await ask(open_control, npages=npages, timeout_s=timeout_s)
    except (ConnectionError, LivemigError, OSError) as exc:
        return Learned(UNREACHABLE, describe(exc))
    if learned.channel is not None:
        learned.channel.abort()
        await learned.channel.close()
        learned.channel = None
    return learned


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, LivemigError) else f"{type(exc).__name__}: {text}"


__all__ = ["ABANDONED", "COMMITTED", "Learned", "NOT_COMMITTED", "POSTCOPY", "RECLAIMED",
           "UNKNOWN", "UNREACHABLE", "ask", "ask_peer", "learn", "describe"]

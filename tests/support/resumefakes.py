"""A fake destination that breaks a resumable pre-copy and then answers the
source's reconnects as a script says (tests/integration/test_hostile_resume.py).

``ResumeScript(answer, break_after_batches)`` is a handler for
``aio.channel.serve_channels`` (granting ``resume-precopy``): on the first
control channel it accepts the offer, takes ``break_after_batches`` page
batches of round 0 and resets the connection, as a broken link would. Every
control channel reopened with ``Hello(resume=1)`` after that is handed to
``answer(ch, attempt)`` (attempt 0, 1, ...), which may say anything — a lie,
garbage, nothing — and the channel is reset when it returns (for a channel
left open: once the source gives up on it). Raw frames that a
``Connection`` would refuse to send are written by :func:`send_raw`.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from livemig.aio.channel import Channel
from livemig.protocol import Accept, Event, MigrationOffer, PageBatch

from .hostile import frame

Answer = Callable[[Channel, int], Awaitable[None]]


class ResumeScript:
    def __init__(self, answer: Answer, *, break_after_batches: int = 8):
        self.answer = answer
        self.break_after_batches = break_after_batches
        self.resumes = 0                  # resumed control channels answered
        self.broke = asyncio.Event()      # round 0 was cut

    async def __call__(self, ch: Channel) -> None:
        if ch.conn.hello.resume:
            attempt, self.resumes = self.resumes, self.resumes + 1
            try:
                await self.answer(ch, attempt)
                await ch.recv()           # until the source lets go of the channel
            finally:
                ch.abort()
            return
        offer = await ch.recv()
        assert isinstance(offer, MigrationOffer), offer
        await ch.send(Accept())
        batches = 0
        while (event := await ch.recv()) is not None:
            batches += isinstance(event, PageBatch)
            if batches == self.break_after_batches:
                break
        ch.abort()
        self.broke.set()


def send_raw(ch: Channel, message: str | Event, body: bytes = b"", *,
             length: int | None = None) -> None:
    """Write one frame on ``ch`` as the next frame the peer expects (negotiated
    version, next sequence number), bypassing every check of our own side
    (its state table included): ``message`` is an event, or a message name
    with its ``body``; ``length`` overrides the header's payload length (a lie
    about the size)."""
    if isinstance(message, Event):
        body = b"".join(bytes(part) for part in message.encode()[1])
        message = type(message).__name__
    version, sequence = ch.conn.hand_off_state()[:2]
    ch._transport.write(frame(message, sequence, body, version=version, length=length))

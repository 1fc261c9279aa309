"""The destination's answers before a MigrationOffer: bandwidth probes and Pings.

Theory of operation
-------------------
``livemig plan`` (analysis/plan.py) measures the link by sending
``ProbeData* ProbeEnd`` on a fresh control channel, and its round trip with
Pings.
Until the offer arrives the destination answers each ProbeEnd with a
``ProbeResult`` of what it received, timed on this side, and each Ping with a
Pong. With the "stream-probe" capability the source may instead measure the
native bulk streams: StreamProbe is answered by a StreamProbeGrant and
StreamProbeEnd by a StreamProbeResult (streamprobe.py serves the streams). A connection that only probed and then closed is not an error: there
is simply nothing to host.
"""
from __future__ import annotations

import asyncio
import time

from ...aio.channel import Channel
from ...aio.deadline import within
from ...errors import MigrationError, RemoteProtocolError
from ...protocol import (Abort, Ping, Pong, ProbeData, ProbeEnd, ProbeResult, StreamProbe,
                         StreamProbeEnd)


async def answer_probes(ch: Channel, timeout_s: float, phase: str, desk=None):
    """Serve bandwidth probes (ProbeData* ProbeEnd -> ProbeResult) and Pings until
    another event arrives: (that event, a MigrationOffer as the protocol's
    state allows nothing else here, or None at end of stream; whether we probed).

    The first ProbeData only starts the clock: bytes queued before it were
    in flight during connection set-up and would overstate the rate.
    ``desk`` (a streamprobe.StreamProbeDesk, or None: refuse them) answers
    stream probes."""
    probed = False
    first_ns: int | None = None
    frames = nbytes = 0
    while True:
        try:
            event = await within(ch.recv(), timeout_s)
        except asyncio.TimeoutError:
            raise MigrationError(f"no MigrationOffer from the source within "
                                 f"{timeout_s:g} s", phase=phase) from None
        if isinstance(event, ProbeData):
            now_ns = time.perf_counter_ns()
            if first_ns is None:
                first_ns = now_ns
            else:
                frames += 1
                nbytes += len(event.data)
        elif isinstance(event, ProbeEnd):
            duration_ns = time.perf_counter_ns() - first_ns if first_ns is not None else 0
            await ch.send(ProbeResult(frames, nbytes, duration_ns))
            probed, first_ns, frames, nbytes = True, None, 0, 0
        elif isinstance(event, (StreamProbe, StreamProbeEnd)):
            if desk is None:
                raise RemoteProtocolError(f"a {type(event).__name__} where this host serves "
                                          "no stream probe", phase=phase)
            if isinstance(event, StreamProbe):
                await ch.send(desk.grant(event))
            else:
                await ch.send(desk.result(event))
            probed = True
        elif isinstance(event, Ping):
            await ch.send(Pong(event.nonce))
        elif event is None and not probed:
            raise RemoteProtocolError("the source closed the connection while we waited "
                                      "for a MigrationOffer", phase=phase)
        elif isinstance(event, Abort):
            raise MigrationError(f"the source aborted: {event.reason}", phase=phase)
        else:
            return event, probed

"""The source's side of the stream probe: pre-copy rounds of filler pages on the native streams.

Theory of operation
-------------------
``livemig plan`` wants the rate a migration's pages will move at. On a
link where the migration would use the native bulk streams, that rate is
set by the stream threads (copy, hash, checksum, codec decision, framing,
one socket each) as much as by the link, so the probe runs them::

    control READY: StreamProbe(N, duration, window) ─▶ ◀ StreamProbeGrant
    bulk ×N: opened as a migration opens them, handed to SourceStream threads
        over a region of the granted window filled with random bytes
        (incompressible, no zero page, so every page goes RAW after the
        same LZ4 decision a migration makes), paced by the migration's cap
    rounds 0, 1, ...: a growing run of the window's pages, each round
        starting where the last one ended (wrapping), split over the streams
        as a round is (native.streams.partition), until the granted
        duration or the byte budget is spent
    control: StreamProbeEnd(pages, bytes) ─▶ ◀ StreamProbeResult

Rounds start at :data:`FIRST_ROUND_BYTES` and double up to half the
window, and a round starts only when the rate seen so far says it ends
within the granted duration (the destination closes the streams soon after
it). Half the window, taken where the last round ended: two rounds in a row
never share a page. The destination makes the window fresh once a round
closes, while the next one already streams (engine/destination/
streamprobe.py); on pages of its own, the next round does not race that
freshening and lands on fresh memory, as a migration's pages do (as long
as the destination gets to it within a round). Each
round's bytes and wall time are kept: analysis/linkrate.py turns them into
the rate estimate. Nothing here touches a VM.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from ...aio.channel import Channel
from ...aio.deadline import within
from ...codec.blockdelta import Fingerprints
from ...config import MigrationConfig
from ...errors import RemoteProtocolError
from ...native import PAGE_SIZE
from ...native.memory import GuestMemory
from ...protocol import Abort, StreamProbe, StreamProbeEnd
from .streams import SourceStreams

FIRST_ROUND_BYTES = 4 << 20
MIN_ROUND_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamProbeRun:
    """What one stream probe measured, both sides."""

    nstreams: int
    window_bytes: int
    rounds: tuple[tuple[int, float], ...]
    """(page-batch bytes, wall seconds) of each round, as the source saw it
    (from queueing the round to the last StreamAck)."""
    pages: int
    bytes: int
    source_cpu_s: float
    dest_pages: int
    dest_bytes: int
    dest_duration_s: float
    dest_cpu_s: float
    pages_by_encoding: dict


async def ask(ch: Channel, nstreams: int, duration_s: float, window_bytes: int,
              timeout_s: float):
    """StreamProbe, and the destination's StreamProbeGrant."""
    await ch.send(StreamProbe(nstreams, max(1, int(duration_s * 1e3)), window_bytes))
    return await recv_answer(ch, timeout_s)


async def run(ch: Channel, grant, opener: Callable[[], Awaitable[Channel]], *,
              config: MigrationConfig, max_bytes: int, timeout_s: float) -> StreamProbeRun:
    """Run a granted stream probe; ``opener()`` opens one bulk stream channel."""
    memory = GuestMemory(grant.window_bytes)
    streams = None
    channels: list[Channel] = []
    try:
        words = memory.words
        words[:] = np.random.default_rng().integers(0, 1 << 64, words.shape, dtype=np.uint64,
                                                    endpoint=False)
        # The arrays a migration's threads write for every page sent (its
        # hash; its block hashes where BLOCK pages are on): the same work per page.
        codec = config.codec_for_mode
        fingerprints = Fingerprints(memory.npages) if codec.enabled("block") else None
        streams, channels = await SourceStreams.open(
            memory, np.zeros(memory.npages, dtype=np.uint64), fingerprints, grant.nstreams,
            opener, codec=codec)
        streams.set_max_bandwidth(config.max_bandwidth_bps)
        rounds = await _rounds(streams, memory.npages, grant.duration_ms / 1e3, max_bytes,
                               timeout_s, fingerprints)
        totals = {k: sum(s.stats()[k] for s in streams.streams)
                  for k in ("pages", "batch_bytes", "cpu_ns", "raw_pages", "zero_pages",
                            "lz4_pages", "block_pages")}
        await ch.send(StreamProbeEnd(totals["pages"], totals["batch_bytes"]))
        result = await recv_answer(ch, timeout_s)
    finally:
        if streams is not None:
            streams.close()
        for c in channels:
            c.abort()
            await c.close()
        memory.close()
    return StreamProbeRun(
        grant.nstreams, grant.window_bytes, tuple(rounds), totals["pages"],
        totals["batch_bytes"], totals["cpu_ns"] / 1e9, result.pages, result.bytes,
        result.duration_ns / 1e9, result.cpu_ns / 1e9,
        {name: totals[f"{name}_pages"] for name in ("raw", "zero", "lz4", "block")})


async def _rounds(streams: SourceStreams, npages: int, duration_s: float, max_bytes: int,
                  stall_timeout_s: float, fingerprints) -> list[tuple[int, float]]:
    """Send rounds until the duration or the byte budget is spent. Every
    round is a first send: the fingerprints forget what the destination
    holds (it discards it too), so no page goes as a BLOCK page."""
    rounds: list[tuple[int, float]] = []
    most_pages = max(1, npages // 2)
    round_pages = min(most_pages, FIRST_ROUND_BYTES // PAGE_SIZE)
    first = 0
    t_start = time.perf_counter()
    sent = 0
    while True:
        if fingerprints is not None:
            fingerprints.valid[:] = 0
        pages = np.sort((first + np.arange(round_pages, dtype=np.uint64)) % np.uint64(npages))
        first = (first + round_pages) % npages
        t0 = time.perf_counter()
        result = await streams.send_round(len(rounds), pages, stall_timeout_s)
        seconds = time.perf_counter() - t0
        rounds.append((result.bytes, seconds))
        sent += result.bytes
        left_s = duration_s - (time.perf_counter() - t_start)
        if left_s <= 0 or sent >= max_bytes:
            return rounds
        rate = sum(b for b, _ in rounds) / max(sum(s for _, s in rounds), 1e-9)
        # The next round must end within the duration: the destination
        # closes the streams soon after it.
        fits = int(rate * left_s) // PAGE_SIZE
        round_pages = min(most_pages, 2 * round_pages, fits,
                          max(1, (max_bytes - sent) // PAGE_SIZE))
        if round_pages * PAGE_SIZE < MIN_ROUND_BYTES and round_pages < most_pages:
            return rounds


async def recv_answer(ch: Channel, timeout_s: float, what: str = "the stream probe",
                      closed_hint: str = ""):
    """The destination's next message during ``what`` (a probe before any
    offer); silence, a close or an Abort are its errors, each said so."""
    try:
        event = await within(ch.recv(), timeout_s)
    except asyncio.TimeoutError:
        raise RemoteProtocolError(f"the destination did not answer {what} within "
                                  f"{timeout_s:g} s", phase="handshake") from None
    if event is None:
        raise RemoteProtocolError(f"the destination closed the connection during {what}"
                                  f"{closed_hint}", phase="handshake")
    if isinstance(event, Abort):
        raise RemoteProtocolError(f"the destination aborted {what}: {event.reason}",
                                  phase="handshake")
    return event


__all__ = ["StreamProbeRun", "ask", "run", "recv_answer", "FIRST_ROUND_BYTES"]

"""The destination's side of the stream probe: bulk streams that check and drop pages.

Theory of operation
-------------------
::

    control READY: S StreamProbe(N, duration, window) ─ this host can run the
        threads, the capability was granted, no other stream probe runs here?
        ─ D StreamProbeGrant(min(N, 16), min(duration, 5 s), min(window, 64 MiB))
    bulk ×N: Hello(bulk, caps {streams}) ─ Welcome ─ a DestStream thread over
        a scratch region of the granted window (no VM's memory)
    bulk k:  PageBatch* StreamEnd ─▶ ◀ StreamAck, round after round, exactly
        as in a migration: header, checksum, batch and runs checked, pages
        placed in the scratch region and forgotten
    each round closed on every stream: the window is made fresh where the
        next round could land on placed pages, so every round lands on
        memory never touched, as a migration's pages do
    control: S StreamProbeEnd ─ D StreamProbeResult(pages, bytes, time, CPU)

Fresh memory matters: a migration places every page on memory never
touched before, and how it gets there is much of the destination's work. A
probe that placed its rounds on the same warm window would overstate the
rate, one that paid for first touches a migration does not pay would
understate it. So the window is placed exactly as a migration's memory is
(server._first_touch_fill). With the first-touch fill where this host has
it (native/firsttouch.py: each page allocated and written by UFFDIO_COPY,
never zeroed first), the window's pages are made absent again
(``PostcopyMemory.invalidate``) once fewer than half are absent, which is
when the source's next round could wrap onto placed ones. Without it, the
window is given back to the kernel (MADV_DONTNEED) after each round and
pre-faulted while the next round streams, as the server pre-faults a VM's
memory. The window has the flags of a VM's memory (VM.blank: transparent
huge pages).

The probe is bounded here whatever the source asks or does: the grant caps
streams, window and duration; :class:`ProbeSlot` lets one stream probe run
per server at a time (so at most one window is mapped for probes); a timer
closes the streams (the threads shut their sockets down) once the granted
duration plus :data:`OPEN_GRACE_S` has passed, and a stream beyond the
granted count is refused. The scratch region is unmapped when the probe ends
or the control channel does.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from ...aio.channel import Channel
from ...codec.blockdelta import HeldBlocks
from ...config import MAX_STREAMS, MigrationConfig
from ...errors import RemoteProtocolError, Unsupported
from ...native import PAGE_SIZE
from ...native.firsttouch import cost_unless_decided, first_touch_fill
from ...native.memory import GuestMemory
from ...protocol import StreamProbe, StreamProbeEnd, StreamProbeGrant, StreamProbeResult, spec
from .streams import DestStreams, offered as streams_offered

STREAM_PROBE = spec.STREAM_PROBE_CAPABILITY
MAX_WINDOW_BYTES = 64 << 20
"""The most scratch memory a stream probe maps here."""
MAX_DURATION_MS = 5000
"""The longest a stream probe may send."""
OPEN_GRACE_S = 2.0
"""Beyond the granted duration, for opening the streams and the last acks."""
POPULATE_CHUNK_PAGES = 1024


def offered(config: MigrationConfig, *, tls: bool, tls_streams: bool = False) -> bool:
    """Whether this destination grants the "stream-probe" capability: exactly
    when it would grant native streams to a migration."""
    return streams_offered(config, tls=tls, tls_streams=tls_streams)


class ProbeSlot:
    """One stream probe at a time per server."""

    def __init__(self):
        self.busy = False


class StreamProbeSink:
    """The bulk streams of one granted stream probe, over scratch memory."""

    def __init__(self, grant: StreamProbeGrant, slot: ProbeSlot, release):
        self.grant = grant
        self._slot = slot
        self._release = release       # lets an adopted channel's handler return
        self.memory = GuestMemory(grant.window_bytes)   # as VM.blank maps guest memory
        try:
            # None: pre-faulted, as the server does
            self.fill, _ = first_touch_fill(self.memory, cost_unless_decided())
        except BaseException:
            self.memory.close()
            raise
        # The arrays a migration's threads write for every page placed (page
        # hashes, held pages, block hashes): the same work per page.
        npages = self.memory.npages
        self._everything = np.ones(npages, dtype=bool)
        self.streams = DestStreams(self.memory, np.zeros(npages, dtype=np.uint64),
                                   np.zeros(npages, dtype=bool), HeldBlocks(npages),
                                   grant.nstreams, self.fill)
        self.channels: list[Channel] = []
        self.first_ns: int | None = None
        self.closed = False
        self._folded: list[dict] = []
        self._rounds_fresh = 0       # rounds closed on every stream, window discarded after
        self._populating: asyncio.Future | None = None
        self._populate_stop = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._timer = asyncio.get_running_loop().call_later(
            grant.duration_ms / 1e3 + OPEN_GRACE_S, self.close)

    def adopt(self, ch: Channel) -> None:
        """A bulk stream of the probe: to a thread at once (no await: see
        DestStreams.adopt). Refused past the granted count or the deadline."""
        if self.streams.closed:
            raise RemoteProtocolError("a bulk stream for a stream probe that has ended",
                                      phase="handshake")
        self.channels.append(ch)
        self.streams.adopt(ch)
        self._loop.add_reader(self.streams.streams[-1].fileno(), self._news)
        if self.first_ns is None:
            self.first_ns = time.perf_counter_ns()

    def _news(self) -> None:
        """A thread closed a round (or failed): once every stream has closed
        it, make the window fresh so the next round lands on fresh memory.
        A page of the next round placed before that reads as zero
        afterwards: harmless, nothing reads the window (checksums are checked
        on the received frames)."""
        streams = self.streams.streams
        for s in streams:
            s.clear_notify()
        if len(streams) < self.grant.nstreams:
            return
        closed = min(s.stats()["rounds"] for s in streams)
        if closed > self._rounds_fresh:
            self._rounds_fresh = closed
            self._make_fresh()

    def _make_fresh(self) -> None:
        """Every page of the window absent again (the fill's) once fewer than
        half are left absent, or discarded and being pre-faulted anew. The
        source's rounds (at most half the window each, each starting where the
        last ended: engine/source/streamprobe.py) land on the absent pages
        until they wrap; making pages absent costs CPU a migration never
        spends, so it is done only when a round could wrap onto placed ones."""
        if self.fill is not None:
            npages = self.memory.npages
            if self.fill.pm.missing < npages - npages // 2:
                self.fill.pm.invalidate(self._everything)
            return
        self.memory.discard(0, self.memory.npages)
        if self._populating is None or self._populating.done():
            self._populating = self._loop.run_in_executor(None, self._populate)

    def _populate(self) -> None:
        """Fault the window in as the server pre-faults a VM's memory while
        round 0 streams (server._populate): the same competition for the CPU."""
        npages = self.memory.npages
        try:
            for first in range(0, npages, POPULATE_CHUNK_PAGES):
                if self._populate_stop.is_set():
                    return
                self.memory.populate(first, min(POPULATE_CHUNK_PAGES, npages - first))
        except Unsupported:
            return

    def stop(self) -> None:
        """Stop and join the threads (their sockets are shut down), keeping their counters."""
        if not self.streams.closed:
            for s in self.streams.streams:
                self._loop.remove_reader(s.fileno())
            self._folded = [s.stats() for s in self.streams.streams]
            self.streams.close()
            for ch in self.channels:
                self._release(ch)

    def result(self, end: StreamProbeEnd) -> StreamProbeResult:
        """Stop the streams and report what they checked and dropped."""
        now_ns = time.perf_counter_ns()
        self.stop()
        totals = {k: sum(st[k] for st in self._folded) for k in ("pages", "batch_bytes",
                                                                  "cpu_ns")}
        duration_ns = now_ns - self.first_ns if self.first_ns is not None else 0
        return StreamProbeResult(totals["pages"], totals["batch_bytes"], duration_ns,
                                 totals["cpu_ns"])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.stop()
        self._populate_stop.set()
        if self._populating is not None and not self._populating.done():
            # The region must outlive the chunk being faulted in.
            self._populating.add_done_callback(lambda _: self._free())
        else:
            self._free()

    def _free(self) -> None:
        self.memory.close()
        self._slot.busy = False


class StreamProbeDesk:
    """Answers the stream probe questions of one control channel."""

    def __init__(self, ch: Channel, slot: ProbeSlot, release):
        self.ch = ch
        self._slot = slot
        self._release = release
        self.sink: StreamProbeSink | None = None
        self._probed = False

    def grant(self, ask: StreamProbe) -> StreamProbeGrant:
        """The answer to ``ask``; starts the sink when granted."""
        if STREAM_PROBE not in self.ch.conn.capabilities:
            raise RemoteProtocolError("a StreamProbe on a channel that did not negotiate the "
                                      f"{STREAM_PROBE!r} capability", phase="handshake")
        refused = self._refusal(ask)
        if refused is not None:
            return StreamProbeGrant(0, 0, 0, refused)
        window = min(ask.window_bytes, MAX_WINDOW_BYTES) // PAGE_SIZE * PAGE_SIZE
        grant = StreamProbeGrant(min(ask.nstreams, MAX_STREAMS),
                                 min(ask.duration_ms, MAX_DURATION_MS), window)
        self._slot.busy = True
        self._probed = True
        try:
            self.sink = StreamProbeSink(grant, self._slot, self._release)
        except BaseException:
            self._slot.busy = False
            raise
        return grant

    def _refusal(self, ask: StreamProbe) -> str | None:
        if self._probed:
            return "one stream probe per connection"
        if self._slot.busy:
            return "another stream probe runs on this host"
        if not 0 < ask.nstreams or ask.window_bytes < PAGE_SIZE or ask.duration_ms == 0:
            return (f"an empty stream probe ({ask.nstreams} streams, {ask.window_bytes} "
                    f"bytes, {ask.duration_ms} ms)")
        return None

    def adopt(self, ch: Channel) -> None:
        if self.sink is None:
            raise RemoteProtocolError("a bulk stream before any stream probe was granted",
                                      phase="handshake")
        self.sink.adopt(ch)

    def result(self, end: StreamProbeEnd) -> StreamProbeResult:
        if self.sink is None:
            raise RemoteProtocolError("a StreamProbeEnd without a granted stream probe",
                                      phase="handshake")
        try:
            return self.sink.result(end)
        finally:
            self.close()

    @property
    def active(self) -> bool:
        return self.sink is not None and not self.sink.closed

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


__all__ = ["StreamProbeDesk", "StreamProbeSink", "ProbeSlot", "offered", "STREAM_PROBE",
           "MAX_WINDOW_BYTES", "MAX_DURATION_MS", "OPEN_GRACE_S"]

"""The source's post-copy service: answer page requests first, push the rest.

Theory of operation
-------------------
::

    urgent channel ─▶ PageRequest(id, pages) ─ encode from the frozen VM
                   ◀─ PageBatch(URGENT, id)     (never waits behind bulk data:
                                                  its own task and TCP stream)
    bulk channel   ◀─ PageBatch(POSTCOPY) ...   every owed page, pages just
                                                 after recent faults first
    control        ─▶ PostcopyComplete(digest) ─ digest == ours? ─ Complete
                                                               else Abort

After Commit the source's VM stays paused and its memory frozen: every page
encoded now is final, so a page sent twice (a request racing a push, or a
re-send after a reconnection) carries the same bytes and the same hash. The
encoder is in post-copy mode (no DELTA, no DUP: see BatchEncoder.set_postcopy).

Pre-paging: a guest that faults on page f tends to touch f+1, f+2, ... next.
Each request queues a window after (and a little before) its pages; the push
task sends owed pages of those windows, ordered by pages.order_near_faults,
before resuming its linear sweep. The sweep keeps a cursor, so choosing the
next batch costs O(batch), not O(memory).

Keepalive: a black-holed link resets nothing, and after the last page both
sides only wait (for PostcopyComplete, for Complete). So while the control
channel is quiet we Ping every ``silence_s / 2``; no frame by ``silence_s``
is a break, and the destination treats ``silence_s`` without our Pings the
same way.

``serve`` runs on one set of channels and raises when one breaks (an Abort
from the destination included: its channel sends one when it sees ours
break); the caller reconnects and calls ``resync(present)`` with the
destination's PresentReport, then ``serve`` again. Only DigestMismatch is
final. The VM is released only after Complete has been sent.

Ending: once Complete is sent (``_completing``), the destination closes
every channel as soon as it reads it, and that close can reach the urgent
reader (or a push in flight) in the same loop turn as our own completion.
It is the normal end, never a break: mistaken for one, it sent the source
reconnecting to a session that had just ended (with a fast, idle guest
nearly every time), which a destination without a record of ended
sessions refused ("no migration with this session id ...").

Native path (``serve(..., urgent_fd=...)``, see urgent.py): the urgent
channel's socket, handed off right after its handshake, is served by a C
thread answering from the frozen memory; this loop drains the page indices
it answered from a ring (eventfd-driven) to mark them sent and to pre-page
around them, exactly as ``_answer`` does on the Python path.

Native push (``serve(..., push=SourceStreams)``): the owed pages go out on N
push streams served by C threads instead of the bulk channel, in chunks this
loop picks in the same order (near recent faults first, then the sweep); a
chunk is one stream round, acknowledged once placed at the destination, and
up to PUSH_WINDOW_CHUNKS chunks are open at once (the streams' round window). A
failed push thread is a break like any other (the caller reconnects).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time

import numpy as np

from ...aio.channel import Channel, until_finished
from ...aio.deadline import within
from ...codec.encoder import BatchEncoder
from ...errors import ConnectionLost, LivemigError, MigrationError, RemoteProtocolError
from ...native import PAGE_SIZE
from ...codec.kernels import ZERO_PAGE_HASH, hash_pages, zero_scan
from ...pages import order_near_faults, runs_of
from ...codec.rawbatch import MAX_FAST_RUNS, encode_raw
from ...protocol import BATCH_POSTCOPY, BATCH_URGENT, Abort, Complete, PageBatch, Phase, Ping, Pong
from ...stats import MigrationStats
from ...native.urgent import NativePageServer
from .streams import SourceStreams

PREPAGE_WINDOW_PAGES = 64
# A pushed batch is decoded and placed in one go on the destination's loop,
# and encoded in one go on ours: a fault read or a request arriving meanwhile
# waits for it. Small batches bound that wait (measured: 1 MiB batches put
# fault service at ~1.2 ms p50 under a full push; see bench/bench_postcopy.py).
PUSH_BATCH_BYTES = 128 << 10
RECENT_FAULTS = 32
# Native push: pages per stream in one chunk (a stream round). Larger chunks
# spend less on the per-round acknowledgement; smaller ones let pages near a
# new fault go sooner (a chunk of 1024 pages per stream is ~4 MiB, a few ms).
PUSH_CHUNK_PAGES_PER_STREAM = 1024
# Native push: chunks open at once (queued, on the wire or being placed).
# One chunk waited for its acknowledgement before the next was chosen (the
# threads idle for a round trip and a turn of both event loops per chunk);
# with a few open, a thread always has the next chunk to send.
PUSH_WINDOW_CHUNKS = 3
# Counting the owed pages walks a bool per guest page: refresh the published
# remaining bytes at this period, not per batch.
REMAINING_REFRESH_S = 0.25


class PostcopySender:
    def __init__(self, encoder: BatchEncoder, owed: np.ndarray, stats: MigrationStats, *,
                 round_index: int, batch_bytes: int):
        self.encoder = encoder
        self.owed = owed.copy()            # bool[npages]: not yet pushed
        self.npages = owed.size
        self.stats = stats
        self.round_index = round_index
        self.batch_pages = max(1, min(batch_bytes, PUSH_BATCH_BYTES) // PAGE_SIZE - 1)
        self._cursor = 0
        self._recent: collections.deque = collections.deque(maxlen=RECENT_FAULTS)
        self._prepage: list[int] = []       # faults whose window is not queued yet
        self._wake = asyncio.Event()
        self.native: NativePageServer | None = None
        self._rt_priority = 0
        self._native_failed: asyncio.Future | None = None
        self._completing = False
        self._t_resumed = time.monotonic()   # made right after the handover: the resume

    def mark(self, milestone: str) -> None:
        """Note when ``milestone`` (the latest time) was reached, in ms after
        the resume (stats.postcopy_timeline_ms)."""
        self.stats.postcopy_timeline_ms[milestone] = (time.monotonic() - self._t_resumed) * 1e3

    def resync(self, present: np.ndarray) -> None:
        """After a reconnection: owe exactly what the destination lacks."""
        self.owed = ~present
        self.stats.remaining_bytes = self.owed_npages * PAGE_SIZE
        self._cursor = 0
        self._wake.set()

    @property
    def owed_npages(self) -> int:
        return int(np.count_nonzero(self.owed))

    async def serve(self, control: Channel, urgent: Channel, bulk: Channel, *,
                    urgent_fd: tuple | None = None, cpu: int = -1, spin_us: int = 0,
                    rt_priority: int = 0, silence_s: float = 30.0,
                    push: SourceStreams | None = None) -> None:
        """``urgent_fd``: what ``urgent.hand_off()`` returned, to serve the
        urgent channel natively (the tuple's fd is consumed). ``silence_s``:
        a control channel silent that long (Pings unanswered) is a break.
        ``push``: native push streams of this channel set (the caller closes
        them), which then carry the owed pages instead of ``bulk``."""
        if urgent_fd is None:
            answer = self._answer(urgent)
        else:
            self._rt_priority = rt_priority
            answer = self._start_native(urgent_fd, cpu, spin_us, rt_priority)
        pusher = self._push(bulk) if push is None else self._push_streams(push, silence_s)
        try:
            await until_finished(answer, pusher, self._await_complete(control, silence_s))
        finally:
            if urgent_fd is not None:
                self._stop_native()

    # -- urgent, native: a C thread answers; we learn what it sent ---------------------------
    def _start_native(self, handoff: tuple, cpu: int, spin_us: int,
                      rt_priority: int) -> asyncio.Future:
        fd, version, send_seq, recv_seq, max_payload = handoff
        if self.native is None:
            try:
                self.native = NativePageServer(self.encoder.memory,
                                               self.encoder.sent_hashes.values,
                                               self.round_index)
            except BaseException:
                os.close(fd)
                raise
        loop = asyncio.get_running_loop()
        self._native_failed = loop.create_future()
        self.native.attach_fd(fd, version=version, send_seq=send_seq, recv_seq=recv_seq,
                              max_payload_bytes=max_payload, cpu=cpu, spin_us=spin_us,
                              rt_priority=rt_priority)
        loop.add_reader(self.native.fileno(), self._on_native)
        return self._native_failed

    def _on_native(self) -> None:
        self.native.clear_notify()
        pages = self.native.drain_requests()
        # the thread's counters reach the live progress (fault rate, pages
        # sent) as requests arrive, not only when post-copy ends
        self.native.fold_into(self.stats, "source", self._rt_priority)
        if pages.size:
            self.owed[pages] = False
            recent = pages[-RECENT_FAULTS:].tolist()
            self._recent.extend(recent)
            self._prepage.extend(recent)
            self._wake.set()
        err = self.native.failure()
        if isinstance(err, ConnectionLost) and self._completing:
            # The digests matched and Complete is (being) sent: the destination
            # closes its urgent channel as soon as it reads it, which can be
            # seen here before our own completion task has finished.
            err = None
        if err is not None and self._native_failed is not None \
                and not self._native_failed.done():
            self._native_failed.set_exception(err)

    def _stop_native(self) -> None:
        asyncio.get_running_loop().remove_reader(self.native.fileno())
        self.native.detach()
        self._native_failed = None
        self._on_native()
        self.native.fold_into(self.stats, "source", self._rt_priority)

    def close(self) -> None:
        """Free the native thread's handle (stopped already by ``serve``)."""
        if self.native is not None:
            self.native.close()
            self.native = None

    # -- urgent: requests first ------------------------------------------------------------
    async def _answer(self, urgent: Channel) -> None:
        while True:
            event = await urgent.recv()
            if event is None:
                if self._completing:
                    return      # it read our Complete and closed: the normal end (see _push)
                raise RemoteProtocolError("the destination closed the urgent channel",
                                          phase="postcopy")
            if isinstance(event, Abort):   # the table allows only PageRequest or Abort here
                raise MigrationError(f"the destination aborted post-copy: {event.reason}",
                                     phase="postcopy", source_resumed=False)
            pages = np.unique(np.asarray(event.pages, dtype=np.int64))
            if pages.size and (pages[0] < 0 or pages[-1] >= self.npages):
                raise RemoteProtocolError("a PageRequest names a page outside guest memory",
                                          phase="postcopy")
            self.owed[pages] = False
            self.stats.urgent_requests += 1
            self.stats.pages_requested += int(pages.size)
            if pages.size:
                await self._reply(urgent, event.request_id, pages)
            recent = pages[-RECENT_FAULTS:].tolist()
            self._recent.extend(recent)
            self._prepage.extend(recent)
            self._wake.set()

    async def _reply(self, urgent: Channel, request_id: int, pages: np.ndarray) -> None:
        """Requested pages as RAW straight from the frozen memory (rawbatch)."""
        for chunk in _fast_chunks(pages):
            chunks, nbytes = self._encode_fast(chunk, zero_scan_pages=False)
            await urgent.send(PageBatch(self.round_index, int(chunk.size), chunks, BATCH_URGENT,
                                        request_id))

    def _encode_fast(self, pages: np.ndarray, *, zero_scan_pages: bool) -> tuple[list, int]:
        view = self.encoder.memory.pages
        zero = zero_scan(view, pages) if zero_scan_pages else None
        chunks, nbytes, raw_pages = encode_raw(view, pages, zero)
        hashes = self.encoder.sent_hashes.values
        if zero is None:
            first, n = int(pages[0]), int(pages.size)
            if int(pages[-1]) - first + 1 == n:       # contiguous: hash the slice
                hashes[first:first + n] = hash_pages(view[first:first + n])
            else:
                hashes[pages] = hash_pages(view, pages)
        else:
            hashes[pages[zero]] = ZERO_PAGE_HASH
            hashes[pages[~zero]] = hash_pages(view, pages[~zero])
        st = self.stats
        st.bytes_sent += nbytes
        st.pages_sent += int(pages.size)
        for name, n in (("raw", raw_pages), ("zero", int(pages.size) - raw_pages)):
            st.pages_by_encoding[name] = st.pages_by_encoding.get(name, 0) + n
        st.bytes_by_encoding["raw"] = st.bytes_by_encoding.get("raw", 0) + raw_pages * PAGE_SIZE
        return chunks, nbytes

    # -- bulk: everything else, near faults first ----------------------------------------------
    def _next_pages(self, limit: int | None = None) -> np.ndarray:
        """Up to ``limit`` (default: a batch) owed pages to push next."""
        limit = limit or self.batch_pages
        if self._prepage:
            new, self._prepage = self._prepage, []
            near = np.unique(np.concatenate([
                np.arange(max(0, f - PREPAGE_WINDOW_PAGES // 4),
                          min(self.npages, f + PREPAGE_WINDOW_PAGES)) for f in new]))
            near = near[self.owed[near]]
            if near.size:
                faults = np.asarray(self._recent, dtype=np.int64)
                return order_near_faults(near, faults,
                                         window_pages=PREPAGE_WINDOW_PAGES)[:limit]
        while self._cursor < self.npages:
            end = min(self.npages, self._cursor + limit * 64)
            found = np.flatnonzero(self.owed[self._cursor:end]) + self._cursor
            if found.size:
                return found[:limit]
            self._cursor = end
        return np.empty(0, dtype=np.int64)

    async def _push(self, bulk: Channel) -> None:
        counted_at = time.monotonic()
        while True:
            if time.monotonic() - counted_at >= REMAINING_REFRESH_S:
                counted_at = time.monotonic()
                self.stats.remaining_bytes = self.owed_npages * PAGE_SIZE
            pages = self._next_pages()
            if pages.size == 0:
                self.stats.remaining_bytes = self.owed_npages * PAGE_SIZE
                # all pushed; a resync after a reconnection may owe more
                self._wake.clear()
                await self._wake.wait()
                continue
            self.owed[pages] = False
            pages = np.sort(pages)
            for chunk in _fast_chunks(pages):
                chunks, _ = self._encode_fast(chunk, zero_scan_pages=True)
                try:
                    await bulk.send(PageBatch(self.round_index, int(chunk.size), chunks,
                                              BATCH_POSTCOPY))
                except (ConnectionError, LivemigError):
                    if self._completing:
                        return      # a page it had already got; it read Complete and closed
                    raise
                self.stats.pages_pushed += int(chunk.size)
            # send() does not suspend while the socket takes data: yield so a
            # page request never waits behind a stretch of pushes
            await asyncio.sleep(0)

    def _next_chunk(self, limit: int) -> np.ndarray:
        """Up to ``limit`` owed pages for the native push, ascending: the
        windows around recent faults first (as ``_next_pages`` orders them),
        the linear sweep after. The streams send a chunk in stripe order, so
        pre-paging acts per chunk, not per page."""
        parts, n = [], 0
        while n < limit:
            pages = self._next_pages(limit - n)
            if pages.size == 0:
                break
            self.owed[pages] = False
            parts.append(pages)
            n += int(pages.size)
        if not parts:
            return np.empty(0, dtype=np.uint64)
        return np.sort(np.concatenate(parts)).astype(np.uint64)

    async def _push_streams(self, streams: SourceStreams, silence_s: float) -> None:
        """The push on native streams: the owed pages in chunks, each chunk
        split over the streams by stripe and queued as one stream round.
        Up to PUSH_WINDOW_CHUNKS chunks are open at once: the threads send
        the next while earlier ones are placed and acknowledged, and each
        ack lets this loop choose one more chunk (pages near new faults go
        in the next chunk chosen). The urgent thread is a separate
        connection at real-time priority: its replies never wait behind
        these."""
        counted_at = time.monotonic()
        chunk_pages = PUSH_CHUNK_PAGES_PER_STREAM * len(streams.streams)
        streams.set_window(PUSH_WINDOW_CHUNKS)
        queued = 0                  # chunks queued on these streams (round indices 0 ..)
        try:
            while True:
                if time.monotonic() - counted_at >= REMAINING_REFRESH_S:
                    counted_at = time.monotonic()
                    self.stats.remaining_bytes = self.owed_npages * PAGE_SIZE
                acked = streams.rounds_acked()
                if queued - acked < PUSH_WINDOW_CHUNKS:
                    pages = self._next_chunk(chunk_pages)
                    if pages.size:
                        if queued == 0:
                            self.mark("push_first_queued")
                        streams.queue_round(queued, pages)
                        queued += 1
                        continue
                    if queued == acked:
                        # all pushed and acknowledged; a resync after a
                        # reconnection may owe more
                        self.stats.remaining_bytes = self.owed_npages * PAGE_SIZE
                        self.mark("push_acked")
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                await streams.wait_acked(acked + 1, silence_s)
                self.fold_push(streams)
        except (ConnectionError, LivemigError):
            if self._completing:
                return      # pages it had already got; it read Complete and closed
            raise
        finally:
            self.fold_push(streams)
            self.stats.push_in_flight_max = max(self.stats.push_in_flight_max,
                                                streams.in_flight_max())

    def fold_push(self, streams: SourceStreams) -> None:
        """Count what the push threads sent (also of a chunk cut short)."""
        self.stats.pages_pushed += streams.fold_into(self.stats)

    # -- completion -----------------------------------------------------------------------------
    async def _await_complete(self, control: Channel, silence_s: float) -> None:
        """PostcopyComplete, then Complete. A silent link (a black hole: no
        reset, no end of stream) would leave both sides waiting forever, so
        after half of ``silence_s`` without a frame we Ping; no answer by
        ``silence_s`` is a break. The destination counts our Pings as our
        liveness (destination/postcopy.py)."""
        nonces = itertools.count(1)
        pinged = False
        while True:
            try:
                event = await within(control.recv(), silence_s / 2)
            except asyncio.TimeoutError:
                if pinged:
                    raise ConnectionLost(f"the destination has not answered for {silence_s:g} s "
                                         "during post-copy", phase="postcopy",
                                         channel=control.name) from None
                await control.send(Ping(next(nonces)))
                pinged = True
                continue
            if not isinstance(event, Pong):
                break
            pinged = False
        if event is None:
            raise RemoteProtocolError("the destination closed the control channel during "
                                      "post-copy", phase="postcopy")
        if isinstance(event, Abort):
            raise MigrationError(f"the destination aborted post-copy: {event.reason}",
                                 phase="postcopy", source_resumed=False)
        # The protocol's table leaves only PostcopyComplete here.
        self.mark("postcopy_complete_received")
        ours = self.encoder.sent_hashes.digest()
        if event.digest != ours:
            reason = (f"post-copy memory digest mismatch: destination {event.digest.hex()}, "
                      f"source {ours.hex()}")
            await control.send(Abort(Phase.POSTCOPY, reason))
            raise DigestMismatch(reason, phase="postcopy", source_resumed=False)
        self._completing = True
        await control.send(Complete())
        self.mark("complete_sent")


class DigestMismatch(MigrationError):
    """The destination's landed-page digest differs from what we sent: the one
    post-copy failure that is not a break to reconnect after."""


def _fast_chunks(pages: np.ndarray):
    """Split sorted pages so that no chunk has more runs than rawbatch takes
    (each run of a chunk is at most as long as its own pages)."""
    if pages.size <= MAX_FAST_RUNS:
        yield pages
        return
    starts, counts = runs_of(pages)
    ends = np.cumsum(counts)
    for first in range(0, starts.size, MAX_FAST_RUNS):
        lo = int(ends[first - 1]) if first else 0
        hi = int(ends[min(first + MAX_FAST_RUNS, starts.size) - 1])
        yield pages[lo:hi]



__all__ = ["DigestMismatch", "PostcopySender", "PREPAGE_WINDOW_PAGES"]

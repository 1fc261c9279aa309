"""The destination's post-copy service: faults in, page requests out, pages placed.

Theory of operation
-------------------
::

    vCPU thread touches a missing page ─ blocks in the kernel (userfaultfd MISSING)
    uffd fd readable ─ loop.add_reader ─ read_faults() (batched, deduplicated)
        ─ pages not already requested ─ PageRequest ─▶ urgent channel
    urgent channel ◀─ PageBatch(URGENT)   ┐ decoded by BatchDecoder with a
    bulk channel   ◀─ PageBatch(POSTCOPY) ┘ PostcopyPlacer: UFFDIO_COPY per run,
                                            which maps the page and wakes the vCPU
    missing == 0 ─ PostcopyComplete(digest of landed hashes) ─▶ ◀ Complete

Why it is correct:

* Every page is placed by UFFDIO_COPY / UFFDIO_ZEROPAGE, never written
  directly: the kernel maps the page atomically and wakes every thread
  blocked on it (userfaultfd(2), "UFFDIO_COPY"). A page placed twice (a
  request racing a push) comes back EEXIST, counted and ignored natively.
* The landed-page hash is taken from the staging buffer as placed
  (``hash_after_place = False``): after UFFDIO_COPY returns, the resumed
  guest may already have written the page, so reading memory back would
  hash the guest's data, not ours.
* DELTA and DUP are refused (``supports_delta = False``): both read the
  receiver's current copy of a page, which post-copy does not have or which
  the guest may have changed.
* A fault message read for a page that was placed in the meantime is never
  handed out by read_faults (see postcopy.py), and the kernel drops an unread
  message when its waiter is woken by a placement; so a page is requested at
  most once per channel set. ``_fault_t`` (NaN = not outstanding) is the set
  of outstanding requests; after a reconnection they are all sent again.
* Latency is measured from the moment the fault message is read to the
  moment the batch holding the page was placed (the vCPU is runnable then).

Native path (``urgent=NativeFaultServer``, see urgent.py): the uffd and the
urgent channel's socket belong to a C thread instead; this loop then only
places pushed batches, watches the thread's eventfd (fault latencies to
fold into the stats, completion, or the error it ended with) and runs the
control channel. The thread's outstanding requests survive a broken
channel and are asked again on the next ``serve``.

Native push (``serve(..., push=[handed-off sockets])``): a thread per push
stream checks each pushed batch, stores its hashes and places it with
UFFDIO_COPY (EEXIST: the urgent path was first), settling faults it served;
this loop watches their eventfds for counters, completion and failures.
Threads are joined when ``serve`` ends, before memory may close.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np

from ...aio.channel import Channel, until_finished
from ...codec.batchformat import DecodedBatch
from ...codec.decoder import BatchDecoder
from ...native import PAGE_SIZE
from ...codec.kernels import ZERO_PAGE_HASH, hash_pages
from ...codec.rawbatch import parse_raw
from ...errors import CodecError, ConnectionLost, MigrationError, RemoteProtocolError
from ...native.postcopy import PostcopyMemory
from ...protocol import (Abort, Complete, PageBatch, PageRequest, Ping, Pong,
                       PostcopyComplete, PresentReport)
from ...stats import MigrationStats
from ...native.streams import PostcopyDestStream, close_handed_off
from ...native.urgent import NativeFaultServer

MAX_REQUEST_PAGES = 1024     # pages named by one PageRequest


class PostcopyPlacer:
    """Lands decoded pages through userfaultfd (see the module docstring)."""

    hash_after_place = False
    supports_delta = False

    def __init__(self, pm: PostcopyMemory):
        self.pm = pm

    def place_runs(self, starts: np.ndarray, counts: np.ndarray, staging: np.ndarray) -> None:
        row = 0
        for s, c in zip(starts.tolist(), counts.tolist()):
            self.pm.place(s, staging[row:row + c], c)
            row += c

    def place_zero_runs(self, starts: np.ndarray, counts: np.ndarray) -> None:
        for s, c in zip(starts.tolist(), counts.tolist()):
            self.pm.place_zero(s, c)


class FaultService:
    """Serves one post-copy guest's faults until every page is present.

    ``serve(control, urgent, bulk)`` runs on one set of channels and returns
    once the source answered Complete; it raises ConnectionLost (or another
    RemoteProtocolError) when a channel breaks, leaving all state in place so
    ``serve`` can be called again with a new set (recovery).
    """

    def __init__(self, pm: PostcopyMemory, decoder: BatchDecoder, stats: MigrationStats, *,
                 urgent: NativeFaultServer | None = None, urgent_cpu: int = -1,
                 urgent_spin_us: int = 0, urgent_rt_priority: int = 0, silence_s: float = 30.0):
        self.native = urgent
        self.silence_s = silence_s
        self._urgent_cpu = urgent_cpu
        self._urgent_spin_us = urgent_spin_us
        self._urgent_rt_priority = urgent_rt_priority
        self._native_failed: asyncio.Future | None = None
        self.pm = pm
        self.decoder = decoder
        self.stats = stats
        self.npages = pm.npages
        self._fault_t = np.full(self.npages, np.nan)   # read time of outstanding faults
        self._to_request: list[np.ndarray] = []
        self._request_ready = asyncio.Event()
        self._done = asyncio.Event()
        self._request_ids = itertools.count(1)
        self._watching = False
        self._t_start = time.monotonic()
        self.faults_read = 0
        self.complete = False
        self._push: list[PostcopyDestStream] = []      # native push threads of this set
        self._push_failed: asyncio.Future | None = None

    # -- the uffd fd --------------------------------------------------------------------
    def start(self) -> None:
        """Watch the fault fd (call once the guest may run)."""
        self._t_start = time.monotonic()
        fd = self.native.fileno() if self.native is not None else self.pm.fileno()
        asyncio.get_running_loop().add_reader(
            fd, self._on_native if self.native is not None else self._on_faults)
        self._watching = True
        self._check_done()

    def stop(self) -> None:
        """Stop watching; the native thread is stopped, its counters folded
        into the stats, and the handle freed (before the memory may close)."""
        if self._push:
            self._stop_push()
        if self._watching:
            fd = self.native.fileno() if self.native is not None else self.pm.fileno()
            asyncio.get_running_loop().remove_reader(fd)
            self._watching = False
        if self.native is not None:
            self.native.detach()
            self._fold_native()
            self.native.close()
            self.native = None

    def _on_native(self) -> None:
        self.native.clear_notify()
        self._fold_native()   # live counters, not only when post-copy ends
        self._check_done()
        err = self.native.failure()
        if isinstance(err, ConnectionLost) and self._done.is_set():
            # Every page is here: the source may close the urgent channel as
            # soon as it answered Complete, before that Complete is read.
            err = None
        if err is not None and self._native_failed is not None \
                and not self._native_failed.done():
            self._native_failed.set_exception(err)

    def _fold_native(self) -> None:
        lat = self.native.drain_latencies_us()
        if lat.size:
            self.stats.fault_latency.add_many(lat)
        d = self.native.fold_into(self.stats, "destination", self._urgent_rt_priority)
        self.faults_read += d["faults_read"]
        self.stats.vcpu_blocked_ms = (self.stats.vcpu_blocked_ms or 0.0) + d["blocked_ns"] / 1e6

    def _on_faults(self) -> None:
        now = time.perf_counter()
        while True:
            pages = self.pm.read_faults()
            if pages.size == 0:
                break
            self.faults_read += int(pages.size)
            idx = pages.astype(np.int64)
            new = idx[np.isnan(self._fault_t[idx])]
            if new.size:
                self._fault_t[new] = now
                self._to_request.append(new)
                self._request_ready.set()

    # -- serving one channel set ------------------------------------------------------------
    async def serve(self, control: Channel, urgent: Channel, bulk: Channel, *,
                    resumed: bool, push: list[tuple] = ()) -> None:
        """Run post-copy over these channels until Complete. ``resumed``: the
        channels replace broken ones; ask again for every outstanding page.
        ``push``: the handed-off sockets (``Channel.hand_off()`` tuples, whose
        fds this call consumes) of the native push streams, each then served
        by a thread that places the pushed pages; without them the source
        pushes on ``bulk``."""
        pushed = self._start_push(push)
        try:
            if self.native is not None:
                await self._serve_native(control, urgent, bulk, pushed)
                return
            if resumed:
                outstanding = np.flatnonzero(~np.isnan(self._fault_t))
                if outstanding.size:
                    self._to_request.insert(0, outstanding)
                    self._request_ready.set()
            await until_finished(self._send_requests(urgent), self._receive(urgent, "urgent"),
                                 self._receive(bulk, "bulk"), *pushed, self._finish(control))
        finally:
            self._stop_push()

    # -- the native push streams ----------------------------------------------------------
    def _start_push(self, handoffs: list[tuple]) -> list[asyncio.Future]:
        """A thread per push stream; returns [a future that fails with the
        first thread failure] (empty without push streams)."""
        if not handoffs:
            return []
        loop = asyncio.get_running_loop()
        self._push_failed = loop.create_future()
        fds = [h[0] for h in handoffs]
        try:
            for k, (fd, version, send_seq, recv_seq, max_payload) in enumerate(handoffs):
                stream = PostcopyDestStream(self.pm, self.decoder.hashes.values, self.native)
                self._push.append(stream)
                fds[k] = None               # attach_fd owns it from here, even on failure
                stream.attach_fd(fd, version=version, send_seq=send_seq, recv_seq=recv_seq,
                                 max_payload_bytes=max_payload)
                loop.add_reader(stream.fileno(), self._on_push)
        except BaseException:
            for fd in fds:
                if fd is not None:
                    close_handed_off(fd)
            self._stop_push()
            raise
        return [self._push_failed]

    def _on_push(self) -> None:
        for s in self._push:
            s.clear_notify()
        self._fold_push()
        self._check_done()
        for s in self._push:
            err = s.failure()
            if isinstance(err, ConnectionLost) and self._done.is_set():
                err = None      # every page is here: the source may close at Complete
            if err is not None and self._push_failed is not None \
                    and not self._push_failed.done():
                self._push_failed.set_exception(err)

    def _fold_push(self) -> None:
        for s in self._push:
            self.stats.pages_pushed += s.fold_into(self.stats)["pages"]
            lat = s.drain_latencies_us()
            if lat.size:
                self.stats.fault_latency.add_many(lat)

    def _stop_push(self) -> None:
        """Stop and join the push threads, their counters folded."""
        loop = asyncio.get_running_loop()
        for s in self._push:
            loop.remove_reader(s.fileno())
            s.detach()
        self._fold_push()
        for s in self._push:
            s.close()
        self._push = []
        if self._push_failed is not None and not self._push_failed.done():
            self._push_failed.cancel()
        self._push_failed = None
        self._check_done()

    async def _serve_native(self, control: Channel, urgent: Channel, bulk: Channel,
                            pushed: list[asyncio.Future]) -> None:
        """The urgent channel goes to the native thread (which re-asks for
        every outstanding page itself); this loop keeps bulk and control."""
        self._native_failed = asyncio.get_running_loop().create_future()
        self.native.attach(urgent, cpu=self._urgent_cpu, spin_us=self._urgent_spin_us,
                           rt_priority=self._urgent_rt_priority)
        try:
            await until_finished(self._native_failed, self._receive(bulk, "bulk"), *pushed,
                                 self._finish(control))
        finally:
            # The source closes the channel once Complete is sent: the thread's
            # EOF then is the normal end, not an error.
            self.native.detach()
            self._native_failed = None
            self._on_native()

    async def report_present(self, control: Channel) -> None:
        """On a resumed control channel: tell the source what we hold."""
        bits = np.packbits(self.pm.present_mask(), bitorder="little").tobytes()
        await control.send(PresentReport(self.npages, bits))

    async def _send_requests(self, urgent: Channel) -> None:
        while True:
            await self._request_ready.wait()
            self._request_ready.clear()
            pending, self._to_request = self._to_request, []
            if not pending:
                continue
            pages = np.unique(np.concatenate(pending))
            # only pages still outstanding (a push may have landed them meanwhile)
            pages = pages[~np.isnan(self._fault_t[pages])]
            for first in range(0, pages.size, MAX_REQUEST_PAGES):
                chunk = pages[first:first + MAX_REQUEST_PAGES]
                self.stats.urgent_requests += 1
                self.stats.pages_requested += int(chunk.size)
                await urgent.send(PageRequest(next(self._request_ids), tuple(chunk.tolist())))

    async def _receive(self, ch: Channel, what: str) -> None:
        while True:
            event = await ch.recv()
            if event is None:
                # After the last page landed the source may close its page
                # channels as soon as it has answered Complete; that EOF can
                # be read before the control channel's Complete is.
                if self._done.is_set():
                    return
                raise RemoteProtocolError(f"the source closed the {what} channel during "
                                          "post-copy", phase="postcopy")
            # The channel's state allows the source PageBatch, Ping and Abort only.
            if isinstance(event, Ping):
                await ch.send(Pong(event.nonce))
                continue
            if isinstance(event, Abort):
                raise RemoteProtocolError(f"the source aborted the {what} channel: "
                                          f"{event.reason}", phase="postcopy")
            self._apply(event, urgent=what == "urgent")
            await asyncio.sleep(0)   # let fault reading and requests in between batches

    def _apply(self, event: PageBatch, *, urgent: bool) -> None:
        try:
            batch = self._apply_raw(event.data) or self.decoder.apply(event.data)
        except CodecError as exc:
            raise RemoteProtocolError(f"bad post-copy page batch: {exc}",
                                      phase="postcopy") from exc
        if batch.npages != event.npages:
            raise RemoteProtocolError(f"page batch announced {event.npages} pages but held "
                                      f"{batch.npages}", phase="postcopy")
        now = time.perf_counter()
        idx = batch.page_indices.astype(np.int64)
        if self.native is not None:
            lat = self.native.settle_us(idx)
            if lat.size:
                self.stats.fault_latency.add_many(lat)
        t = self._fault_t[idx]
        waited = ~np.isnan(t)
        if waited.any():
            self.stats.fault_latency.add_many((now - t[waited]) * 1e6)
            self._fault_t[idx[waited]] = np.nan
        self.stats.add_batch(batch)
        if not urgent:
            self.stats.pages_pushed += batch.npages
        self._check_done()

    def _apply_raw(self, data) -> DecodedBatch | None:
        """Small all-RAW batches (fault replies) without the codec's fixed cost."""
        runs = parse_raw(memoryview(data).cast("B"), self.npages)
        if runs is None:
            return None
        hashes = self.decoder.hashes.values
        parts = []
        npages = raw_pages = 0
        for first, count, view in runs:
            if view is None:
                self.pm.place_zero(first, count)
                hashes[first:first + count] = ZERO_PAGE_HASH
            else:
                staging = np.frombuffer(view, dtype=np.uint8).reshape(count, PAGE_SIZE)
                self.pm.place(first, view, count)
                hashes[first:first + count] = hash_pages(staging)
                raw_pages += count
            parts.append(np.arange(first, first + count, dtype=np.int64))
            npages += count
        nbytes = len(memoryview(data).cast("B"))
        out = DecodedBatch(page_indices=np.concatenate(parts), npages=npages, nbytes=nbytes,
                           nruns=len(runs))
        out.pages_by_encoding["raw"] = raw_pages
        out.bytes_by_encoding["raw"] = raw_pages * PAGE_SIZE
        out.pages_by_encoding["zero"] = npages - raw_pages
        return out

    def _check_done(self) -> None:
        if self.pm.missing == 0 and not self._done.is_set():
            self.mark("all_present")
            self._done.set()

    def mark(self, milestone: str) -> None:
        """Note when ``milestone`` was (last) reached, in ms after the guest
        resumed here (stats.postcopy_timeline_ms)."""
        self.stats.postcopy_timeline_ms[milestone] = (time.monotonic() - self._t_start) * 1e3

    async def _finish(self, control: Channel) -> None:
        """Every page here ─ PostcopyComplete ─▶ ◀ Complete. Meanwhile the
        source Pings when the control channel is quiet: each is answered,
        and ``silence_s`` without any frame from it is a break (a black-holed
        link resets nothing, so only silence tells)."""
        done = asyncio.ensure_future(self._done.wait())
        recv = asyncio.ensure_future(control.recv())
        try:
            while not done.done():
                await asyncio.wait([recv, done], timeout=self.silence_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if recv.done():
                    await self._answer_ping(control, recv.result())
                    recv = asyncio.ensure_future(control.recv())
                elif not done.done():
                    raise self._silent()
            self.stats.postcopy_duration_ms = (time.monotonic() - self._t_start) * 1e3
            digest = self.decoder.hashes.digest()
            await control.send(PostcopyComplete(self.stats.pages_sent, digest))
            self.mark("postcopy_complete_sent")
            while True:
                await asyncio.wait([recv], timeout=self.silence_s)
                if not recv.done():
                    raise self._silent()
                answer = recv.result()
                if isinstance(answer, Complete):
                    self.mark("complete_received")
                    self.complete = True
                    return
                await self._answer_ping(control, answer)
                recv = asyncio.ensure_future(control.recv())
        finally:
            recv.cancel()
            done.cancel()

    async def _answer_ping(self, control: Channel, event) -> None:
        """Answer the source's keepalive; anything else is unexpected here."""
        if not isinstance(event, Ping) or isinstance(event, Pong):
            raise self._unexpected(event)
        await control.send(Pong(event.nonce))

    def _silent(self) -> ConnectionLost:
        return ConnectionLost(f"nothing from the source for {self.silence_s:g} s during "
                              "post-copy", phase="postcopy")

    @staticmethod
    def _unexpected(event) -> Exception:
        """Why the control channel ended post-copy early: the protocol's state
        allows the source nothing but Abort before PostcopyComplete, and only
        Complete or Abort after it; or the source closed the channel."""
        if event is None:
            return RemoteProtocolError("the source closed the control channel during "
                                       "post-copy", phase="postcopy")
        return MigrationError(f"the source aborted post-copy: {event.reason}",
                              phase="postcopy")


__all__ = ["FaultService", "PostcopyPlacer"]

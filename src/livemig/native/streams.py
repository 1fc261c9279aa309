"""Bulk page streams on native threads (csrc/channels/lm_stream*.c).

Theory of operation
-------------------
On the Python path every page of a round goes through the encoder, the
event loop's channel and the decoder, and the interpreter's per-batch cost
holds migrations far below the link's speed. Here, once a bulk channel's
handshake is done, :meth:`Channel.hand_off` gives a dup of its socket and its
next sequence numbers to a native thread on each side:

* :class:`SourceStream` is given one round's page indices at a time
  (:meth:`SourceStream.send_round`); its thread copies each non-zero page to
  a staging buffer, hashes it into the encoder's ``sent_hashes`` array, sends
  ZERO/RAW page batches (BLOCK pages too, given the encoder's block
  fingerprints, and LZ4 runs where :meth:`SourceStream.use_lz4` says and
  compression pays) and closes its part of the round with a StreamEnd; the
  destination's StreamAck closes the round. With :meth:`SourceStream.set_window`
  above 1 the owner may queue several rounds: the thread sends each without
  waiting for the previous one's ack and takes the acks as they come (the
  post-copy push keeps a few chunks in flight this way).
* :class:`DestStream` checks and places every batch, writing the landed
  pages' hashes into the decoder's hash array, their block hashes into the
  placer's HeldBlocks and marking them in the held-pages array, and answers
  each StreamEnd with a StreamAck.

Python stays the control plane: the engine partitions a round's pages
(:func:`partition`: a page always travels on the same stream, so its versions
land in order), waits on each thread's eventfd with its event loop (no
polling), and folds the counters (:meth:`_NativeStream.round_counts`,
:meth:`_NativeStream.stats`) into the migration's stats. Page bytes never
become Python objects.

Each stream is a :class:`ChannelThread` over the guest memory, which owns the
handle, the notify fd, status and failure (:mod:`.chanthread`).
"""
from __future__ import annotations

import collections
import errno
import os
from dataclasses import dataclass

import numpy as np

from . import PAGE_SIZE, check, ffi, lib
from .chanthread import ChannelThread, with_reason
from .memory import GuestMemory
from .tls import TlsSession

ENV_SWITCH = "LIVEMIG_NATIVE_STREAMS"
STRIPE_PAGES = 64
"""Pages go to streams in stripes of this many consecutive pages
(stream = (page // STRIPE_PAGES) % N): contiguous runs stay long and a
round's pages spread evenly over the streams."""
BATCH_PAGES = lib.LM_STREAM_BATCH_PAGES
WINDOW_MAX = lib.LM_STREAM_WINDOW_MAX
"""The most rounds a source stream keeps queued or in flight."""
_LATENCY_DRAIN = 4096
SEND_FRAME_BYTES = (lib.LM_WIRE_BATCH_PREFIX_BYTES + lib.LM_BATCH_HEADER_BYTES
                    + BATCH_PAGES * (lib.LM_BATCH_RUN_BYTES + lib.LM_PAGE_SIZE))
"""The largest payload a source thread sends: the peer's cap must admit it."""


def probe() -> tuple[bool, str]:
    """(True, "") when native streams can run here, else (False, reason)."""
    rc, reason = with_reason(lib.lm_stream_probe)
    return rc == 0, reason


def lz4_probe() -> tuple[bool, str]:
    """(True, "") when the stream threads can send and decode LZ4 here (liblz4
    loads), else (False, reason)."""
    mem = GuestMemory(PAGE_SIZE)
    try:
        stream = SourceStream(mem, None)
        try:
            return stream.use_lz4(1, 0.0)
        finally:
            stream.close()
    finally:
        mem.close()


def close_handed_off(fd: "int | TlsSession") -> None:
    """Close what ``Channel.hand_off()`` gave (a socket, or a TLS stream's
    session) when no thread took it."""
    if isinstance(fd, TlsSession):
        fd.close()
    else:
        os.close(fd)


def path_label(nstreams: int, *, tls: bool) -> str:
    """``stats.data_path`` of a migration on ``nstreams`` native streams,
    both sides (``tls``: they speak mutual TLS in their threads)."""
    return f"native-streams ×{nstreams}" + (" over TLS" if tls else "")


def disabled_by_environment() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip() == "0"


def partition(pages: np.ndarray, nstreams: int) -> list[np.ndarray]:
    """Split ascending page indices into ``nstreams`` ascending uint64 arrays
    by stripe; the same page always lands in the same part."""
    pages = np.ascontiguousarray(pages, dtype=np.uint64)
    if nstreams == 1:
        return [pages]
    owner = (pages // STRIPE_PAGES) % nstreams
    return [np.ascontiguousarray(pages[owner == k]) for k in range(nstreams)]


@dataclass(frozen=True)
class RoundCounts:
    """One stream's part of the latest closed round."""

    round: int
    pages: int
    bytes: int


class _NativeStream(ChannelThread):
    """What both sides share: attach, counters, the round's counts."""

    _destroy = staticmethod(lib.lm_stream_destroy)
    _notify_fd = staticmethod(lib.lm_stream_notify_fd)
    _status = staticmethod(lib.lm_stream_status)
    _stats_get = staticmethod(lib.lm_stream_stats_get)
    _stats_type = "lm_stream_stats"
    _running_status = lib.LM_STREAM_RUNNING
    _label = "bulk stream"
    _channel = "bulk"
    _phase = "precopy"

    def attach_fd(self, fd: "int | TlsSession", *, version: int, send_seq: int = 0,
                  recv_seq: int = 0, max_payload_bytes: int = 64 << 20) -> None:
        """Start the thread on a connected stream socket ``fd``, or on a TLS
        stream's :class:`~.tls.TlsSession` (its frames then go through TLS);
        ownership passes, even on failure. Its next frames carry these
        sequences."""
        if isinstance(fd, TlsSession):
            check(lib.lm_stream_attach_tls(self._h, fd.take(), version, send_seq, recv_seq,
                                           max_payload_bytes),
                  "starting a native bulk stream thread under TLS")
            return
        check(lib.lm_stream_attach(self._h, fd, version, send_seq, recv_seq, max_payload_bytes),
              "starting a native bulk stream thread")

    def detach(self) -> None:
        """Stop and join the thread (its socket shut down); the counters stay
        readable until :meth:`close`. What it ended with: :meth:`failure`."""
        lib.lm_stream_detach(self._h)

    def fold_into(self, stats) -> dict[str, int]:
        """Add what the thread sent or placed since the last fold to ``stats``
        (MigrationStats): pages and page-batch bytes, per encoding, and its
        CPU time. Returns the counters' increments."""
        d = self._unfolded()
        stats.pages_sent += d["pages"]
        stats.bytes_sent += d["batch_bytes"]
        for name in ("zero", "raw", "block", "lz4"):
            stats.pages_by_encoding[name] = (stats.pages_by_encoding.get(name, 0)
                                             + d[f"{name}_pages"])
        for name, nbytes in (("raw", d["raw_pages"] * PAGE_SIZE), ("block", d["block_bytes"]),
                             ("lz4", d["lz4_bytes"])):
            stats.bytes_by_encoding[name] = stats.bytes_by_encoding.get(name, 0) + nbytes
        stats.stream_cpu_s += d["cpu_ns"] / 1e9
        return d

    def round_counts(self) -> RoundCounts | None:
        """This stream's part of the latest closed round (None before any)."""
        ns = self.stats()
        if not ns["rounds"]:
            return None
        return RoundCounts(ns["last_round"], ns["last_round_pages"], ns["last_round_bytes"])


def _check_hashes(hashes: np.ndarray | None, npages: int) -> None:
    if hashes is not None and (hashes.dtype != np.uint64 or hashes.shape != (npages,)
                               or not hashes.flags.c_contiguous):
        raise ValueError(f"hashes must be a contiguous uint64[{npages}] array")


def _block_table_ptrs(blocks, npages: int) -> tuple:
    """(fp, fp_valid) pointers of a codec.blockdelta table, or NULLs."""
    if blocks is None:
        return ffi.NULL, ffi.NULL
    if blocks.table.shape[0] != npages or blocks.valid.shape != (npages,):
        raise ValueError(f"block fingerprints must cover {npages} pages")
    return (ffi.from_buffer("uint64_t[]", blocks.table),
            ffi.from_buffer("uint8_t[]", blocks.valid))


class SourceStream(_NativeStream):
    """Source side over a :class:`GuestMemory`; ``hashes`` (the encoder's
    ``sent_hashes.values``) receive each sent page's hash; ``fingerprints``
    (the encoder's :class:`Fingerprints`, or None: no BLOCK pages) are kept
    up to date with what the receiver holds; ``pace`` (a :class:`~.pace.Pace`
    shared by the migration's streams, or None) caps the bandwidth."""

    def __init__(self, memory, hashes: np.ndarray | None, fingerprints=None, pace=None):
        pages = memory.pages
        npages = pages.shape[0]
        _check_hashes(hashes, npages)
        out = ffi.new("lm_stream **")
        base = ffi.from_buffer("uint8_t[]", pages, require_writable=False)
        hptr = ffi.NULL if hashes is None else ffi.from_buffer("uint64_t[]", hashes)
        fp, fp_valid = _block_table_ptrs(fingerprints, npages)
        check(lib.lm_stream_source_create(base, npages, hptr, fp, fp_valid, out),
              "creating a native bulk stream (source)")
        super().__init__(out[0], memory, (pages, hashes, fingerprints, base, hptr, fp, fp_valid,
                                          pace))
        if pace is not None:
            check(lib.lm_stream_set_pace(self._h, pace.ptr), "pacing a bulk stream")
        # the page arrays of the rounds queued last, read by the thread until
        # acked: a round is queued only while fewer than the window are open,
        # so any array older than the last WINDOW_MAX ones was acked
        self._round_pages: collections.deque = collections.deque(maxlen=WINDOW_MAX)

    def use_lz4(self, chunk_pages: int, min_saving_pct: float) -> tuple[bool, str]:
        """Before attach: send RAW runs of up to ``chunk_pages`` pages as LZ4
        where that saves ``min_saving_pct`` (the codec's rule, judged per
        batch). (True, "") or (False, why not: liblz4 does not load here)."""
        rc, reason = with_reason(lib.lm_stream_source_lz4, self._h, chunk_pages,
                                 min_saving_pct)
        if rc == -errno.ENOSYS or rc == -errno.ENOENT:
            return False, reason
        check(rc, "configuring LZ4 on a bulk stream")
        return True, ""

    def use_postcopy(self) -> None:
        """Before attach: this stream pushes owed pages after the switchover
        (frames flagged POSTCOPY, ZERO and RAW runs only: no LZ4, and the
        stream must have been made without fingerprints)."""
        check(lib.lm_stream_source_postcopy(self._h), "making a bulk stream a post-copy push")
        self._phase = "postcopy"

    def set_window(self, rounds: int) -> None:
        """Let up to ``rounds`` (1 .. :data:`WINDOW_MAX`) rounds be queued or
        in flight at once; 1 (the default) is stop-and-wait."""
        check(lib.lm_stream_source_window(self._h, rounds), "setting a bulk stream's window")

    def set_link_bytes_per_s(self, bytes_per_s: float | None) -> None:
        """The link's measured bandwidth, which LZ4 must beat (None: unknown)."""
        lib.lm_stream_source_link(self._h, int(bytes_per_s or 0))

    def send_round(self, round_index: int, pages: np.ndarray) -> None:
        """Queue this stream's part of a round (ascending page indices, round
        indices ascending); the notify fd says when it is acked
        (:meth:`round_counts`, stats ``rounds``) or failed. Raises (EBUSY)
        while the window's rounds are all open."""
        arr = np.ascontiguousarray(pages, dtype=np.uint64)
        check(lib.lm_stream_send_round(self._h, round_index, ffi.from_buffer("uint64_t[]", arr),
                                       arr.size), "queueing a round on a bulk stream")
        self._round_pages.append(arr)


class DestStream(_NativeStream):
    """Destination side over a :class:`GuestMemory`; ``hashes`` (the
    decoder's ``PageHashes.values``), ``held`` (bool per page) and ``blocks``
    (the placer's :class:`HeldBlocks`, or None: BLOCK pages refused) are
    written for every page placed; with ``fill`` (a
    :class:`~.firsttouch.FirstTouchFill` over ``memory``) a page's first
    version lands without the kernel zeroing it first. All must outlive
    :meth:`close`."""

    def __init__(self, memory, hashes: np.ndarray | None, held: np.ndarray | None,
                 blocks=None, fill=None):
        pages = memory.pages
        npages = pages.shape[0]
        _check_hashes(hashes, npages)
        if held is not None and (held.dtype != np.bool_ or held.shape != (npages,)
                                 or not held.flags.c_contiguous):
            raise ValueError(f"held must be a contiguous bool[{npages}] array")
        out = ffi.new("lm_stream **")
        base = ffi.from_buffer("uint8_t[]", pages)
        hptr = ffi.NULL if hashes is None else ffi.from_buffer("uint64_t[]", hashes)
        held_ptr = ffi.NULL if held is None else ffi.from_buffer("uint8_t[]", held.view(np.uint8))
        fp, fp_valid = _block_table_ptrs(blocks, npages)
        check(lib.lm_stream_dest_create(base, npages, hptr, held_ptr, fp, fp_valid, out),
              "creating a native bulk stream (destination)")
        super().__init__(out[0], memory, (pages, hashes, held, blocks, base, hptr, held_ptr, fp,
                                          fp_valid, fill))
        if fill is not None:
            check(lib.lm_stream_dest_fill(self._h, fill.handle),
                  "placing first versions of pages with userfaultfd")


class PostcopyDestStream(_NativeStream):
    """Destination side of a post-copy push stream over a
    :class:`~.postcopy.PostcopyMemory`: every page lands with UFFDIO_COPY /
    ZEROPAGE (a page the urgent path placed first is skipped, EEXIST), its
    hash stored first in ``hashes`` (the post-copy decoder's array, the final
    digest's input); with ``urgent`` (the :class:`~.urgent.NativeFaultServer`
    over the same memory) a fault outstanding on a pushed page is settled.
    ``pm``, ``hashes`` and ``urgent`` must outlive :meth:`close`."""

    _phase = "postcopy"

    def __init__(self, pm, hashes: np.ndarray | None, urgent=None):
        pages = pm.memory.pages
        npages = pages.shape[0]
        _check_hashes(hashes, npages)
        out = ffi.new("lm_stream **")
        base = ffi.from_buffer("uint8_t[]", pages)
        hptr = ffi.NULL if hashes is None else ffi.from_buffer("uint64_t[]", hashes)
        uptr = ffi.NULL if urgent is None else urgent._h
        check(lib.lm_stream_dest_postcopy_create(base, npages, hptr, pm.handle, uptr, out),
              "creating a native post-copy push stream (destination)")
        super().__init__(out[0], pm, (pages, hashes, urgent, base, hptr))
        self._lat = np.empty(_LATENCY_DRAIN, dtype=np.uint64)

    def drain_latencies_us(self) -> np.ndarray:
        """Latencies in µs (fault read -> placed) of the faults this thread's
        placements served since the last call."""
        parts = []
        while True:
            n = lib.lm_stream_latencies_drain(self._h, ffi.from_buffer("uint64_t[]", self._lat),
                                              _LATENCY_DRAIN)
            check(n, "draining push-served fault latencies")
            if n:
                parts.append(self._lat[:n] / 1e3)
            if n < _LATENCY_DRAIN:
                break
        return np.concatenate(parts) if parts else np.empty(0)


__all__ = ["SourceStream", "DestStream", "PostcopyDestStream", "RoundCounts", "partition", "probe", "lz4_probe",
           "disabled_by_environment", "path_label", "close_handed_off", "ENV_SWITCH", "STRIPE_PAGES",
           "BATCH_PAGES", "SEND_FRAME_BYTES", "WINDOW_MAX"]

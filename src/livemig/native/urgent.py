"""The urgent post-copy channel on native threads (csrc/channels/).

Theory of operation
-------------------
On the Python path a fault travels uffd -> destination loop -> socket ->
source loop -> socket -> destination loop -> UFFDIO_COPY, and both loops are
also busy with bulk batches, so a fault waits behind whatever batch is in
hand (0.4-1.3 ms p50 measured). Here, once the urgent channel's handshake is
done, :meth:`Channel.hand_off` gives a dup of its socket and the next
sequence numbers to a native thread on each side:

* :class:`NativeFaultServer` (destination) reads faults from the uffd,
  sends PageRequests, places the replies with UFFDIO_COPY (waking the vCPU)
  and stores their content hashes into the decoder's hash array. Python
  still places pushed pages through the same :class:`PostcopyMemory`
  (EEXIST is harmless) and drains the thread's fault latencies into the
  stats. The handle lives for the whole post-copy phase; its outstanding
  requests survive a broken connection and are sent again on the next
  :meth:`attach`.
* :class:`NativePageServer` (source) answers PageRequests straight from the
  paused VM's memory (writev of header + guest pages) and publishes the
  requested page indices in a ring the pusher drains for pre-paging.

The frames are those of the Python path, so each side picks its path alone
and either may fall back: :func:`choose_path` says which and why (TLS,
``MigrationConfig.native_urgent=False``, ``LIVEMIG_NATIVE_URGENT=0``, or
libxxhash not loadable). The thread reports through an eventfd the owner's
loop watches (``add_reader``): it ended (error or EOF), or it has queued
data for Python. Threads are stopped and joined (:meth:`detach`) before
the memory they use is freed.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

import numpy as np

from . import PAGE_SIZE, check, ffi, lib
from .chanthread import ChannelThread, with_reason

log = logging.getLogger(__name__)

ENV_SWITCH = "LIVEMIG_NATIVE_URGENT"
_DRAIN = 1 << 16


@dataclass(frozen=True)
class PathChoice:
    """Which urgent-channel path runs, and why (``stats.fault_path``)."""

    native: bool
    reason: str

    @property
    def name(self) -> str:
        return "native" if self.native else "python"


def probe() -> tuple[bool, str]:
    """(True, "") when the native path can run here, else (False, reason)."""
    rc, reason = with_reason(lib.lm_urgent_probe)
    return rc == 0, reason


def choose_path(channel, *, enabled: bool = True) -> PathChoice:
    """Decide for one urgent channel (after its handshake)."""
    if not enabled:
        choice = PathChoice(False, "native urgent path disabled by configuration")
    elif os.environ.get(ENV_SWITCH, "1").strip() == "0":
        choice = PathChoice(False, f"native urgent path disabled by {ENV_SWITCH}=0")
    elif channel.get_extra_info("ssl_object") is not None:
        choice = PathChoice(False, "the urgent channel uses TLS, which the native thread "
                                   "does not speak")
    elif channel.get_extra_info("socket") is None:
        choice = PathChoice(False, "the urgent channel's transport exposes no socket")
    else:
        ok, reason = probe()
        choice = PathChoice(ok, "native threads serve the urgent channel" if ok
                            else f"native urgent path unavailable: {reason}")
    log.info("urgent channel: %s path (%s)", choice.name, choice.reason)
    return choice


class _NativeUrgent(ChannelThread):
    """What both sides share: attach/detach, scheduling, counters. The
    owner (PostcopyMemory / GuestMemory) refuses to close while used."""

    _destroy = staticmethod(lib.lm_urgent_destroy)
    _notify_fd = staticmethod(lib.lm_urgent_notify_fd)
    _status = staticmethod(lib.lm_urgent_status)
    _stats_get = staticmethod(lib.lm_urgent_stats_get)
    _stats_type = "lm_urgent_stats"
    _running_status = lib.LM_URGENT_RUNNING
    _label = "urgent channel"
    _channel = "urgent"
    _phase = "postcopy"

    def __init__(self, handle, owner, keepalive: tuple):
        self._attached = False
        super().__init__(handle, owner, keepalive)

    def attach_fd(self, fd: int, *, version: int = 1, send_seq: int = 0, recv_seq: int = 0,
                  max_payload_bytes: int = 64 << 20, cpu: int = -1, spin_us: int = 0,
                  rt_priority: int = 0) -> None:
        """Start the thread on a connected stream socket ``fd`` (ownership
        passes, even on failure) whose next frames carry these sequences.
        ``rt_priority`` > 0 asks for SCHED_FIFO at that priority; whether the
        kernel granted it shows in :meth:`stats` (``rt_priority``, ``rt_errno``)."""
        rc = lib.lm_urgent_set_priority(self._h, rt_priority)
        if rc < 0:
            os.close(fd)
            check(rc, "setting the urgent thread's priority")
        check(lib.lm_urgent_attach(self._h, fd, version, send_seq, recv_seq, max_payload_bytes,
                                   cpu, spin_us), "starting the native urgent thread")
        self._attached = True

    def detach(self) -> int:
        """Stop and join the thread; its exit status (0 or -errno)."""
        if self._h is None or not self._attached:
            return 0
        self._attached = False
        return lib.lm_urgent_detach(self._h)

    @property
    def attached(self) -> bool:
        return self._attached

    def scheduling(self, asked: int) -> str:
        """How the thread was scheduled, for ``fault_path_reason``."""
        ns = self.stats()
        if asked <= 0:
            return "normal priority"
        if ns["rt_priority"]:
            return f"SCHED_FIFO priority {ns['rt_priority']}"
        err = ns["rt_errno"]
        name = errno.errorcode.get(err, str(err)) if err else "not applied"
        return f"SCHED_FIFO refused ({name}): normal priority"

    def fold_into(self, stats, side: str, rt_priority: int) -> dict[str, int]:
        """Add what the thread did since the last fold (requests, pages and
        bytes it sent or received) to ``stats`` (MigrationStats), and say in
        ``fault_path_reason`` how ``side``'s thread was scheduled. Returns
        the counters' increments."""
        d = self._unfolded()
        stats.urgent_requests += d["requests"]
        stats.pages_requested += d["pages_requested"]
        stats.pages_sent += d["pages_replied"]
        stats.bytes_sent += d["payload_bytes_replied"]
        stats.pages_by_encoding["raw"] = stats.pages_by_encoding.get("raw", 0) + d["pages_replied"]
        stats.bytes_by_encoding["raw"] = (stats.bytes_by_encoding.get("raw", 0)
                                          + d["pages_replied"] * PAGE_SIZE)
        note = f"{side} thread {self.scheduling(rt_priority)}"
        if stats.fault_path_reason and note not in stats.fault_path_reason:
            stats.fault_path_reason += f"; {note}"
        return d

    def close(self) -> None:
        super().close()   # lm_urgent_destroy detaches (stops, joins) first
        self._attached = False


class NativeFaultServer(_NativeUrgent):
    """Destination side over a :class:`PostcopyMemory`; ``hashes`` (uint64
    per page, e.g. the decoder's PageHashes.values) receive the content hash
    of each page the thread places. Both must outlive :meth:`close`."""

    def __init__(self, pm, hashes: np.ndarray | None = None):
        if hashes is not None and (hashes.dtype != np.uint64 or hashes.shape != (pm.npages,)
                                   or not hashes.flags.c_contiguous):
            raise ValueError(f"hashes must be a contiguous uint64[{pm.npages}] array")
        out = ffi.new("lm_urgent **")
        hptr = ffi.NULL if hashes is None else ffi.from_buffer("uint64_t[]", hashes)
        check(lib.lm_urgent_dest_create(pm.handle, hptr, out),
              "creating the native fault server")
        super().__init__(out[0], pm, (hashes, hptr))
        self._lat = np.empty(_DRAIN, dtype=np.uint64)

    def drain_latencies_us(self) -> np.ndarray:
        """Fault latencies (read -> placed) recorded since the last call, in µs."""
        parts = []
        while True:
            n = lib.lm_urgent_latencies_drain(self._h, ffi.from_buffer("uint64_t[]", self._lat),
                                              _DRAIN)
            check(n, "draining fault latencies")
            if n:
                parts.append(self._lat[:n] / 1e3)
            if n < _DRAIN:
                break
        return np.concatenate(parts) if parts else np.empty(0)

    def settle_us(self, page_indices: np.ndarray) -> np.ndarray:
        """After placing ``page_indices`` ourselves (a pushed batch): the
        latencies in µs of the faults that waited for them (each fault is
        counted once, by whoever saw its page placed first)."""
        idx = np.ascontiguousarray(page_indices, dtype=np.int64)
        if not idx.size:
            return np.empty(0)
        out = np.empty(idx.size, dtype=np.uint64)
        n = check(lib.lm_urgent_dest_settle(self._h, ffi.from_buffer("int64_t[]", idx), idx.size,
                                            ffi.from_buffer("uint64_t[]", out)),
                  "settling placed pages")
        return out[:n] / 1e3

    @property
    def outstanding(self) -> int:
        return int(lib.lm_urgent_outstanding(self._h))


class NativePageServer(_NativeUrgent):
    """Source side over a paused VM's :class:`GuestMemory` (it must not change
    while attached); ``hashes`` (the encoder's sent_hashes.values) receive
    each sent page's hash; ``round_index`` goes into every reply."""

    def __init__(self, memory, hashes: np.ndarray | None, round_index: int):
        pages = memory.pages
        npages = pages.shape[0]
        if hashes is not None and (hashes.dtype != np.uint64 or hashes.shape != (npages,)):
            raise ValueError(f"hashes must be a uint64[{npages}] array")
        out = ffi.new("lm_urgent **")
        base = ffi.from_buffer("uint8_t[]", pages, require_writable=False)
        hptr = ffi.NULL if hashes is None else ffi.from_buffer("uint64_t[]", hashes)
        check(lib.lm_urgent_source_create(base, npages, hptr, round_index, out),
              "creating the native page server")
        super().__init__(out[0], memory, (pages, hashes, base, hptr))
        self._req = np.empty(_DRAIN, dtype=np.uint64)

    def drain_requests(self) -> np.ndarray:
        """Page indices requested since the last call, in arrival order."""
        parts = []
        while True:
            n = lib.lm_urgent_requests_drain(self._h, ffi.from_buffer("uint64_t[]", self._req),
                                             _DRAIN)
            check(n, "draining requested pages")
            if n:
                parts.append(self._req[:n].astype(np.int64))
            if n < _DRAIN:
                break
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


__all__ = ["NativeFaultServer", "NativePageServer", "PathChoice", "choose_path", "probe",
           "ENV_SWITCH"]

"""Post-copy guest memory: pages that arrive after the guest has resumed.

``PostcopyMemory(memory, present)`` registers a :class:`GuestMemory` with
userfaultfd in MISSING mode (csrc/postcopy/lm_postcopy.c). Pages marked in ``present``
(already valid, e.g. pre-copied) are left alone; every other page is
discarded so that the first access to it blocks the accessing thread in the
kernel and queues a fault. The owner of the event loop watches the fd::

    loop.add_reader(pm.fileno(), on_faults)      # on_faults calls pm.read_faults()

and answers each page index with :meth:`place` (bytes from the source),
:meth:`place_zero` or :meth:`place_move` (remap pages of a private anonymous
buffer, no copy), each of which wakes the blocked threads. Placing a page
twice is harmless (counted in ``stats["eexist_pages"]``); partial runs and
EAGAIN are retried natively. Every call releases the GIL (CFFI API mode), so
a native vCPU thread can fault while Python serves it; a *Python* thread must
never touch missing pages, since it would block holding the GIL.

Closing while pages are missing is refused: unregistering wakes the blocked
threads, which would then read zeros. ``close(abandon=True)`` does it anyway,
for a guest that is being thrown away.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable, ConfigError, LivemigError
from .memory import GuestMemory
from . import PAGE_SIZE, check, ffi, lib
from .handles import NativeHandle

BACKEND_NAME = "userfaultfd-missing"
_REASON_BYTES = 512
# Errnos of lm_postcopy_open that mean "this host cannot do it", as opposed to misuse.
_UNAVAILABLE_ERRNOS = {errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_STATS_FIELDS = tuple(name for name, _ in ffi.typeof("lm_postcopy_stats").fields)


@dataclass(frozen=True)
class PostcopyProbe:
    """What post-copy can use on this host; ``reason`` explains what it cannot."""

    missing: bool
    move: bool
    user_mode_only: bool
    reason: str


def probe() -> PostcopyProbe:
    """Try userfaultfd MISSING (and UFFDIO_MOVE) on a scratch mapping."""
    buf = ffi.new("char[]", _REASON_BYTES)
    caps = lib.lm_postcopy_probe(buf, _REASON_BYTES)
    return PostcopyProbe(
        missing=bool(caps & lib.LM_POSTCOPY_CAN_MISSING),
        move=bool(caps & lib.LM_POSTCOPY_CAN_MOVE),
        user_mode_only=bool(caps & lib.LM_POSTCOPY_USER_MODE_ONLY),
        reason=ffi.string(buf).decode(errors="replace"),
    )


def _bitmap_words(present: np.ndarray, npages: int) -> np.ndarray:
    """Accept a bool mask of npages, or packed uint64 words (bit i%64 of word i//64)."""
    present = np.asarray(present)
    nwords = (npages + 63) // 64
    if present.dtype == np.bool_:
        if present.shape != (npages,):
            raise ConfigError(f"present mask must have shape ({npages},), got {present.shape}")
        packed = np.packbits(present, bitorder="little")
        words = np.zeros(nwords * 8, dtype=np.uint8)
        words[: packed.size] = packed
        return words.view("<u8")
    if present.dtype == np.uint64 and present.shape == (nwords,):
        return np.ascontiguousarray(present, dtype="<u8")
    raise ConfigError(
        f"present must be a bool mask of {npages} pages or {nwords} uint64 bitmap words, "
        f"got dtype {present.dtype} shape {present.shape}"
    )


def _close_abandoning(handle) -> None:
    """Destructor of a dropped handle: the guest is being discarded with it."""
    lib.lm_postcopy_close(handle, lib.LM_POSTCOPY_CLOSE_ABANDON)


class PostcopyMemory:
    """Guest memory registered for post-copy; see the module docstring."""

    def __init__(self, memory: GuestMemory, present: np.ndarray | None = None, *,
                 required_features: int = 0, max_faults: int = 256):
        """``required_features``: raw ``UFFD_FEATURE_*`` bits the caller cannot do
        without; a kernel lacking any of them makes this raise BackendUnavailable."""
        self.memory = memory
        self.npages = memory.npages
        words = None if present is None else _bitmap_words(present, self.npages)
        out = ffi.new("lm_postcopy **")
        rc = lib.lm_postcopy_open(memory.handle, required_features, out)
        if rc < 0:
            if -rc in _UNAVAILABLE_ERRNOS:
                raise self._unavailable(-rc, required_features)
            check(rc, "registering guest memory with userfaultfd",
                  "EBUSY: the region is already registered (another PostcopyMemory or a "
                  "userfaultfd dirty tracker is attached)" if -rc == errno.EBUSY else None)
        self._native = NativeHandle(out[0], _close_abandoning, parent=memory.native_handle)
        self._users: set[object] = set()
        memory.attach(self)
        try:
            if words is not None:
                check(lib.lm_postcopy_mark_present(
                    self.handle, ffi.from_buffer("uint64_t[]", words), words.size),
                    "marking pre-copied pages present")
            check(lib.lm_postcopy_discard_absent(self.handle), "discarding missing pages")
        except BaseException:
            self.close(abandon=True)
            raise
        flags = lib.lm_postcopy_flags(self.handle)
        self.can_move = bool(flags & lib.LM_POSTCOPY_CAN_MOVE)
        self.user_mode_only = bool(flags & lib.LM_POSTCOPY_USER_MODE_ONLY)
        self._faults = np.zeros(max_faults, dtype=np.uint64)
        self._faults_c = ffi.from_buffer("uint64_t[]", self._faults)
        self._stats_c = ffi.new("lm_postcopy_stats *")

    @staticmethod
    def _unavailable(err: int, required_features: int) -> BackendUnavailable:
        if err == errno.EOPNOTSUPP and required_features:
            reason = (f"the kernel's userfaultfd lacks a required feature "
                      f"(asked for UFFD_FEATURE bits {required_features:#x})")
            return BackendUnavailable(BACKEND_NAME, reason, "needs a newer kernel")
        found = probe()
        reason = found.reason or f"opening userfaultfd failed: {os.strerror(err)}"
        return BackendUnavailable(
            BACKEND_NAME, reason,
            "run as root, or set sysctl vm.unprivileged_userfaultfd=1, or grant access to "
            "/dev/userfaultfd; post-copy cannot run without it (use pre-copy)")

    # -- the event loop's side ----------------------------------------------------
    @property
    def handle(self):
        if self._native.released:
            raise LivemigError("post-copy memory is closed")
        return self._native.ptr

    def fileno(self) -> int:
        return lib.lm_postcopy_fd(self.handle)

    def read_faults(self) -> np.ndarray:
        """Distinct missing pages faulted on since the last call (uint64, arrival
        order), without blocking; empty when none are pending."""
        n = check(lib.lm_postcopy_read_faults(self.handle, self._faults_c, self._faults.size),
                  "reading userfaultfd fault messages")
        return self._faults[:n].copy()

    # -- placing pages ------------------------------------------------------------------
    def _span(self, first_page: int, npages: int) -> None:
        if first_page < 0 or npages < 0 or first_page + npages > self.npages:
            raise ConfigError(f"pages [{first_page}, {first_page + npages}) are outside "
                              f"the {self.npages}-page guest memory")

    def place(self, first_page: int, data, npages: int | None = None) -> int:
        """Place ``npages`` contiguous pages from ``data`` (any buffer of at least
        npages × 4096 bytes; npages defaults to len(data) // 4096). Returns the
        pages newly placed; pages already present are skipped."""
        src = ffi.from_buffer(data)
        if npages is None:
            npages = len(src) // PAGE_SIZE
        self._span(first_page, npages)
        if len(src) < npages * PAGE_SIZE:
            raise ConfigError(f"{len(src)} bytes of data cannot fill {npages} pages")
        return check(lib.lm_postcopy_copy(self.handle, first_page, src, npages),
                     f"placing pages {first_page}+{npages} with UFFDIO_COPY")

    def place_zero(self, first_page: int, npages: int = 1) -> int:
        """Place ``npages`` zero pages; returns the pages newly placed."""
        self._span(first_page, npages)
        return check(lib.lm_postcopy_zero(self.handle, first_page, npages),
                     f"placing zero pages {first_page}+{npages} with UFFDIO_ZEROPAGE")

    def place_move(self, first_page: int, src, npages: int | None = None) -> int:
        """Remap ``npages`` pages of ``src`` — a writable, page-aligned buffer over
        private anonymous memory of this process — into place, without copying.
        ``src`` reads as zeros afterwards. Raises Unsupported without UFFDIO_MOVE."""
        buf = ffi.from_buffer(src, require_writable=True)
        if npages is None:
            npages = len(buf) // PAGE_SIZE
        self._span(first_page, npages)
        if len(buf) < npages * PAGE_SIZE:
            raise ConfigError(f"{len(buf)} bytes of source cannot fill {npages} pages")
        if int(ffi.cast("uintptr_t", buf)) % PAGE_SIZE:
            raise ConfigError("place_move needs a page-aligned source buffer")
        return check(lib.lm_postcopy_move(self.handle, first_page, buf, npages),
                     f"moving pages {first_page}+{npages} with UFFDIO_MOVE",
                     "UFFDIO_MOVE needs Linux >= 6.8; use place() instead")

    def wake(self, first_page: int, npages: int = 1) -> None:
        self._span(first_page, npages)
        check(lib.lm_postcopy_wake(self.handle, first_page, npages), "UFFDIO_WAKE")

    def invalidate(self, pages: np.ndarray, *, per_run_madvise: bool = False) -> int:
        """Make the given pages absent again (a bool mask of npages, packed uint64
        words, or an array of page indices): their contents are discarded and
        their next access faults. Pages already absent are left alone. Only
        before the guest runs here: a page discarded under a running guest
        loses what it wrote. Returns the pages made absent.

        ``per_run_madvise`` forces one madvise(2) per run instead of batched
        process_madvise(2) (for measurement; the default picks the best)."""
        pages = np.asarray(pages)
        if pages.dtype != np.bool_ and not (pages.dtype == np.uint64
                                             and pages.shape == ((self.npages + 63) // 64,)):
            idx = pages.astype(np.int64, copy=False)
            if idx.size and (idx.min() < 0 or idx.max() >= self.npages):
                raise ConfigError(f"page indices outside the {self.npages}-page guest memory")
            mask = np.zeros(self.npages, dtype=bool)
            mask[idx] = True
            pages = mask
        words = _bitmap_words(pages, self.npages)
        flags = lib.LM_POSTCOPY_INVALIDATE_MADVISE if per_run_madvise else 0
        return check(lib.lm_postcopy_invalidate(
            self.handle, ffi.from_buffer("uint64_t[]", words), words.size, flags),
            "discarding invalidated pages")

    # -- what is here ------------------------------------------------------------------
    @property
    def missing(self) -> int:
        """Pages not present yet."""
        return int(lib.lm_postcopy_missing(self.handle))

    def present_bitmap(self) -> np.ndarray:
        """The present pages as uint64 words, bit i%64 of word i//64 = page i."""
        words = np.zeros((self.npages + 63) // 64, dtype=np.uint64)
        check(lib.lm_postcopy_present_bitmap(self.handle, ffi.from_buffer("uint64_t[]", words),
                                             words.size), "reading the present bitmap")
        return words

    def present_mask(self) -> np.ndarray:
        """The present pages as a bool array of npages."""
        bits = np.unpackbits(self.present_bitmap().view(np.uint8), bitorder="little")
        return bits[: self.npages].astype(bool)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: faults_read, pages_copied/zeroed/moved, eexist_pages,
        eagain_retries, ... (see lm_postcopy_stats in csrc/livemig.h)."""
        lib.lm_postcopy_stats_get(self.handle, self._stats_c)
        return {name: int(getattr(self._stats_c, name)) for name in _STATS_FIELDS}

    # -- lifetime --------------------------------------------------------------------------
    def attach(self, user: object) -> None:
        """Record that ``user`` (a thread serving faults natively) uses the handle."""
        self._users.add(user)

    def detach(self, user: object) -> None:
        self._users.discard(user)

    @property
    def native_handle(self) -> NativeHandle:
        """The owning handle, as ``parent`` of a native fault server."""
        return self._native

    @property
    def closed(self) -> bool:
        return self._native.released

    def close(self, *, abandon: bool = False) -> None:
        """Unregister and close the fd. Refused while pages are missing unless
        ``abandon``: blocked threads are then woken and read zeros."""
        if self._native.released:
            return
        if self._users:
            raise LivemigError(f"post-copy memory is still used by {len(self._users)} "
                               "native server(s); stop them first")
        if abandon:
            self._native.release()
        else:
            missing = self.missing
            check(lib.lm_postcopy_close(self._native.ptr, 0), "closing post-copy memory",
                  f"{missing} page(s) are still missing; place them first, or "
                  "close(abandon=True) if the guest is being discarded")
            self._native.forget()   # lm_postcopy_close freed it
        self.memory.detach(self)

    def __enter__(self) -> "PostcopyMemory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error path the guest is being torn down anyway.
        self.close(abandon=exc_type is not None)

    def __repr__(self) -> str:
        if self.closed:
            return "<PostcopyMemory closed>"
        return f"<PostcopyMemory {self.npages - self.missing}/{self.npages} pages present>"


__all__ = ["PostcopyMemory", "PostcopyProbe", "probe", "BACKEND_NAME"]

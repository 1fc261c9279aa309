"""Guest memory: a native region seen from Python as numpy arrays, zero-copy.

``GuestMemory(size)`` maps a 2 MiB-aligned region through the native core and
exposes it as ``.bytes`` (1-D uint8), ``.pages`` (npages × 4096 uint8) and
``.words`` (npages × 512 uint64) — all views of the same memory, never copies.
The region lives until ``close()`` (or the end of a ``with`` block); the views
must not be used after that, which is why ``close()`` refuses while other
objects (trackers, vCPUs) still hold the region. A region dropped without
``close()`` is unmapped by the garbage collector, after its users
(:mod:`livemig.native.handles`).
"""
from __future__ import annotations

import numpy as np

from .. import native
from ..errors import ConfigError, LivemigError
from . import PAGE_SIZE, check, ffi, lib
from .handles import NativeHandle
from ..units import format_size, parse_size

FLAG_MEMFD = lib.LM_REGION_MEMFD
FLAG_HUGEPAGE = lib.LM_REGION_HUGEPAGE


class GuestMemory:
    """A guest memory region of ``size`` bytes (int or text such as ``"1GiB"``)."""

    def __init__(self, size: int | str, *, memfd: bool = False, hugepages: bool = True):
        length_bytes = parse_size(size, what="guest memory size")
        if length_bytes <= 0 or length_bytes % PAGE_SIZE:
            raise ConfigError(
                f"guest memory size must be a positive multiple of {PAGE_SIZE} bytes, "
                f"got {length_bytes} ({format_size(length_bytes)})"
            )
        flags = (FLAG_MEMFD if memfd else 0) | (FLAG_HUGEPAGE if hugepages else 0)
        out = ffi.new("lm_region **")
        check(lib.lm_region_create(length_bytes, flags, out),
              f"mapping {format_size(length_bytes)} of guest memory")
        self._native = NativeHandle(out[0], lib.lm_region_destroy)
        self.length_bytes = length_bytes
        self.npages = length_bytes // PAGE_SIZE
        self._users: set[object] = set()
        buf = ffi.buffer(lib.lm_region_base(self._native.ptr), length_bytes)
        self.bytes = np.frombuffer(buf, dtype=np.uint8)
        self.pages = self.bytes.reshape(self.npages, PAGE_SIZE)
        self.words = self.bytes.view(np.uint64).reshape(self.npages, PAGE_SIZE // 8)

    # -- native handle, for the other wrappers of the native core -------------
    @property
    def handle(self):
        if self._native.released:
            raise LivemigError("guest memory is closed")
        return self._native.ptr

    @property
    def native_handle(self) -> NativeHandle:
        """The owning handle, as ``parent`` of the native objects that use the region."""
        return self._native

    @property
    def base_address(self) -> int:
        return int(ffi.cast("uintptr_t", lib.lm_region_base(self.handle)))

    def attach(self, user: object) -> None:
        """Record that ``user`` (a tracker, a vCPU) uses the region."""
        self._users.add(user)

    def detach(self, user: object) -> None:
        self._users.discard(user)

    # -- operations ------------------------------------------------------------
    def page(self, index: int) -> memoryview:
        return memoryview(self.pages[index])

    def discard(self, first_page: int, npages: int) -> None:
        """Give pages back to the kernel; they read as zero afterwards."""
        check(lib.lm_region_discard(self.handle, first_page, npages), "discarding guest pages")

    def populate(self, first_page: int = 0, npages: int | None = None,
                 chunk_pages: int = 16384) -> None:
        """Fault pages in writable without changing them, so later writes cost
        no page fault (and no huge-page compaction). Blocking; releases the GIL.
        Raises Unsupported on kernels before 5.14."""
        end = self.npages if npages is None else first_page + npages
        for start in range(first_page, end, chunk_pages):
            n = min(chunk_pages, end - start)
            check(lib.lm_region_populate(self.handle, start, n),
                  "pre-faulting guest memory (MADV_POPULATE_WRITE)",
                  hint="needs Linux 5.14 or later")

    @property
    def closed(self) -> bool:
        return self._native.released

    def close(self) -> None:
        if self._native.released:
            return
        if self._users:
            raise LivemigError(
                f"guest memory is still in use by {len(self._users)} object(s); close them first"
            )
        del self.bytes, self.pages, self.words
        self._native.release()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else format_size(self.length_bytes)
        return f"<GuestMemory {state}>"


__all__ = ["GuestMemory", "native"]

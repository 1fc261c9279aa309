"""Native fault generators and a local fault server, for tests and benchmarks.

A :class:`Toucher` is a native thread reading one word of each listed page and
timing each read, so a missing page blocks *it* (not a Python thread holding
the GIL) until the page is placed. A :class:`LocalFaultServer` is a native
thread answering faults on a :class:`PostcopyMemory` by copying the same page
index from a local source buffer: the latency floor of fault service.
"""
from __future__ import annotations

import errno

import numpy as np

from ..errors import ConfigError
from ..native.memory import GuestMemory
from ..native import check, ffi, lib
from ..native.postcopy import PostcopyMemory


class Toucher:
    """Start a native thread reading the uint64 at ``offset_bytes`` of each page.

    ``values`` and ``latency_ns`` are filled by :meth:`join`. Until then the
    guest memory counts the toucher as a user, so it cannot be unmapped under
    the running thread.
    """

    def __init__(self, memory: GuestMemory, pages, *, offset_bytes: int = 0, cpu: int = -1):
        self.pages = np.ascontiguousarray(pages, dtype=np.uint64)
        if self.pages.size and int(self.pages.max()) >= memory.npages:
            raise ConfigError("toucher pages must lie inside the guest memory")
        self.values = np.zeros(self.pages.size, dtype=np.uint64)
        self.latency_ns = np.zeros(self.pages.size, dtype=np.uint64)
        out = ffi.new("lm_toucher **")
        check(lib.lm_toucher_start(
            lib.lm_region_base(memory.handle), ffi.from_buffer("uint64_t[]", self.pages),
            self.pages.size, offset_bytes, cpu, out), "starting a toucher thread")
        self._handle = out[0]
        self._memory = memory
        memory.attach(self)

    @property
    def done(self) -> int:
        """Touches completed so far."""
        if self._handle is None:
            return self.pages.size
        return int(lib.lm_toucher_done(self._handle))

    def join(self, timeout_s: float) -> None:
        """Wait for the thread and collect its results; raises TimeoutError
        (the thread keeps running) when it is still blocked."""
        if self._handle is None:
            return
        rc = lib.lm_toucher_join(self._handle, int(timeout_s * 1000),
                                 ffi.from_buffer("uint64_t[]", self.values),
                                 ffi.from_buffer("uint64_t[]", self.latency_ns))
        if rc == -errno.ETIMEDOUT:
            raise TimeoutError(f"toucher still blocked after {self.done}/{self.pages.size} pages")
        check(rc, "joining a toucher thread")
        self._handle = None
        self._memory.detach(self)

class LocalFaultServer:
    """Answer faults on ``pm`` from ``source`` (a buffer the size of the guest)."""

    def __init__(self, pm: PostcopyMemory, source: np.ndarray, *, cpu: int = -1):
        if source.nbytes < pm.npages * 4096:
            raise ConfigError("the source buffer is smaller than the guest memory")
        self._source = source
        self._pm = pm
        out = ffi.new("lm_faultserver **")
        check(lib.lm_faultserver_start(pm.handle, ffi.from_buffer("uint8_t[]", source), cpu, out),
              "starting the local fault server")
        self._handle = out[0]
        pm.attach(self)

    def stop(self) -> int:
        """Stop the thread; returns the pages it placed."""
        if self._handle is None:
            return 0
        served = lib.lm_faultserver_stop(self._handle)
        self._handle = None
        self._pm.detach(self)
        return check(served, "local fault server")

    def __del__(self):  # safety net: the thread must not outlive the buffers it uses
        if getattr(self, "_handle", None) is not None:
            self.stop()

    def __enter__(self) -> "LocalFaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["Toucher", "LocalFaultServer"]

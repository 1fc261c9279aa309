"""The bandwidth cap of a migration's bulk streams (csrc/channels/lm_pace.c).

Theory of operation
-------------------
One :class:`Pace` per migration is shared by all its source stream threads:
a token bucket in C that each thread consults before it sends a PageBatch
(it waits until the balance is not negative, then takes the frame's bytes).
The owner sets the cap with :meth:`Pace.set` at any time, from the event
loop's thread, and the threads see the new rate within 20 ms, also while a
thread waits for tokens. The burst is the caller's choice: the engine passes
the Python path's one rule (``aio.ratelimit.burst_bytes_for``), which this
layer may not import.

A pace must outlive the streams that use it: each :class:`SourceStream`
keeps its pace alive until its thread is joined and freed.
"""
from __future__ import annotations

from . import check, ffi, lib
from .handles import NativeHandle


class Pace:
    """A token bucket shared by stream threads; unlimited until :meth:`set`."""

    def __init__(self):
        out = ffi.new("lm_pace **")
        check(lib.lm_pace_create(out), "creating a bandwidth pace")
        self._native = NativeHandle(out[0], lib.lm_pace_destroy)
        self.bandwidth_bps: float | None = None

    @property
    def ptr(self):
        return self._native.ptr

    def set(self, bandwidth_bps: float | None, burst_bytes: int) -> None:
        """Cap at ``bandwidth_bps`` bytes/s with a bucket of ``burst_bytes``;
        None (or 0) lifts the cap."""
        rate = float(bandwidth_bps or 0.0)
        check(lib.lm_pace_set(self._native.ptr, rate, int(burst_bytes)),
              "setting the bulk streams' bandwidth cap")
        self.bandwidth_bps = bandwidth_bps or None

    def stats(self) -> dict[str, int]:
        """bytes (frame bytes taken), waits (frames that waited), waited_ns."""
        out = ffi.new("lm_pace_stats *")
        lib.lm_pace_stats_get(self._native.ptr, out)
        return {name: int(getattr(out, name)) for name, _ in ffi.typeof("lm_pace_stats").fields}


__all__ = ["Pace"]

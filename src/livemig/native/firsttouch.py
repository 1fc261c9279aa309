"""Fresh guest memory filled without zeroing it first (pre-copy destination).

A page written for the first time costs the kernel a fault and the zeroing
of a new page before the write lands; for a gigabyte arriving on the
destination that zeroing is most of the destination's CPU (bench/RESULTS.md
§7). ``FirstTouchFill(memory)`` registers the fresh region with userfaultfd
(MISSING, through :class:`~.postcopy.PostcopyMemory`) so that the bulk
streams place each page's first version with UFFDIO_COPY, which allocates
the page and copies into it in one step (``lm_stream_dest_fill``). A native
zero-fill thread (csrc/postcopy/lm_zerofill.c) answers every other access to
a page still absent with the zero page, exactly as plain anonymous memory
behaves, so no other code — the Python decoder, a digest, the guest itself —
can notice the registration or block on it.

Lifetime: made before the first stream is adopted; closed after every
stream thread is joined (``DestStreams.close``): the zero fill stops, the
region is unregistered, and a page never sent reads as zero, as it did.

Which is cheaper depends on the machine, and on its state: where fresh
memory comes at a low cost (huge pages, zeroed in bulk; a host that has not
taken the memory back), pre-faulting it while round 0 streams and copying
each page into place costs the destination less than UFFDIO_COPY's
allocation per 4 KiB page; where each first touch is dear (a virtual
machine whose host reclaimed the memory), UFFDIO_COPY wins by far
(bench/RESULTS.md §7d, §7f). So, unless ``LIVEMIG_FIRST_TOUCH`` says
(``uffd`` or ``prefault``), each offer measures it: the CPU time of faulting
in a small scratch region as guest memory is mapped
(``fresh_memory_cost_s_per_gib``), and pre-faults at or under
``PREFAULT_AT_MOST_CPU_S_PER_GIB``.
"""
from __future__ import annotations

import os
import time

from ..errors import BackendUnavailable, LivemigError
from . import check, ffi, lib
from .memory import GuestMemory
from .postcopy import PostcopyMemory, probe

HOW = "userfaultfd copy (no zeroing)"
ENV_SWITCH = "LIVEMIG_FIRST_TOUCH"   # "uffd" or "prefault"; unset: measured at each offer
PROBE_BYTES = 32 << 20
PREFAULT_AT_MOST_CPU_S_PER_GIB = 0.2
"""Fresh memory faulted in at this CPU cost or less is pre-faulted: measured
0.12 s/GiB where pre-faulting beat UFFDIO_COPY (§7f), 1.2-2.6 s/GiB where
UFFDIO_COPY beat it fourfold (§7d)."""


def fresh_memory_cost_s_per_gib() -> float | None:
    """CPU seconds per GiB this thread spends faulting in fresh memory,
    measured now on a scratch region mapped as guest memory is (huge-page
    advice); None where it cannot be measured (no MADV_POPULATE_WRITE)."""
    try:
        scratch = GuestMemory(PROBE_BYTES)
    except (LivemigError, OSError, MemoryError):
        return None
    try:
        t0 = time.thread_time()
        scratch.populate()
        return (time.thread_time() - t0) * (1 << 30) / PROBE_BYTES
    except LivemigError:
        return None
    finally:
        scratch.close()


def cost_unless_decided() -> float | None:
    """fresh_memory_cost_s_per_gib, unless the environment decides (None)."""
    if os.environ.get(ENV_SWITCH, "") in ("uffd", "prefault"):
        return None
    return fresh_memory_cost_s_per_gib()


def prefault_reason(cost_s_per_gib: float | None) -> str | None:
    """Why fresh memory is pre-faulted rather than filled by UFFDIO_COPY,
    given the environment and the measured cost; None: fill it."""
    choice = os.environ.get(ENV_SWITCH, "")
    if choice == "prefault":
        return f"{ENV_SWITCH}=prefault"
    if choice == "uffd" or cost_s_per_gib is None \
            or cost_s_per_gib > PREFAULT_AT_MOST_CPU_S_PER_GIB:
        return None
    return (f"fresh memory is cheap here ({cost_s_per_gib:.2f} CPU s/GiB measured, at most "
            f"{PREFAULT_AT_MOST_CPU_S_PER_GIB:g})")


class FirstTouchFill:
    def __init__(self, memory: GuestMemory):
        if os.environ.get(ENV_SWITCH) == "prefault":
            raise BackendUnavailable("first-touch fill", f"{ENV_SWITCH}=prefault")
        found = probe()
        if not found.missing:
            raise BackendUnavailable("first-touch fill", found.reason or "no userfaultfd",
                                     "pages are pre-faulted instead")
        self.pm = PostcopyMemory(memory)
        if self.pm.user_mode_only:
            self.pm.close(abandon=True)
            raise BackendUnavailable("first-touch fill", "userfaultfd catches user-mode "
                                     "faults only here", "pages are pre-faulted instead")
        out = ffi.new("lm_zerofill **")
        try:
            check(lib.lm_zerofill_start(self.pm.handle, out), "starting the zero-fill thread")
        except BaseException:
            self.pm.close(abandon=True)
            raise
        self._zerofill = out[0]
        self.zero_filled_pages = 0

    @property
    def handle(self):
        return self.pm.handle

    @property
    def closed(self) -> bool:
        return self.pm.closed

    def close(self) -> None:
        """After every stream thread using it is joined: stop the zero
        fill, unregister (pages never placed read as zero from now on)."""
        if self.pm.closed:
            return
        served = lib.lm_zerofill_stop(self._zerofill)
        self._zerofill = None
        self.pm.close(abandon=True)
        if served < 0:
            raise LivemigError(f"the zero-fill thread failed: errno {-served}")
        self.zero_filled_pages = served


def first_touch_fill(memory: GuestMemory, cost_s_per_gib: float | None
                     ) -> tuple[FirstTouchFill | None, str]:
    """A fill over ``memory``, or None where pre-faulting is cheaper
    (``cost_s_per_gib``: cost_unless_decided, measured by the caller) or the
    fill cannot run here (memory is then pre-faulted); and how fresh memory
    will be first written, for ``stats.first_touch``."""
    why = prefault_reason(cost_s_per_gib)
    if why is not None:
        return None, f"pre-faulted: {why}"
    try:
        return FirstTouchFill(memory), HOW
    except BackendUnavailable as exc:
        return None, f"pre-faulted: {exc.reason}"


__all__ = ["FirstTouchFill", "cost_unless_decided", "first_touch_fill",
           "fresh_memory_cost_s_per_gib", "prefault_reason", "HOW", "ENV_SWITCH",
           "PREFAULT_AT_MOST_CPU_S_PER_GIB"]

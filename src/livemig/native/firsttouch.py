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
"""
from __future__ import annotations

import os

from ..errors import BackendUnavailable, LivemigError
from . import check, ffi, lib
from .memory import GuestMemory
from .postcopy import PostcopyMemory, probe

HOW = "userfaultfd copy (no zeroing)"
ENV_SWITCH = "LIVEMIG_FIRST_TOUCH"   # "prefault": pre-fault fresh memory as before


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


def first_touch_fill(memory: GuestMemory) -> tuple[FirstTouchFill | None, str]:
    """A fill over ``memory``, or None where it cannot run here (memory is
    then pre-faulted), and how fresh memory will be first written, for
    ``stats.first_touch``."""
    try:
        return FirstTouchFill(memory), HOW
    except BackendUnavailable as exc:
        return None, f"pre-faulted: {exc.reason}"


__all__ = ["FirstTouchFill", "first_touch_fill", "HOW", "ENV_SWITCH"]

"""Dirty-page tracking: which guest pages were written since the last look.

Three native backends sit behind one small interface (see csrc/track/
for the kernel mechanics and the race-freedom argument of each):

``uffd-async``
    userfaultfd with UFFD_FEATURE_WP_ASYNC; ``collect`` is one PAGEMAP_SCAN
    walk that reports and re-protects written pages atomically (Linux 6.7+).
``uffd-wp``
    synchronous userfaultfd write-protect; a native thread un-protects each
    faulting page and records it (Linux 6.4+ for unpopulated pages).
``mprotect``
    read-only mapping and a SIGSEGV handler; any kernel, slowest, and past
    vm.max_map_count isolated dirty pages it degrades to conservative blocks.

``open_tracker(memory, "auto")`` picks the first usable one in that order and
says why in ``tracker.choice_reason``. The contract of every backend: a write
made while armed is reported by the next ``collect()`` or the one after it,
never lost; indices come out ascending and unique. ``collect()`` returns a
fresh array filled by C in a preallocated buffer — there is no per-page Python.
"""
from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable, ConfigError, TrackerStateError
from .memory import GuestMemory
from . import check, ffi, lib
from .handles import NativeHandle

BACKENDS: dict[str, int] = {
    "uffd-async": lib.LM_TRACK_UFFD_ASYNC,
    "uffd-wp": lib.LM_TRACK_UFFD_WP,
    "mprotect": lib.LM_TRACK_MPROTECT,
}
#: Best first: cheapest write fault and cheapest collect.
PREFERENCE: tuple[str, ...] = ("uffd-async", "uffd-wp", "mprotect")

_STATS_FIELDS = (
    "collects", "pages_reported", "faults", "degraded_collects", "degraded_pages",
    "scan_ioctls", "protect_calls", "handler_errors", "coarse_protects",
    "last_collect_ns", "arm_ns",
)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this host, and if not why and what would help."""

    name: str
    available: bool
    reason: str
    hint: str | None = None


def _hint(name: str, err: int) -> str | None:
    if err in (_errno.EPERM, _errno.EACCES):
        return ("run as root, or set the sysctl vm.unprivileged_userfaultfd=1, or give the "
                "user access to /dev/userfaultfd (Linux 6.1+); the 'mprotect' backend needs none")
    if err == _errno.ENOSYS:
        return "use a kernel built with CONFIG_USERFAULTFD=y, or the 'mprotect' backend"
    if err in (_errno.EOPNOTSUPP, _errno.EPROTO):
        if name == "uffd-async":
            return "needs Linux 6.7 or newer (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN); try 'uffd-wp'"
        return "needs Linux 6.4 or newer (UFFD_FEATURE_WP_UNPOPULATED); try 'mprotect'"
    return None


def _native_probe(kind: int) -> tuple[int, str]:
    """The native probe: (0 or -errno, reason text). A seam tests can replace."""
    buf = ffi.new("char[]", 256)
    rc = lib.lm_tracker_probe(kind, buf, 256)
    return rc, ffi.string(buf).decode("utf-8", "replace")


def probe_backend(name: str) -> BackendStatus:
    """Ask the kernel whether backend ``name`` works here (a live self-test for uffd-async)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown dirty-tracking backend {name!r}; "
                          f"choose one of {', '.join(PREFERENCE)} or 'auto'")
    rc, reason = _native_probe(BACKENDS[name])
    if rc == 0:
        return BackendStatus(name, True, "usable")
    err = -rc
    return BackendStatus(name, False, reason or f"probe failed: {_errno.errorcode.get(err, err)}",
                         _hint(name, err))


def choose_backend() -> tuple[str, str]:
    """The best usable backend and a sentence saying why it was chosen."""
    passed_over = []
    for name in PREFERENCE:
        st = probe_backend(name)
        if st.available:
            why = f"{name}: the best usable backend on this host"
            if passed_over:
                why += " (passed over " + "; ".join(passed_over) + ")"
            return name, why
        passed_over.append(f"{name}: {st.reason}")
    raise BackendUnavailable("auto", "no dirty-tracking backend works here: "
                             + "; ".join(passed_over))


class DirtyTracker:
    """One tracker over one :class:`GuestMemory`. Use :func:`open_tracker`."""

    def __init__(self, memory: GuestMemory, name: str, choice_reason: str):
        out = ffi.new("lm_tracker **")
        check(lib.lm_tracker_create(BACKENDS[name], memory.handle, out),
              f"creating the {name} dirty tracker")
        self._native = NativeHandle(out[0], lib.lm_tracker_destroy, parent=memory.native_handle)
        self._memory = memory
        self.name = name
        self.choice_reason = choice_reason
        self.npages = memory.npages
        self._armed = False
        self._out = np.empty(memory.npages, dtype=np.uint64)
        self._out_ptr = ffi.cast("uint64_t *", self._out.ctypes.data)
        self._stats = ffi.new("lm_tracker_stats *")
        memory.attach(self)

    def _live(self):
        if self._native.released:
            raise TrackerStateError(f"{self.name} dirty tracker is closed")
        return self._native.ptr

    @property
    def armed(self) -> bool:
        return self._armed

    def start(self) -> None:
        """Arm every page: from now on each write is recorded."""
        h = self._live()
        if self._armed:
            raise TrackerStateError(f"{self.name} dirty tracker is already started")
        rc = lib.lm_tracker_start(h)
        check(rc, f"arming the {self.name} dirty tracker", _hint(self.name, -rc) if rc < 0 else None)
        self._armed = True

    def collect(self) -> np.ndarray:
        """Ascending page indices (uint64) written since the previous collect or
        start; those pages are re-armed before this returns, so copy them after."""
        h = self._live()
        if not self._armed:
            raise TrackerStateError(f"collect() on the {self.name} dirty tracker before start()")
        n = check(lib.lm_tracker_collect(h, self._out_ptr, self.npages),
                  f"collecting dirty pages ({self.name})")
        return self._out[:n].copy()

    def stop(self) -> None:
        """Disarm: memory becomes fully writable and nothing is recorded any more."""
        h = self._live()
        if not self._armed:
            raise TrackerStateError(f"stop() on the {self.name} dirty tracker before start()")
        self._armed = False
        check(lib.lm_tracker_stop(h), f"disarming the {self.name} dirty tracker")

    def set_scan_vec_len(self, vec_len: int) -> None:
        """PAGEMAP_SCAN output vector length (uffd-async only; tests shrink it)."""
        check(lib.lm_tracker_set_scan_vec(self._live(), vec_len), "setting the scan vector length")

    @property
    def stats(self) -> dict:
        lib.lm_tracker_stats_get(self._live(), self._stats)
        d = {f: int(getattr(self._stats, f)) for f in _STATS_FIELDS}
        d["backend"] = self.name
        return d

    @property
    def closed(self) -> bool:
        return self._native.released

    def close(self) -> None:
        """Disarm if armed, free the native tracker, release the memory."""
        if self._native.released:
            return
        self._armed = False
        self._native.release()   # lm_tracker_destroy disarms first
        self._memory.detach(self)

    def __enter__(self) -> "DirtyTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("armed" if self._armed else "idle")
        return f"<DirtyTracker {self.name} {state}>"


def open_tracker(memory: GuestMemory, backend: str = "auto") -> DirtyTracker:
    """A dirty tracker over ``memory``: ``backend`` is a name from
    :data:`BACKENDS` or ``"auto"``. Raises :class:`BackendUnavailable` (with
    the kernel's reason and a hint) when the named backend cannot run here."""
    if backend == "auto":
        name, why = choose_backend()
        return DirtyTracker(memory, name, why)
    st = probe_backend(backend)
    if not st.available:
        raise BackendUnavailable(backend, st.reason, st.hint)
    return DirtyTracker(memory, backend, f"{backend}: requested by name")


__all__ = ["BACKENDS", "PREFERENCE", "BackendStatus", "DirtyTracker", "choose_backend",
           "open_tracker", "probe_backend"]

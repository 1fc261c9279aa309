"""Ownership of native objects: freed exactly once, never before their users.

Theory of operation
-------------------
Every ``lm_*`` object a wrapper creates is wrapped at once in a
:class:`NativeHandle`, which registers its destructor with ``ffi.gc``: a
wrapper dropped without ``close()`` still frees its native object when the
garbage collector takes it. ``close()`` stays the contract; it calls
:meth:`NativeHandle.release`, which runs the same destructor through
``ffi.release`` and so detaches it from the collector: nothing is freed twice.

Some native objects use others: a tracker, a vCPU or a post-copy handle works
on a region's memory, a native fault server on a post-copy handle. The user
must be freed first (a vCPU thread must stop before its memory is unmapped).
Wrappers refer to each other both ways (a ``GuestMemory`` records its users),
so a dropped group is a reference cycle, and the collector finalizes a cycle
in no particular order. So the destructor of a handle that has users only
marks it released; the object is destroyed when its last user is, whichever
finalizer comes last. The bookkeeping is locked: finalizers run on whatever
thread triggered a collection.
"""
from __future__ import annotations

import threading
from typing import Callable

from ..errors import LivemigError
from . import ffi


class _Lifetime:
    """One native object's state; holds no reference to its cdata, so the
    destructor ``ffi.gc`` keeps does not keep the handle alive."""

    def __init__(self, raw, destroy: Callable, parent: "_Lifetime | None"):
        self._raw = raw
        self._destroy = destroy
        self._parent = parent
        self._lock = threading.Lock()
        self._users = 0
        self._released = False

    def add_user(self) -> None:
        with self._lock:
            self._users += 1

    def drop_user(self) -> None:
        with self._lock:
            self._users -= 1
            due = self._released and self._users == 0
        if due:
            self._free(destroy=True)

    def owner_released(self, _cdata=None, *, destroy: bool = True) -> None:
        with self._lock:
            self._released = True
            due = self._users == 0
        if due:
            self._free(destroy)

    def _free(self, destroy: bool) -> None:
        if destroy:
            self._destroy(self._raw)
        self._raw = None
        if self._parent is not None:
            self._parent.drop_user()


class NativeHandle:
    """``raw`` (a fresh ``lm_*`` pointer) owned by Python: ``destroy(raw)``
    runs once, at :meth:`release` or when the handle is collected, and not
    before every handle created with ``parent=self`` is gone."""

    def __init__(self, raw, destroy: Callable, *, parent: "NativeHandle | None" = None):
        parent_life = parent._life if parent is not None else None
        self._life = _Lifetime(raw, destroy, parent_life)
        if parent_life is not None:
            parent_life.add_user()
        self._cdata = ffi.gc(raw, self._life.owner_released)

    @property
    def ptr(self):
        """The pointer to pass to ``lib``; None once released."""
        return self._cdata

    @property
    def released(self) -> bool:
        return self._cdata is None

    def release(self) -> None:
        """Destroy now (or, while users remain, when the last one goes).
        Idempotent."""
        cdata, self._cdata = self._cdata, None
        if cdata is not None:
            ffi.release(cdata)

    def forget(self) -> None:
        """The native side freed the object itself (e.g. a successful
        ``lm_postcopy_close``): drop it without calling the destructor."""
        if self._cdata is None:
            return
        if self._life._users:
            raise LivemigError("a native object was freed while others still use it")
        cdata, self._cdata = self._cdata, None
        ffi.gc(cdata, None)
        self._life.owner_released(destroy=False)


__all__ = ["NativeHandle"]

"""One switch between uvloop and the standard asyncio loop.

``new_event_loop(kind)`` with kind ``"auto"`` (uvloop when importable, else
asyncio), ``"uvloop"`` or ``"asyncio"``; the default comes from the
``LIVEMIG_LOOP`` environment variable. ``loop_kind(loop)`` reports which one
actually runs, for logs and benchmark results.
"""
from __future__ import annotations

import asyncio
import os

from ..errors import ConfigError

KINDS = ("auto", "uvloop", "asyncio")


def _uvloop():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def resolve_kind(kind: str | None = None) -> str:
    """The concrete loop kind ("uvloop" or "asyncio") a request maps to."""
    kind = (kind or os.environ.get("LIVEMIG_LOOP") or "auto").strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"event loop {kind!r} is not one of {', '.join(KINDS)} "
                          "(set by argument or LIVEMIG_LOOP)")
    if kind == "auto":
        return "uvloop" if _uvloop() is not None else "asyncio"
    if kind == "uvloop" and _uvloop() is None:
        raise ConfigError("uvloop was requested but is not installed (pip install uvloop)")
    return kind


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A fresh event loop of the requested kind (not set as current)."""
    if resolve_kind(kind) == "uvloop":
        return _uvloop().new_event_loop()
    return asyncio.new_event_loop()


def loop_kind(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """"uvloop" or "asyncio": what the given (or running) loop is."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(coro, *, kind: str | None = None):
    """Run ``coro`` to completion on a new loop of ``kind``, then close it."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(coro)

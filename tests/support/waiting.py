"""Waiting for conditions, never for time.

A test waits for the event it needs, polling a predicate, and fails only if
the event has not happened after a generous timeout. A slow or loaded machine
then makes the suite slower, never red; the timeout only turns a hang into a
failure that names what never happened. Speed targets belong to bench/.
"""
from __future__ import annotations

import asyncio
import time

PATIENCE_S = 120.0
"""How long any awaited event may take before the test calls it a hang."""

POLL_S = 0.01


def _timed_out(what: str, timeout_s: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_for(what: str, predicate, timeout_s: float = PATIENCE_S, *,
             interval_s: float = POLL_S):
    """Poll ``predicate()`` until it returns something truthy and return that;
    fail naming ``what`` after ``timeout_s``. ``interval_s=0`` polls without
    pausing, for a predicate that does the work it waits for."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s)
        time.sleep(interval_s)


async def wait_for_async(what: str, predicate, timeout_s: float = PATIENCE_S):
    """``wait_for`` inside an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s)
        await asyncio.sleep(POLL_S)

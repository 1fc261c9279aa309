"""Bounded waits that never lose a cancellation.

``asyncio.wait_for`` on Python 3.11 returns the result of an awaitable that
completes in the same loop iteration as the waiting task is cancelled, and
drops the cancellation (CPython gh-86296, fixed in 3.12). A daemon stopping
with ``--force`` then waits forever on a migration that carries on. Every
bounded wait in livemig goes through :func:`within`, which awaits inside
``asyncio.timeout`` and so keeps a cancel from outside.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw``, raising TimeoutError after ``timeout_s`` (None: no limit)."""
    async with asyncio.timeout(timeout_s):
        return await aw


__all__ = ["within"]

"""Stopping background tasks: cancel each, wait for it to end, and swallow what
it ended with (the owner is closing; a task's own failure was reported, or
is moot, by then)."""
from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    for task in tasks:
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


__all__ = ["cancel_and_wait"]

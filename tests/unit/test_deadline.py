"""Bounded waits keep a cancel from outside (aio/deadline.py)."""
import asyncio
import pathlib
import re

import pytest

import livemig
from livemig.aio.deadline import within


def _cancel_as_it_completes(wait):
    """Cancel a task waiting on ``wait(fut)`` in the very loop iteration in
    which ``fut`` completes; return what the task then did."""
    async def main():
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(wait(fut))
        await asyncio.sleep(0)              # the task now waits on fut
        fut.set_result("done")
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"
    return asyncio.run(main())


def test_a_cancel_arriving_as_the_wait_completes_is_kept():
    assert _cancel_as_it_completes(lambda fut: within(fut, 10.0)) == "cancelled"


def test_within_times_out_and_returns_results():
    async def main():
        assert await within(asyncio.sleep(0, "x"), 1.0) == "x"
        assert await within(asyncio.sleep(0, "y"), None) == "y"
        with pytest.raises(TimeoutError):
            await within(asyncio.Event().wait(), 0.01)
    asyncio.run(main())


def test_no_bounded_wait_in_livemig_uses_asyncio_wait_for():
    src = pathlib.Path(livemig.__file__).parent
    users = [str(p.relative_to(src)) for p in src.rglob("*.py")
             if re.search(r"\basyncio\.wait_for\(", p.read_text())]
    assert users == [], f"use aio.deadline.within instead of asyncio.wait_for in {users}"

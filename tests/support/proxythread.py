"""A FrameProxy (or any ProxyServer) on its own event loop thread, for tests
that drive daemon processes and the CLI synchronously (the test's own thread
blocks on subprocesses and control calls, so the proxy cannot share its loop)."""
from __future__ import annotations

import asyncio
import threading

from support.frameproxy import Fault, FrameProxy
from support.waiting import PATIENCE_S, wait_for

LOCAL = "127.0.0.1"


class ProxyThread:
    def __init__(self, port: int, fault: Fault | None = None, *, proxy=None):
        """A FrameProxy to ``port`` injecting ``fault``, or ``proxy`` as given."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self._call((proxy or FrameProxy(LOCAL, port, fault)).start())

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.proxy.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def wait_fired(self, what: str, timeout_s: float = PATIENCE_S) -> None:
        """Block until the fault happened (a held frame: until it is held)."""
        wait_for(what, self.proxy.fired.is_set, timeout_s)

    def release(self, forward: bool) -> None:
        """Let the held frame go on, or end its stream without it (FrameProxy.release)."""
        self.loop.call_soon_threadsafe(self.proxy.release, forward)

    def run(self, fn, *args) -> None:
        """Call ``fn(*args)`` on the proxy's loop, and wait for it."""
        async def call():
            fn(*args)
        self._call(call())

    def close(self) -> None:
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

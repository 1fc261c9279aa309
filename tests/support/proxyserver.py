"""What the test proxies share (faultproxy.py, frameproxy.py): a listener on
127.0.0.1 that opens a connection to the target for each one it accepts, the
pump tasks it starts, and a close that resets every proxied connection and
waits for those tasks."""
from __future__ import annotations

import asyncio


class ProxyServer:
    """Subclasses define ``_accept(c_reader, c_writer)`` and ``drop()``."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.forwarded = {"up": 0, "down": 0}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self):
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _connect(self, c_writer: asyncio.StreamWriter):
        """The target's (reader, writer) for an accepted client, or None when
        the target refused (the client is then reset)."""
        try:
            return await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            return None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

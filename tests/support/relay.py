"""The part every test relay shares: a listening server on loopback, the
tasks it spawns and the writers it opened, all torn down on exit.

A subclass defines ``_accept(reader, writer)`` (the server's callback),
spawns its pumps with ``_spawn`` (``pump`` copies one direction as is) and
adds the writers it opens to ``_writers``, so that ``__aexit__`` aborts them
whatever state they are in.
"""
from __future__ import annotations

import asyncio

LOCAL = "127.0.0.1"


async def pump(reader, writer, abort_on_error) -> None:
    """Copy ``reader`` to ``writer`` until EOF and pass the EOF on; a broken
    connection aborts every writer of ``abort_on_error``."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError, RuntimeError):
        for w in abort_on_error:
            w.transport.abort()


class Relay:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._accept, LOCAL, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader, writer):  # pragma: no cover - every relay defines it
        raise NotImplementedError

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

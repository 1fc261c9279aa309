"""A fault-injecting TCP proxy for adversity tests.

``FaultProxy(target_host, target_port)`` listens on 127.0.0.1 and forwards
every accepted connection to the target, optionally delaying each chunk
(``delay_s``), cutting a direction after a byte budget (``cut_after_bytes``
with ``cut_direction`` "up" = client to server, "down" = server to client:
the bytes up to the budget are delivered, then both sides are reset; the
budget counts every connection, and only the one crossing it is cut, once,
so a migration's other channels — its bulk streams — see one fault), or
dropping every connection at a chosen moment (``drop()``; ``wait_forwarded``
waits for a byte count first), or partitioning the client from the target
(``partition()``: every connection reset and new ones refused, until
``heal()``). Counts per direction are in ``forwarded``.
"""
from __future__ import annotations

import asyncio

from .proxyserver import ProxyServer


class FaultProxy(ProxyServer):
    def __init__(self, target_host: str, target_port: int, *, delay_s: float = 0.0,
                 cut_after_bytes: int | None = None, cut_direction: str = "up",
                 chunk_bytes: int = 64 << 10):
        if cut_direction not in ("up", "down"):
            raise ValueError("cut_direction is 'up' or 'down'")
        super().__init__(target_host, target_port)
        self.delay_s = delay_s
        self.cut_after_bytes = cut_after_bytes
        self.cut_direction = cut_direction
        self.chunk_bytes = chunk_bytes
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._progress = asyncio.Condition()
        self.partitioned = False     # reset every connection at once: the target is unreachable

    async def _accept(self, c_reader, c_writer):
        if self.partitioned:
            c_writer.transport.abort()
            return
        server = await self._connect(c_writer)
        if server is None:
            return
        s_reader, s_writer = server
        self._writers |= {c_writer, s_writer}
        pair = (c_writer, s_writer)
        for direction, reader, writer in (("up", c_reader, s_writer),
                                          ("down", s_reader, c_writer)):
            self._spawn(self._pump(direction, reader, writer, pair))

    async def _pump(self, direction, reader, writer, pair):
        try:
            while True:
                data = await reader.read(self.chunk_bytes)
                if not data:
                    writer.write_eof() if writer.can_write_eof() else writer.close()
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                budget = None
                if self.cut_after_bytes is not None and direction == self.cut_direction \
                        and not self.cuts:
                    budget = self.cut_after_bytes - self.forwarded[direction]
                if budget is not None and budget < len(data):
                    writer.write(data[:max(budget, 0)])
                    self.forwarded[direction] += max(budget, 0)
                    await writer.drain()
                    self.cuts += 1
                    self._reset(pair)
                    return
                writer.write(data)
                self.forwarded[direction] += len(data)
                async with self._progress:
                    self._progress.notify_all()
                await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            # RuntimeError: uvloop refuses I/O on a transport another pump reset.
            self._reset(pair)

    def _reset(self, writers) -> None:
        for w in writers:
            w.transport.abort()
            self._writers.discard(w)

    def drop(self) -> None:
        """Reset every proxied connection now."""
        self._reset(list(self._writers))

    def partition(self) -> None:
        """Cut the client off from the target until ``heal()``."""
        self.partitioned = True
        self.drop()

    def heal(self) -> None:
        self.partitioned = False

    async def wait_forwarded(self, nbytes: int, direction: str = "up") -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self.forwarded[direction] >= nbytes)

"""A TCP proxy that injects one fault when a given message type passes.

``FrameProxy(host, port, fault)`` listens on 127.0.0.1 and forwards every
accepted connection to the target, reading the livemig frame headers as they
pass (protocol/spec.py: 32 bytes, the type id is the third field, the payload
length the sixth). When the ``fault.occurrence``-th frame of
``fault.message`` goes by in ``fault.direction`` ("up" = client to server,
i.e. source to destination; "down" = back), the fault happens once, to every
connection open at that moment (all channels of a migration):

* ``cut``        — every connection is reset; the frame is not forwarded;
* ``black-hole`` — nothing more is forwarded either way, connections stay open
  (the peers see silence, not an error); the frame is not forwarded;
* ``stall``      — the frame and everything after it on that stream wait
  ``stall_s``, then flow on;
* ``half-close`` — the frame is forwarded; then ``half_close`` ("up" or
  "down") of every connection is ended (EOF to the receiver, later bytes
  dropped) once ``after_bytes`` more bytes went that way;
* ``hold``       — the frame and everything after it on that stream wait
  (``fired`` is set: the frame is held) until ``release(forward)``: then
  the frame and the rest flow on, or (``forward=False``) the receiver gets
  end of stream instead, as from a sender that died before writing it.
  Meant for killing a peer at the exact moment it sends or is about to
  receive the frame (tests/integration/test_daemon_kills.py); not one of
  ``KINDS``, the faults a randomised soak picks from, since it waits for
  the caller.

Connections made after the fault pass through untouched: the link "comes
back", as a reconnecting peer would find it. ``fired`` is set once the fault
took effect (for a half-close: once the stream was ended). While
``refusing`` is set every new connection is reset at once: the destination
is unreachable until it is cleared. Plain TCP only (frames are read in clear).
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from livemig.protocol.spec import FRAME_HEADER_BYTES, FRAME_HEADER_FORMAT, FRAME_MAGIC, MESSAGE_IDS

from .proxyserver import ProxyServer

KINDS = ("cut", "black-hole", "stall", "half-close")
HOLD = "hold"
CHUNK_BYTES = 64 << 10


@dataclass(frozen=True)
class Fault:
    kind: str
    message: str                 # a MESSAGE_IDS name, e.g. "Resumed"
    direction: str               # where that message travels: "up" or "down"
    occurrence: int = 1
    stall_s: float = 0.5
    half_close: str = "up"
    after_bytes: int = 0

    def __post_init__(self):
        if self.kind not in (*KINDS, HOLD):
            raise ValueError(f"fault kind is one of {(*KINDS, HOLD)}")
        if self.message not in MESSAGE_IDS:
            raise ValueError(f"unknown message {self.message!r}")
        if {self.direction, self.half_close} - {"up", "down"}:
            raise ValueError("directions are 'up' or 'down'")


class _Frames:
    """Splits a byte stream into frame starts (the type id) and data pieces."""

    def __init__(self):
        self._buf = bytearray()
        self._skip = 0          # bytes of the current frame still to pass
        self._raw = False       # not livemig frames: pass everything through

    def feed(self, data: bytes):
        self._buf += data
        while self._buf:
            if self._raw or self._skip:
                n = len(self._buf) if self._raw else min(self._skip, len(self._buf))
                piece = bytes(self._buf[:n])
                del self._buf[:n]
                self._skip -= 0 if self._raw else n
                yield None, piece
                continue
            if len(self._buf) < FRAME_HEADER_BYTES:
                return
            magic, _, type_id, _, _, length, _, _ = struct.unpack_from(FRAME_HEADER_FORMAT,
                                                                        self._buf)
            if magic != FRAME_MAGIC:
                self._raw = True
                continue
            self._skip = FRAME_HEADER_BYTES + length
            yield type_id, b""


class _Link:
    """One proxied connection: its two writers and which directions are dead."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter):
        self.writers = {"up": server, "down": client}
        self.dead = {"up": False, "down": False}
        self.silent = False     # black-holed: even a peer's close goes unseen

    def reset(self) -> None:
        self.dead = {"up": True, "down": True}
        for w in self.writers.values():
            w.transport.abort()

    def end(self, direction: str) -> None:
        if self.dead[direction]:
            return
        self.dead[direction] = True
        writer = self.writers[direction]
        if not writer.transport.is_closing() and writer.can_write_eof():
            writer.write_eof()


class FrameProxy(ProxyServer):
    def __init__(self, target_host: str, target_port: int, fault: Fault):
        super().__init__(target_host, target_port)
        self.fault = fault
        self.type_id = MESSAGE_IDS[fault.message]
        self.seen = 0
        self.fired = asyncio.Event()
        self.refusing = False     # reset new connections at once: the peer is unreachable
        self.accepted = 0         # connections made through the proxy (reconnections count)
        self._links: set[_Link] = set()
        self._half_closing: tuple[set, int] | None = None   # (links, byte threshold)
        self._release: asyncio.Future | None = None        # hold: forward the frame?

    async def _accept(self, c_reader, c_writer):
        self.accepted += 1
        if self.refusing:
            c_writer.transport.abort()
            return
        server = await self._connect(c_writer)
        if server is None:
            return
        s_reader, s_writer = server
        link = _Link(c_writer, s_writer)
        self._links.add(link)
        for direction, reader in (("up", c_reader), ("down", s_reader)):
            self._spawn(self._pump(link, direction, reader))

    async def _pump(self, link: _Link, direction: str, reader: asyncio.StreamReader) -> None:
        frames = _Frames()
        writer = link.writers[direction]
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    if link.silent:
                        return
                    link.end(direction)
                    if all(link.dead.values()):
                        self._links.discard(link)
                        writer.close()
                    return
                for type_id, piece in frames.feed(data):
                    if type_id is not None:
                        self._maybe_half_close(direction)
                        if type_id == self.type_id and direction == self.fault.direction:
                            if not await self._on_frame(link):
                                link.end(direction)     # a held frame dropped
                    if link.dead[direction]:
                        continue            # black-holed, half-closed or reset: drop
                    writer.write(piece)
                    self.forwarded[direction] += len(piece)
                    await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            # RuntimeError: uvloop refuses I/O on a transport the other pump reset.
            link.reset()
            self._links.discard(link)

    async def _on_frame(self, link: _Link) -> bool:
        """Inject the fault if this is the frame; False: drop it (a hold
        released without forwarding)."""
        self.seen += 1
        if self.seen != self.fault.occurrence:
            return True
        kind = self.fault.kind
        links = set(self._links)
        if kind == HOLD:
            self._release = asyncio.get_running_loop().create_future()
            self.fired.set()
            return await self._release
        if kind == "cut":
            for other in links:
                other.reset()
            self._links -= links
        elif kind == "black-hole":
            for other in links:
                other.dead = {"up": True, "down": True}
                other.silent = True
        elif kind == "stall":
            self.fired.set()
            await asyncio.sleep(self.fault.stall_s)
        else:
            h = self.fault.half_close
            self._half_closing = (links, self.forwarded[h] + self.fault.after_bytes)
            if self.fault.after_bytes == 0 and h != self.fault.direction:
                self._maybe_half_close(h)
            return True     # fired once the half-close happens
        self.fired.set()
        return True

    def release(self, forward: bool) -> None:
        """Let a held frame go on (``forward``) or end its stream without it."""
        if self._release is None:
            raise RuntimeError("no frame is held")
        if not self._release.done():
            self._release.set_result(forward)

    def _maybe_half_close(self, direction: str) -> None:
        if self._half_closing is None or direction != self.fault.half_close:
            return
        links, threshold = self._half_closing
        if self.forwarded[direction] >= threshold:
            self._half_closing = None
            for link in links:
                link.end(direction)
            self.fired.set()

    def drop(self) -> None:
        """Reset every proxied connection now."""
        for link in list(self._links):
            link.reset()
        self._links.clear()

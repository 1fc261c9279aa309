"""A TCP relay that holds the acknowledgements of chosen bulk streams, so a
source stream's window of rounds fills for certain, not by the timing of a
fast destination.

Each connection to the destination is relayed; on a *gated* one (given by
its accept index: 1 is the control channel, the post-copy push streams of
a two-stream migration are 4 and 5), once the source has sent past its
handshake, whatever the destination sends back (its StreamAcks) is held
until the gate opens. The source's thread meanwhile sends round after round
without an ack, up to its window, and then waits: every round it sent whole
is in flight.

The gate opens per connection when:

* ``ends``: that many StreamEnd frames have gone through (the relay reads
  the plain stream's frame headers: exact, plain streams only);
* ``manual``: only when :meth:`open` is called (``full`` is set once
  ``ends`` StreamEnds passed on every gated connection); :meth:`pulse`
  lets what is held go at once and keeps the gate shut;
* ``tls``: manual only, as a TLS stream's frames cannot be read (its
  replies are held once it is past its handshake; the test watches the
  source's own counters to know when to open, and ``held_records`` of
  each connection: the records held, one per StreamAck).

A plain gate that never sees its StreamEnds opens after the source fell
silent for ``quiet_s`` (``met_quiet``): a test then fails on what it
asserts rather than hanging.

``harm`` (``"cut"`` or ``"corrupt"``) acts on the ``victim`` (a gated
connection) ``harm_after_bytes`` after its gate's condition was met, the
acks still held: the connection is reset, or one byte of it is flipped.
Connections made later (a reconnection) flow untouched.
"""
from __future__ import annotations

import asyncio
import struct

from livemig.protocol import spec

from support.relay import LOCAL, Relay, pump
HEADER = struct.Struct(spec.FRAME_HEADER_FORMAT)
STREAM_END = spec.MESSAGE_IDS["StreamEnd"]
TLS_RECORD_HEADER_BYTES = 5
TLS_HANDSHAKE_BYTES = 64 << 10
"""TLS streams: source bytes after which a gated connection's replies are
held (its handshake and Hello are well below, its first round well above).
A plain stream's are held from the source's first frame after its Hello."""


class _Gated:
    """One gated connection: what went from the source, and the held replies."""

    def __init__(self, index: int):
        self.index = index
        self.sent = 0               # bytes from the source
        self.frames = 0             # frames from the source (plain streams)
        self.ends = 0               # StreamEnd frames among them
        self.frame_left = 0         # bytes of the current frame's payload still to come
        self.header = bytearray()   # a frame header being read
        self.met = asyncio.Event()  # the gate's condition was met
        self.opened = asyncio.Event()
        self.held: list[bytes] = []
        self.held_records = 0       # TLS: whole records among them (one per ack; the
                                    # first held byte starts a record: the handshake's
                                    # and Welcome's records went whole before)
        self.record_left = 0        # TLS: bytes of the current record still to come
        self.record_header = bytearray()
        self.writer = None          # towards the source
        self.harm_at: int | None = None

    def count_frames(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.frame_left:
                take = min(self.frame_left, len(view))
                self.frame_left -= take
                view = view[take:]
                continue
            need = HEADER.size - len(self.header)
            self.header += view[:need]
            view = view[need:]
            if len(self.header) == HEADER.size:
                _magic, _version, type_id, _flags, _res, length, _seq, _sum = \
                    HEADER.unpack(bytes(self.header))
                self.header.clear()
                self.frame_left = length
                self.frames += 1
                if type_id == STREAM_END:
                    self.ends += 1


    def count_records(self, data: bytes) -> None:
        """TLS records in the held replies (5-byte headers, the length in
        the last two, big-endian): each StreamAck goes as one record."""
        view = memoryview(data)
        while view:
            if self.record_left:
                take = min(self.record_left, len(view))
                self.record_left -= take
                view = view[take:]
                if not self.record_left:
                    self.held_records += 1
                continue
            need = TLS_RECORD_HEADER_BYTES - len(self.record_header)
            self.record_header += view[:need]
            view = view[need:]
            if len(self.record_header) == TLS_RECORD_HEADER_BYTES:
                self.record_left = int.from_bytes(self.record_header[3:5], "big")
                self.record_header.clear()


class AckGate(Relay):
    def __init__(self, target_port: int, *, gated: tuple[int, ...] = (4, 5),
                 ends: int | None = None, tls: bool = False,
                 quiet_s: float = 10.0, manual: bool = False,
                 harm: str | None = None, victim: int | None = None,
                 harm_after_bytes: int = 0):
        super().__init__()
        if (ends is None) != tls or (tls and not manual):
            raise ValueError("a plain gate opens on StreamEnds, a TLS gate by hand")
        if harm is not None and victim not in gated:
            raise ValueError("the harmed connection must be a gated one")
        self.target_port = target_port
        self.gated = gated
        self.ends = ends
        self.tls = tls
        self.quiet_s = quiet_s
        self.manual = manual
        self.harm = harm
        self.victim = victim
        self.harm_after_bytes = harm_after_bytes
        self.accepted = 0
        self.conns: dict[int, _Gated] = {}
        self.full = asyncio.Event()      # every gated connection met its condition
        self.harmed = asyncio.Event()
        self.met_quiet = False           # a gate's condition was the source's silence

    def open(self) -> None:
        """Open every gate: the held replies go, later ones flow."""
        for g in self.conns.values():
            g.opened.set()

    def pulse(self) -> None:
        """Let what every gate holds go, in one write per connection (the
        source reads it all at once), and keep holding what comes later."""
        for g in self.conns.values():
            self._flush(g, g.writer)

    async def _accept(self, c_reader, c_writer):
        self.accepted += 1
        index = self.accepted
        s_reader, s_writer = await asyncio.open_connection(LOCAL, self.target_port)
        self._writers += [c_writer, s_writer]
        pair = (c_writer, s_writer)
        if index not in self.gated:
            self._spawn(pump(c_reader, s_writer, pair))
            self._spawn(pump(s_reader, c_writer, pair))
            return
        g = self.conns[index] = _Gated(index)
        g.writer = c_writer
        self._spawn(self._upstream(g, c_reader, s_writer, pair))
        self._spawn(self._downstream(g, s_reader, c_writer, pair))
        self._spawn(self._release_when_open(g, c_writer, pair))
        if not self.manual:
            self._spawn(self._watch_quiet(g))

    def _check_met(self, g: _Gated) -> None:
        if g.met.is_set():
            return
        if self.ends is not None and g.ends >= self.ends:
            self._meet(g)

    def _meet(self, g: _Gated) -> None:
        g.met.set()
        if g.index == self.victim and self.harm is not None:
            g.harm_at = g.sent + self.harm_after_bytes
        elif not self.manual:
            g.opened.set()
        if len(self.conns) == len(self.gated) and all(c.met.is_set()
                                                      for c in self.conns.values()):
            self.full.set()

    async def _watch_quiet(self, g: _Gated) -> None:
        """A guard against a hang: a source silent for ``quiet_s`` with its
        replies held, its StreamEnds short of ``ends``, opens the gate."""
        last = -1
        while not g.met.is_set():
            if g.sent == last and self._holding(g):
                self.met_quiet = True
                self._meet(g)
                return
            last = g.sent
            await asyncio.sleep(self.quiet_s)

    async def _upstream(self, g: _Gated, reader, writer, pair):
        try:
            while data := await reader.read(1 << 16):
                if not self.tls:
                    g.count_frames(data)
                if g.harm_at is not None and not self.harmed.is_set() \
                        and g.sent + len(data) > g.harm_at:
                    at = g.harm_at - g.sent
                    if self.harm == "cut":
                        writer.write(data[:at])
                        await writer.drain()
                        self.harmed.set()
                        for w in pair:
                            w.transport.abort()
                        return
                    data = bytearray(data)
                    data[at] ^= 0x10
                    self.harmed.set()
                    g.opened.set()
                writer.write(data)
                g.sent += len(data)
                self._check_met(g)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            for w in pair:
                w.transport.abort()

    def _holding(self, g: _Gated) -> bool:
        if g.opened.is_set():
            return False
        if self.tls:
            return g.sent > TLS_HANDSHAKE_BYTES
        return g.frames >= 2              # past its Hello: the Welcome went already

    def _flush(self, g: _Gated, writer) -> None:
        """Write what was held, in order (synchronously: nothing overtakes it)."""
        held, g.held = g.held, []
        g.held_records = 0
        for data in held:
            writer.write(data)

    async def _downstream(self, g: _Gated, reader, writer, pair):
        try:
            while data := await reader.read(1 << 16):
                if self._holding(g):
                    g.held.append(data)
                    if self.tls:
                        g.count_records(data)
                    continue
                self._flush(g, writer)
                writer.write(data)
                await writer.drain()
            await g.opened.wait()
            self._flush(g, writer)
            writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            for w in pair:
                w.transport.abort()

    async def _release_when_open(self, g: _Gated, writer, pair):
        await g.opened.wait()
        try:
            self._flush(g, writer)
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            for w in pair:
                w.transport.abort()

"""Native bulk streams under mutual TLS: opening, accepting, telling them apart.

Theory of operation
-------------------
A TLS daemon's port carries two kinds of connection. Channels (control,
urgent, bulk on the Python path) are TLS from their first byte, spoken by
the event loop's ``ssl``. A native TLS stream must be TLS too, but spoken by
OpenSSL in a stream thread (native/tls.py), so the event loop must never
wrap it::

    source                                         destination (same port)
    TCP connect ─ TLS_STREAM_PREAMBLE ───────────▶ first byte 0x16 (a TLS
                                                   ClientHello)? a channel:
                                                   the event loop's TLS, as
                                                   before. The preamble?
                                                   consumed: a TLS stream
    executor: TLS 1.3 handshake (OpenSSL) ◀──────▶ executor: the same, as server;
        both verify the peer against the CA            both bounded by a timeout
    the stream's certificate == the control channel's peer's? (the source
        checks here, the destination when the Hello names the session)
    Hello (inside TLS) ─────────────────────────▶ policy: Welcome / Refuse
    ◀─────────────────────────── Welcome
    hand_off(): the TLS session and the sequences go to a stream thread

The Hello and Welcome are the protocol's own frames (the sans-IO
Connection makes and checks them); only their bytes travel through the
session's blocking calls, each run in an executor so the event loop never
waits for a handshake or a peer. :class:`TlsStreamChannel` is what the
engines see: the parts of a :class:`~.channel.Channel` a bulk stream's
owner uses (kind, conn, hand_off, close). :class:`SniffingListener` is the
listener of a daemon whose streams may come under TLS: it peeks at each
connection's first bytes (MSG_PEEK, nothing consumed for a channel) and
gives it to the event loop's TLS or to :func:`accept_tls_stream`.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Awaitable, Callable

from ..errors import ConnectionLost, LivemigError, RemoteProtocolError
from ..native.tls import TlsContext, TlsSession
from ..protocol import ChannelKind, Connection, Event, Hello, NEED_DATA, Refuse, Welcome
from ..protocol.connection import SUPPORTED_VERSIONS
from ..protocol.spec import (FRAME_HEADER_BYTES, HANDSHAKE_MAX_PAYLOAD_BYTES,
                             TLS_STREAM_PREAMBLE)
from ..protocol.state import Role
from ..protocol.wire import DEFAULT_MAX_PAYLOAD_BYTES

SOCKET_BUFFER_BYTES = 4 << 20   # as a Channel's (channel.py): a few whole frames
_LENGTH_AT = 12                 # the frame header's payload length (spec.FRAME_HEADER_FORMAT)
_PARTIAL_PREAMBLE_WAIT_S = 0.005


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def _peer_text(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr or "peer")


async def _blocking(fn, *args, orphan: Callable | None = None):
    """``fn(*args)`` in the default executor; if we are cancelled meanwhile,
    ``orphan(result)`` disposes of what it returns once it does."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if orphan is not None:
            fut.add_done_callback(
                lambda f: orphan(f.result()) if not f.cancelled() and f.exception() is None
                else None)
        raise


def _read_frame(session: TlsSession, timeout_s: float, what: str) -> bytes:
    """Blocking: one whole handshake frame (header and payload)."""
    header = session.read(FRAME_HEADER_BYTES, timeout_s, what)
    (length,) = struct.unpack_from("<I", header, _LENGTH_AT)
    if length > HANDSHAKE_MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(f"{what}: a handshake frame of {length} bytes (at most "
                                  f"{HANDSHAKE_MAX_PAYLOAD_BYTES})", phase="handshake")
    return header + (session.read(length, timeout_s, what) if length else b"")


class TlsStreamChannel:
    """A bulk stream under TLS, handshake done (``conn`` has its Hello and,
    once answered, its Welcome), until :meth:`hand_off` gives it to a
    stream thread."""

    def __init__(self, conn: Connection, session: TlsSession, peername, what: str):
        self.conn = conn
        self.session = session
        self.peername = peername
        self.what = what
        self.peer_cert = session.peer_cert()
        self.tls = session.describe()
        self._handed_off = False

    @property
    def kind(self) -> ChannelKind | None:
        return self.conn.channel_kind

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def closed(self) -> bool:
        return not self._handed_off and self.session.closed

    @property
    def handed_off(self) -> bool:
        return self._handed_off

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self.peername
        if name == "tls_stream":
            return self.tls
        return default

    async def send(self, event: Event, timeout_s: float = 10.0) -> None:
        """A handshake answer (the destination's Welcome or Refuse)."""
        data = b"".join(bytes(b) for b in self.conn.send(event))
        await _blocking(self.session.write, data, timeout_s, self.what)

    def hand_off(self) -> tuple:
        """``(session, version, send_seq, recv_seq, max_payload_bytes)`` for
        a stream thread's attach (native/streams.py); the session is the
        thread's from then on."""
        if self._handed_off or self.session.closed:
            raise LivemigError(f"{self.what} was already handed off or closed")
        self._handed_off = True
        return (self.session, *self.conn.hand_off_state())

    def abort(self) -> None:
        if not self._handed_off:
            self.session.close()

    async def close(self) -> None:
        self.abort()


async def open_tls_stream(host: str, port: int, *, tls: TlsContext, peer_cert: bytes | None,
                          kind: ChannelKind, session_id: bytes, capabilities=frozenset(),
                          resume: bool = False,
                          max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                          timeout_s: float = 10.0, what: str = "TLS bulk stream"
                          ) -> TlsStreamChannel:
    """Connect, send the preamble, handshake (``peer_cert``: the certificate
    the destination must present, its control channel's; None: any the CA
    signed), say Hello; the channel once Welcomed. Raises HandshakeRefused on
    Refuse, RemoteProtocolError for a peer that is not the destination's TLS
    (refused certificate, not TLS at all), ConnectionLost if it vanishes or
    stays silent for ``timeout_s``."""
    loop = asyncio.get_running_loop()
    where = f"{what} to {host}:{port}"
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect the {where}: {exc}", phase="handshake") from exc
    try:
        sock.setblocking(False)
        _tune(sock)
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, addr)
            await loop.sock_sendall(sock, TLS_STREAM_PREAMBLE)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise ConnectionLost(f"cannot connect the {where}: {exc or 'timed out'}",
                             phase="handshake") from exc
    except BaseException:
        sock.close()
        raise
    session = await _blocking(TlsSession.handshake, tls, sock.detach(), timeout_s, where,
                              orphan=TlsSession.close)
    try:
        if peer_cert is not None and session.peer_cert() != peer_cert:
            raise RemoteProtocolError(f"{where}: the peer presented another certificate than "
                                      "the destination's control channel did",
                                      phase="handshake")
        conn = Connection(Role.SOURCE, kind, max_payload_bytes=max_payload_bytes)
        ch = TlsStreamChannel(conn, session, addr, where)
        hello = Hello(SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1], kind, session_id,
                      frozenset(capabilities), resume, max_payload_bytes)
        await ch.send(hello, timeout_s)
        conn.receive_data(await _blocking(_read_frame, session, timeout_s, where))
        answer = conn.next_event()
    except BaseException:
        session.close()
        raise
    if isinstance(answer, Welcome):
        return ch
    session.close()
    if isinstance(answer, Refuse):
        raise conn.refused_error()
    raise RemoteProtocolError(f"{where}: {type(answer).__name__} instead of Welcome",
                              phase="handshake")


async def accept_tls_stream(sock: socket.socket, tls: TlsContext, *, timeout_s: float,
                            max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
                            ) -> TlsStreamChannel:
    """The destination's side after the preamble: handshake, read the Hello
    (``conn.hello``); the caller answers it with :meth:`TlsStreamChannel.send`."""
    peername = sock.getpeername()
    where = f"TLS bulk stream from {_peer_text(peername)}"
    _tune(sock)
    session = await _blocking(TlsSession.handshake, tls, sock.detach(), timeout_s, where,
                              orphan=TlsSession.close)
    try:
        conn = Connection(Role.DESTINATION, max_payload_bytes=max_payload_bytes)
        ch = TlsStreamChannel(conn, session, peername, where)
        conn.receive_data(await _blocking(_read_frame, session, timeout_s, where))
        if conn.next_event() is NEED_DATA or conn.hello is None:   # pragma: no cover
            raise RemoteProtocolError(f"{where}: no Hello", phase="handshake")
        if conn.channel_kind is not ChannelKind.BULK:
            raise RemoteProtocolError(f"{where}: a {conn.channel_kind.name.lower()} channel "
                                      "as a TLS stream (only bulk streams come this way)",
                                      phase="handshake")
        return ch
    except BaseException:
        session.close()
        raise


class SniffingListener:
    """A listener whose connections are TLS channels for the event loop
    (``on_channel(sock)``) or native TLS streams (``on_stream(sock)``, the
    preamble consumed), told apart by their first bytes. Quacks like the
    ``asyncio.Server`` a ChannelServer keeps (sockets, close, wait_closed)."""

    def __init__(self, sock: socket.socket, on_channel: Callable[[socket.socket], Awaitable],
                 on_stream: Callable[[socket.socket], Awaitable], timeout_s: float):
        self.sockets = [sock]
        self._on_channel = on_channel
        self._on_stream = on_stream
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    @classmethod
    async def start(cls, host: str | None, port: int, *, on_channel, on_stream,
                    timeout_s: float, backlog: int = 100) -> "SniffingListener":
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(sock, on_channel, on_stream, timeout_s)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sockets[0])
            except OSError:
                if self.sockets[0].fileno() < 0:
                    return
                await asyncio.sleep(0.05)   # EMFILE and the like: try again soon
                continue
            conn.setblocking(False)
            task = loop.create_task(self._sort(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sort(self, conn: socket.socket) -> None:
        try:
            first = await self._peek(conn)
        except (OSError, TimeoutError):
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        if not first:
            conn.close()
            return
        if first == TLS_STREAM_PREAMBLE:
            conn.recv(len(TLS_STREAM_PREAMBLE))   # peeked whole: there
            await self._on_stream(conn)
        else:
            await self._on_channel(conn)   # a ClientHello, or whatever TLS makes of it

    async def _peek(self, conn: socket.socket) -> bytes:
        """The first bytes, left in the socket: enough to tell a preamble
        from anything else, within the timeout."""
        loop = asyncio.get_running_loop()
        n = len(TLS_STREAM_PREAMBLE)
        async with asyncio.timeout(self._timeout_s):
            while True:
                try:
                    data = conn.recv(n, socket.MSG_PEEK)
                except BlockingIOError:
                    data = None
                if data is not None:
                    if not data or len(data) == n or not TLS_STREAM_PREAMBLE.startswith(data):
                        return data
                    await asyncio.sleep(_PARTIAL_PREAMBLE_WAIT_S)   # the rest is on its way
                    continue
                readable = loop.create_future()
                loop.add_reader(conn.fileno(), lambda: readable.done()
                                or readable.set_result(None))
                try:
                    await readable
                finally:
                    loop.remove_reader(conn.fileno())

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.sockets[0].close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)


__all__ = ["TlsStreamChannel", "SniffingListener", "open_tls_stream", "accept_tls_stream"]

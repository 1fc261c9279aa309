"""A framed migration channel over an asyncio connection.

Theory of operation
-------------------
The adapter is thin on purpose: all protocol knowledge lives in the sans-IO
:class:`~livemig.protocol.Connection`. A :class:`Channel` pairs one
Connection with one asyncio transport and does, as aioquic's adapter does,
receive -> process events -> transmit:

* The transport reads into buffers the Connection hands out (BufferedProtocol:
  a large frame's payload is received in place, with no copy in Python);
  ``buffer_updated`` then drains the events completed into a queue that
  ``recv()`` pops. The queue is bounded by payload
  bytes: past ``recv_buffer_bytes`` the transport is paused
  (``pause_reading``) and resumed once ``recv()`` has taken it below half, so
  a slow consumer pushes back on the sender through TCP instead of growing
  memory without bound.
* ``send(event)`` asks the Connection for the frame's buffers and hands them
  to the transport unjoined (``writelines`` where the transport gathers them
  itself, else one ``write`` per buffer: the stock 3.11 selector transport's
  ``writelines`` joins, i.e. copies, whereas its ``write`` sends straight
  from the caller's buffer when the kernel takes it all). Flow control: the
  transport's ``pause_writing``/``resume_writing`` clear and set an
  asyncio.Event that ``send`` awaits, so a sender never runs ahead of the
  socket by more than the transport's high-water mark. A send lock keeps
  frames in sequence order when several tasks send, and covers the optional
  rate limiter wait taken between encoding and writing.
* A protocol violation by the peer is sticky: queued events are still
  delivered, then ``recv``/``send`` raise the RemoteProtocolError; we try to
  tell the peer with an Abort before closing. A transport lost while the
  conversation still expected traffic raises ConnectionLost naming the
  channel and the phase; a clean end where the protocol allows one makes
  ``recv()`` return None.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
from typing import Awaitable, Callable

from .deadline import within
from ..errors import (ConfigError, ConnectionLost, LivemigError, LocalProtocolError,
                      RemoteProtocolError)
from ..protocol import (CLOSED, NEED_DATA, Abort, ChannelKind, Connection, Event, Hello,
                        PageBatch, Refuse, Welcome, answer_hello)
from ..protocol.connection import SUPPORTED_VERSIONS
from ..protocol.state import Role
from ..protocol.wire import DEFAULT_MAX_PAYLOAD_BYTES
from .ratelimit import TokenBucket
from .tlsstream import SniffingListener, TlsContext, TlsStreamChannel, accept_tls_stream

DEFAULT_RECV_BUFFER_BYTES = 32 << 20
DEFAULT_WRITE_HIGH_BYTES = 4 << 20
SOCKET_BUFFER_BYTES = 4 << 20
_SMALL_WRITE_BYTES = 16 << 10
_JOINING_WRITELINES = asyncio.WriteTransport.writelines


def _coalesce(buffers: list) -> list:
    """Join runs of small buffers (the header and message prefixes) so each
    ``write`` is one syscall worth making; large ones pass through uncopied."""
    out, small = [], []
    for buf in buffers:
        if len(buf) < _SMALL_WRITE_BYTES:
            small.append(buf)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(buf)
    if small:
        out.append(b"".join(small))
    return out


def _event_bytes(event: Event) -> int:
    return event.data_bytes if isinstance(event, PageBatch) else 0


class _ChannelProtocol(asyncio.BufferedProtocol):
    """asyncio callbacks forwarded to the Channel. Buffered: the transport
    reads straight into the frame payload being assembled."""

    def __init__(self, channel: "Channel"):
        self.channel = channel

    def connection_made(self, transport):
        self.channel._attach(transport)

    def get_buffer(self, sizehint):
        return self.channel.conn.get_receive_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self.channel._on_received(nbytes)

    def eof_received(self):
        self.channel._on_data(b"")
        return False   # close our side too: a channel is never half-open

    def connection_lost(self, exc):
        self.channel._on_lost(exc)

    def pause_writing(self):
        self.channel._can_write.clear()

    def resume_writing(self):
        self.channel._can_write.set()


class Channel:
    """One migration channel. Create with :func:`open_channel`,
    :func:`serve_channels` or :func:`channel_pair`."""

    def __init__(self, conn: Connection, *, rate_limiter: TokenBucket | None = None,
                 recv_buffer_bytes: int = DEFAULT_RECV_BUFFER_BYTES):
        self.conn = conn
        self.rate_limiter = rate_limiter
        self.recv_buffer_bytes = recv_buffer_bytes
        self._transport: asyncio.Transport | None = None
        self._gathering = False
        self._events: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._ended = False            # the peer ended the stream cleanly
        self._closing = False          # we asked to close
        self._error: LivemigError | None = None
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._send_lock = asyncio.Lock()
        self._lost = asyncio.get_running_loop().create_future()
        self._handed_off = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0

    # -- introspection -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def phase(self) -> str:
        return self.conn.phase

    @property
    def kind(self) -> ChannelKind | None:
        return self.conn.channel_kind

    @property
    def closed(self) -> bool:
        return self._lost.done()

    def get_extra_info(self, name: str, default=None):
        return self._transport.get_extra_info(name, default) if self._transport else default

    # -- public API --------------------------------------------------------------------
    async def send(self, event: Event) -> None:
        """Encode, rate-limit and write ``event``; returns once the transport
        is below its high-water mark. LocalProtocolError if the state forbids."""
        async with self._send_lock:
            self._raise_if_unusable()
            buffers = self.conn.send(event)
            nbytes = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers)
            written = False
            try:
                if self.rate_limiter is not None:
                    await self.rate_limiter.consume(nbytes)
            finally:
                # The frame owns its sequence number from conn.send on: it must
                # go out even when the wait above is cancelled (a daemon stopping,
                # a task torn down), or the next frame, typically the Abort that
                # explains the stop, reaches the peer as "sequence out of order"
                # instead of as what happened.
                if self._transport is not None and not self._transport.is_closing():
                    self._write(buffers)
                    written = True
            if not written:
                self._raise_if_unusable()
            self.bytes_sent += nbytes
            self.frames_sent += 1
            if not self._can_write.is_set():
                await self._can_write.wait()
                self._raise_if_unusable()

    def _write(self, buffers: list) -> None:
        if self._gathering:
            self._transport.writelines(buffers)
        else:
            for buf in _coalesce(buffers):
                self._transport.write(buf)

    async def recv(self) -> Event | None:
        """The next event from the peer, or None once it ended the stream
        where the protocol allows. Raises the peer's protocol error or
        ConnectionLost."""
        while not self._events:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        event = self._events.popleft()
        self._queued_bytes -= _event_bytes(event)
        if self._reading_paused and self._queued_bytes <= self.recv_buffer_bytes // 2:
            self._reading_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return event

    async def close(self) -> None:
        """Close the transport (after flushing what is queued) and wait for it."""
        self._closing = True
        if self._transport is None:
            if not self._lost.done():
                self._lost.set_result(None)   # never connected: nothing to close
        elif not self._transport.is_closing():
            self._transport.close()
        await asyncio.shield(self._lost)

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        if self._transport is not None:
            self._transport.abort()

    def hand_off(self) -> tuple[int, int, int, int, int]:
        """Give the stream to another framer (the native urgent thread).

        Stops reading, and returns ``(fd, version, send_seq, recv_seq,
        max_payload_bytes)`` where ``fd`` is a dup of the socket the caller
        now owns. This channel must not be used for traffic afterwards
        (LocalProtocolError); ``close``/``abort`` still end the transport.
        Refused (ConfigError) on TLS, without a socket, or with received
        bytes not yet consumed, which the new owner would never see."""
        if self._transport is None or self.get_extra_info("ssl_object") is not None:
            raise ConfigError("only a plain-TCP channel can be handed off")
        sock = self.get_extra_info("socket")
        if sock is None:
            raise ConfigError("the channel's transport exposes no socket")
        if self._events or self.conn.buffered_bytes:
            raise ConfigError("the channel holds received data; hand it off before traffic")
        self._raise_if_unusable()
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._handed_off = True
        return (os.dup(sock.fileno()), *self.conn.hand_off_state())

    @property
    def handed_off(self) -> bool:
        return self._handed_off

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- transport callbacks -----------------------------------------------------------
    def _attach(self, transport) -> None:
        self._transport = transport
        self._gathering = type(transport).writelines is not _JOINING_WRITELINES
        transport.set_write_buffer_limits(high=DEFAULT_WRITE_HIGH_BYTES)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Kernel buffers that hold a few whole frames: a write of a large
            # payload is then taken by the kernel at once instead of being
            # split, and the remainder copied into the transport's buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)

    def _on_received(self, nbytes: int) -> None:
        if self._error is not None:
            return
        self.bytes_received += nbytes
        self.conn.receive_buffer_filled(nbytes)
        self._pump()

    def _on_data(self, data) -> None:
        if self._error is not None:
            return
        self.bytes_received += len(data)
        self.conn.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        """Drain the events the received bytes completed into the queue."""
        try:
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    self._ended = True
                    break
                self.frames_received += 1
                self._events.append(event)
                self._queued_bytes += _event_bytes(event)
        except RemoteProtocolError as exc:
            self._fail(exc)
        if (not self._reading_paused and self._queued_bytes > self.recv_buffer_bytes
                and not self._transport.is_closing()):
            self._reading_paused = True
            self._transport.pause_reading()
        self._wakeup.set()

    def _fail(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol: tell it why (best effort), then close.
        A connection that ended early (ConnectionLost) is a break, not a
        violation: no Abort goes back on what may be a half-closed link, or
        the peer would give up a migration it could resume."""
        # Detached: the parser's frames would keep the offending payload alive.
        self._error = _detached(exc)
        transport = self._transport
        if isinstance(exc, ConnectionError):
            if transport is not None and not transport.is_closing():
                transport.close()
        elif transport is not None and not transport.is_closing():
            try:
                for buf in self.conn.send(Abort(self.conn.conversation.phase, str(exc)[:1000])):
                    transport.write(buf)
            except LivemigError:
                pass   # the state may not allow an Abort; closing says enough
            transport.close()

    def _on_lost(self, exc: Exception | None) -> None:
        try:
            self._end_stream(exc)
        finally:
            # Whatever the peer left half-sent dies with the connection (a
            # payload announced up to the cap and never finished included).
            self.conn.discard_received()

    def _end_stream(self, exc: Exception | None) -> None:
        if self._closing and self._error is None and exc is None:
            self._ended = True     # our own close: remaining events, then None
        if self._error is None:
            if exc is None and not self._ended:
                # Closed without an EOF callback (e.g. TLS): treat as end of stream.
                self._on_data(b"")
            if self._error is None and not self._ended:
                reason = f"{type(exc).__name__}: {exc}" if exc else "closed"
                # The phase is an attribute: the message that reports the
                # failure names it once, from what the session was doing.
                self._error = ConnectionLost(
                    f"connection lost ({reason})",
                    phase=self.phase, channel=self.name)
        if not self._lost.done():
            self._lost.set_result(None)
        self._can_write.set()     # wake blocked senders; they see the error
        self._wakeup.set()

    def _raise_if_unusable(self) -> None:
        if self._handed_off:
            raise LocalProtocolError(f"channel {self.name} was handed to a native thread",
                                     phase=self.phase)
        if self._error is not None:
            raise self._error
        if self._lost.done() or self._transport is None or self._transport.is_closing():
            raise ConnectionLost("the connection is closed",
                                 phase=self.phase, channel=self.name)


# -- opening channels ------------------------------------------------------------------

async def _handshake(ch: Channel, hello: Hello, timeout_s: float) -> Channel:
    try:
        async with asyncio.timeout(timeout_s):
            await ch.send(hello)
            answer = await ch.recv()
    except TimeoutError:
        ch.abort()
        raise ConnectionLost(f"no answer to Hello within {timeout_s} s",
                             phase="handshake", channel=ch.name) from None
    except BaseException:
        ch.abort()
        raise
    if isinstance(answer, Welcome):
        return ch
    await ch.close()
    if isinstance(answer, Refuse):
        raise ch.conn.refused_error()
    raise ConnectionLost("peer closed the channel during the handshake",
                         phase="handshake", channel=ch.name)


async def open_channel(host: str, port: int, *, kind: ChannelKind, session_id: bytes,
                       role: Role = Role.SOURCE, ssl=None, server_hostname: str | None = None,
                       capabilities=frozenset(), resume: bool = False,
                       rate_limiter: TokenBucket | None = None,
                       max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                       recv_buffer_bytes: int = DEFAULT_RECV_BUFFER_BYTES,
                       timeout_s: float = 10.0) -> Channel:
    """Connect, say Hello, and return the channel once Welcomed.

    Raises HandshakeRefused on Refuse, ConnectionLost if the peer vanishes or
    stays silent for ``timeout_s``.
    """
    if role is not Role.SOURCE:
        raise ConfigError("channels are opened by the source: the source speaks first")
    loop = asyncio.get_running_loop()
    conn = Connection(role, kind, max_payload_bytes=max_payload_bytes)
    ch = Channel(conn, rate_limiter=rate_limiter, recv_buffer_bytes=recv_buffer_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: _ChannelProtocol(ch), host, port, ssl=ssl,
                                         server_hostname=server_hostname if ssl else None)
    except (OSError, TimeoutError) as exc:
        raise ConnectionLost(f"cannot connect to {host}:{port}: {exc}", phase="handshake",
                             channel=conn.name) from exc
    hello = Hello(SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1], kind, session_id,
                  frozenset(capabilities), resume, max_payload_bytes)
    return await _handshake(ch, hello, timeout_s)


HelloPolicy = Callable[[Hello], "Welcome | Refuse"]
ChannelHandler = Callable[[Channel], Awaitable[None]]
# Connections accepted but not yet welcomed, per server: each may hold up to
# HANDSHAKE_MAX_PAYLOAD_BYTES of frame plus a staging buffer, so this bounds
# what unauthenticated peers can make a daemon spend (64 x 320 KiB = 20 MiB).
DEFAULT_MAX_UNWELCOMED_CHANNELS = 64
# Errors of ended channels kept for inspection: the most recent ones only.
MAX_KEPT_ERRORS = 64


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions: their frames'
    locals (a received payload, the whole channel) must not outlive the
    connection that raised it."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


class _TurnedAway(asyncio.Protocol):
    """A connection over the unwelcomed limit: closed at once, nothing read."""

    def connection_made(self, transport):
        transport.abort()


class ChannelServer:
    """Accepts channels, answers their Hello, and runs ``handler(channel)``
    for every Welcomed one; the channel is closed when the handler returns.
    Protocol errors and lost peers end only their own channel and are kept
    in ``errors`` (the most recent :data:`MAX_KEPT_ERRORS`, tracebacks
    dropped). At most ``max_unwelcomed_channels`` connections may be waiting
    for their Welcome at once; further ones are closed on arrival and
    counted in ``turned_away``. Use as an async context manager."""

    def __init__(self, handler: ChannelHandler, policy: HelloPolicy, *,
                 rate_limiter: TokenBucket | None, max_payload_bytes: int,
                 recv_buffer_bytes: int, timeout_s: float,
                 max_unwelcomed_channels: int = DEFAULT_MAX_UNWELCOMED_CHANNELS):
        self._handler = handler
        self._policy = policy
        self._rate_limiter = rate_limiter
        self._max_payload_bytes = max_payload_bytes
        self._recv_buffer_bytes = recv_buffer_bytes
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task] = set()
        self._channels: set[Channel] = set()
        self._max_unwelcomed = max_unwelcomed_channels
        self.unwelcomed = 0
        self.turned_away = 0
        self.server: asyncio.AbstractServer | SniffingListener | None = None
        self._native_tls: TlsContext | None = None   # native TLS streams accepted here
        self._stream_policy: Callable[[TlsStreamChannel], Event] | None = None
        self._errors: collections.deque = collections.deque(maxlen=MAX_KEPT_ERRORS)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def errors(self) -> list[BaseException]:
        return list(self._errors)

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.unwelcomed >= self._max_unwelcomed:
            self.turned_away += 1
            return _TurnedAway()
        self.unwelcomed += 1
        conn = Connection(Role.DESTINATION, max_payload_bytes=self._max_payload_bytes)
        ch = Channel(conn, rate_limiter=self._rate_limiter,
                     recv_buffer_bytes=self._recv_buffer_bytes)
        self._channels.add(ch)
        task = asyncio.get_running_loop().create_task(self._serve(ch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _ChannelProtocol(ch)

    async def _serve(self, ch: Channel) -> None:
        welcomed = False
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    hello = await ch.recv()
            except TimeoutError:
                return
            if hello is None:
                return
            answer = self._policy(hello)
            await ch.send(answer)
            if isinstance(answer, Refuse):
                return
            welcomed = True
            self.unwelcomed -= 1
            await self._handler(ch)
        except LivemigError as exc:
            # A peer that breaks the protocol or vanishes ends its channel,
            # never the server; the error is kept for the owner to inspect.
            self._errors.append(_detached(exc))
        finally:
            if not welcomed:
                self.unwelcomed -= 1
            await ch.close()
            self._channels.discard(ch)

    async def _serve_channel_socket(self, sock: socket.socket, ssl) -> None:
        """A TLS channel the sniffing listener accepted: the event loop's TLS,
        as a listener made with ``ssl`` would have it."""
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self._protocol, sock, ssl=ssl,
                                               ssl_handshake_timeout=self._timeout_s)
        except (OSError, TimeoutError, ConnectionError):
            sock.close()   # a failed TLS handshake: the stranger is gone, as with create_server

    async def _serve_tls_stream(self, sock: socket.socket) -> None:
        """A native TLS stream (aio/tlsstream.py): handshake and Hello in an
        executor, then ``policy`` and the handler, as for a channel."""
        if self.unwelcomed >= self._max_unwelcomed:
            self.turned_away += 1
            sock.close()
            return
        self.unwelcomed += 1
        welcomed = False
        ch = None
        try:
            ch = await accept_tls_stream(sock, self._native_tls, timeout_s=self._timeout_s,
                                         max_payload_bytes=self._max_payload_bytes)
            self._channels.add(ch)
            answer = (self._stream_policy(ch) if self._stream_policy is not None
                      else self._policy(ch.conn.hello))
            await ch.send(answer, self._timeout_s)
            if isinstance(answer, Refuse):
                return
            welcomed = True
            self.unwelcomed -= 1
            await self._handler(ch)
        except LivemigError as exc:
            self._errors.append(_detached(exc))
        finally:
            if not welcomed:
                self.unwelcomed -= 1
            if ch is not None:
                await ch.close()
                self._channels.discard(ch)
            else:
                sock.close()

    async def close(self) -> None:
        """Stop accepting, cancel handlers, close every channel."""
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in list(self._channels):
            await ch.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


async def serve_channels(host: str, port: int, handler: ChannelHandler, *, ssl=None,
                         capabilities=frozenset(), required=frozenset(),
                         policy: HelloPolicy | None = None,
                         rate_limiter: TokenBucket | None = None,
                         max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                         recv_buffer_bytes: int = DEFAULT_RECV_BUFFER_BYTES,
                         timeout_s: float = 10.0,
                         max_unwelcomed_channels: int = DEFAULT_MAX_UNWELCOMED_CHANNELS,
                         native_tls: TlsContext | None = None,
                         stream_policy: Callable[[TlsStreamChannel], Event] | None = None
                         ) -> ChannelServer:
    """Listen on ``host:port`` (port 0 picks one: see ``.port``) as the
    destination. Each Hello is answered by ``policy`` (default:
    :func:`answer_hello` with ``capabilities``/``required``); a peer gets
    ``timeout_s`` to say Hello. With ``ssl`` and ``native_tls`` (the server
    side of the native streams' TLS), native TLS streams are accepted on the
    same port (aio/tlsstream.py) and handled like channels; ``stream_policy``
    (default: ``policy`` of its Hello) answers them, seeing the whole stream
    (its peer's certificate, say)."""
    if policy is None:
        def policy(hello):
            return answer_hello(hello, capabilities=capabilities, required=required,
                                max_payload_bytes=max_payload_bytes)
    srv = ChannelServer(handler, policy, rate_limiter=rate_limiter,
                        max_payload_bytes=max_payload_bytes,
                        recv_buffer_bytes=recv_buffer_bytes, timeout_s=timeout_s,
                        max_unwelcomed_channels=max_unwelcomed_channels)
    if ssl is not None and native_tls is not None:
        srv._native_tls = native_tls
        srv._stream_policy = stream_policy
        srv.server = await SniffingListener.start(
            host, port, on_channel=lambda sock: srv._serve_channel_socket(sock, ssl),
            on_stream=srv._serve_tls_stream, timeout_s=timeout_s)
        return srv
    srv.server = await asyncio.get_running_loop().create_server(srv._protocol, host, port,
                                                                ssl=ssl)
    return srv


async def channel_pair(kind: ChannelKind, *, session_id: bytes = bytes(16),
                       capabilities=frozenset(), rate_limiter: TokenBucket | None = None,
                       max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                       recv_buffer_bytes: int = DEFAULT_RECV_BUFFER_BYTES
                       ) -> tuple[Channel, Channel]:
    """(source, destination) channels over a local socketpair, handshake done."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    src = Channel(Connection(Role.SOURCE, kind, max_payload_bytes=max_payload_bytes),
                  rate_limiter=rate_limiter, recv_buffer_bytes=recv_buffer_bytes)
    dst = Channel(Connection(Role.DESTINATION, max_payload_bytes=max_payload_bytes),
                  recv_buffer_bytes=recv_buffer_bytes)
    await loop.create_connection(lambda: _ChannelProtocol(src), sock=a)
    await loop.create_connection(lambda: _ChannelProtocol(dst), sock=b)
    hello = Hello(SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1], kind, session_id,
                  frozenset(capabilities), False, max_payload_bytes)
    await src.send(hello)
    got = await dst.recv()
    await dst.send(answer_hello(got, capabilities=capabilities,
                                max_payload_bytes=max_payload_bytes))
    welcome = await src.recv()
    if not isinstance(welcome, Welcome):
        raise src.conn.refused_error() or ConnectionLost(
            "socketpair peer closed during the handshake", phase="handshake", channel=src.name)
    return src, dst


async def until_finished(*aws) -> None:
    """Run ``aws`` (coroutines or futures) together until the last one is done
    or any raised (re-raised here); the others are then cancelled and waited
    for, whichever way it ended."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    finisher = tasks[-1]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            if finisher in done:
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def recv_within(ch: Channel, timeout_s: float | None, what: str, *, peer: str,
                      phase: str, idle: bool = False) -> Event:
    """The peer's next event within ``timeout_s``; a silent, vanished or
    aborting peer raises, naming what we waited for (the one receive funnel of
    both migration peers). With ``idle``, ``timeout_s`` bounds silence rather
    than the wait: any byte received restarts it (a large frame on a slow
    link takes as long as it takes)."""
    from ..errors import MigrationError

    while True:
        seen_bytes = ch.bytes_received
        try:
            event = await within(ch.recv(), timeout_s)
            break
        except TimeoutError:
            if idle and ch.bytes_received != seen_bytes:
                continue
            if idle:
                raise MigrationError(f"timed out waiting for {what} from the {peer}: it sent "
                                     f"nothing for {timeout_s:g} s", phase=phase) from None
            raise MigrationError(f"timed out waiting for {what} from the {peer}: nothing came "
                                 f"within {timeout_s:g} s", phase=phase) from None
    if event is None:
        raise RemoteProtocolError(f"the {peer} closed the connection while we waited for {what}",
                                  phase=phase)
    if isinstance(event, Abort):
        raise MigrationError(f"the {peer} aborted: {event.reason}", phase=phase)
    return event


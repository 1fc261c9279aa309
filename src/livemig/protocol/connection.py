"""Sans-IO connection: bytes in, events out, buffers to send.

Theory of operation
-------------------
A :class:`Connection` is one side of one channel. It owns no socket, no
clock and no task (the h11 shape):

* ``receive_data(data)`` stores received bytes; ``b""`` means end of stream.
  (``get_receive_buffer``/``receive_buffer_filled`` do the same without a
  copy: the caller reads into the buffer it is given.)
* ``next_event()`` returns the next :mod:`events` message, ``NEED_DATA``
  when a frame is incomplete, or ``CLOSED`` once the peer has ended the stream
  where that is allowed.
* ``send(event)`` checks the event against the state machine and returns the
  buffers to write (header + payload parts, never joined).

Errors are split by who is at fault. The peer breaking the wire format, the
sequence, a payload layout, the handshake rules or the state machine raises
RemoteProtocolError (its subclass ConnectionLost when the peer closed cleanly
but before the conversation allowed it); us sending something the state forbids, or something
that does not encode, raises LocalProtocolError. Both are sticky: after a
remote error next_event() raises the same error again and send() accepts
only an Abort (to tell the peer why); after a local error send() always raises.
Each error carries the phase it happened in and the channel name.

The handshake is checked here, beyond the state table: the Welcome version
must lie in the Hello's range and its capabilities must be ones the Hello
offered. :func:`answer_hello` is the destination's policy for building that
answer.
"""
from __future__ import annotations

from ..errors import ConnectionLost, HandshakeRefused, LocalProtocolError, RemoteProtocolError
from . import spec, wire
from .spec import HANDSHAKE_MAX_PAYLOAD_BYTES
from .events import (WIRE_IDS, Abort, ChannelKind, Event, Hello, PayloadError, Phase, Refuse,
                     RefuseCode, Welcome, decode_event)
from .state import Conversation, Role, State, TransitionError

SUPPORTED_VERSIONS = (1, spec.STREAMS_VERSION)   # (min, max) protocol versions this code speaks


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


def answer_hello(hello: Hello, *, capabilities=frozenset(), required=frozenset(),
                 versions: tuple[int, int] | None = None,
                 max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD_BYTES) -> Welcome | Refuse:
    """The destination's answer: the highest common version and the common
    capabilities, or a Refuse naming what is missing. ``versions`` defaults
    to SUPPORTED_VERSIONS."""
    versions = versions or SUPPORTED_VERSIONS
    low, high = max(hello.min_version, versions[0]), min(hello.max_version, versions[1])
    if low > high:
        return Refuse(RefuseCode.VERSION,
                      f"no common protocol version: peer speaks {hello.min_version}.."
                      f"{hello.max_version}, we speak {versions[0]}..{versions[1]}")
    missing = frozenset(required) - frozenset(hello.capabilities)
    if missing:
        return Refuse(RefuseCode.CAPABILITY,
                      "missing required capabilities: " + ", ".join(sorted(missing)))
    return Welcome(high, frozenset(capabilities) & frozenset(hello.capabilities),
                   max_payload_bytes)


class Connection:
    """One side of one channel. ``channel_kind`` may be None on the
    destination, which learns it from the Hello."""

    def __init__(self, our_role: Role, channel_kind: ChannelKind | None = None, *,
                 max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD_BYTES,
                 name: str | None = None):
        if not 0 < max_payload_bytes <= wire.ABSOLUTE_MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_payload_bytes {max_payload_bytes} out of range")
        self.our_role = our_role
        self.conversation = Conversation(channel_kind)
        self.max_payload_bytes = max_payload_bytes
        self.peer_max_payload_bytes = wire.DEFAULT_MAX_PAYLOAD_BYTES
        self._name = name
        # Until the Welcome, only handshake-sized frames are accepted: a peer
        # nobody has welcomed must not make us allocate the negotiated cap.
        self._reader = wire.FrameReader(
            valid_types=WIRE_IDS.keys(),
            max_payload_bytes=min(max_payload_bytes, HANDSHAKE_MAX_PAYLOAD_BYTES))
        self._send_sequence = 0
        self._version = wire.WIRE_VERSION
        self._eof = False
        self._remote_error: RemoteProtocolError | None = None
        self._local_error: LocalProtocolError | None = None
        self._abort_sent = False
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.refusal: Refuse | None = None

    # -- introspection ------------------------------------------------------------
    @property
    def name(self) -> str:
        if self._name:
            return self._name
        kind = self.conversation.kind
        return f"{self.our_role.value}/{kind.name.lower() if kind else 'unnamed'}"

    @property
    def state(self) -> State:
        return self.conversation.state

    @property
    def phase(self) -> str:
        return self.conversation.phase.label

    @property
    def channel_kind(self) -> ChannelKind | None:
        return self.conversation.kind

    @property
    def version(self) -> int | None:
        """The negotiated protocol version (None before the Welcome)."""
        return self.welcome.version if self.welcome else None

    @property
    def capabilities(self) -> frozenset:
        """Capabilities both sides agreed on (empty before the Welcome)."""
        return self.welcome.capabilities if self.welcome else frozenset()

    @property
    def session_id(self) -> bytes | None:
        return self.hello.session_id if self.hello else None

    @property
    def buffered_bytes(self) -> int:
        return self._reader.buffered_bytes

    def hand_off_state(self) -> tuple[int, int, int, int]:
        """(version, next send sequence, next receive sequence, receive cap):
        what another framer needs to take the stream over from here."""
        return (self._version, self._send_sequence, self._reader.expected_sequence,
                self.max_payload_bytes)

    def discard_received(self) -> None:
        """Drop every received byte not yet returned as an event (the stream
        is over): a dead channel must not hold a half-received payload."""
        self._reader.discard()

    @property
    def errored(self) -> bool:
        return self._remote_error is not None or self._local_error is not None

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data) -> None:
        if self._eof:
            if data:
                raise self._local("receive_data() after end of stream")
            return
        if not data:
            self._eof = True
            return
        self._reader.feed(data)

    def get_receive_buffer(self, sizehint: int = -1) -> memoryview:
        """Zero-copy receive: a buffer to read into, then call
        :meth:`receive_buffer_filled` (the BufferedProtocol shape)."""
        # No end-of-stream check here: asyncio's TLS layer asks for a buffer
        # eagerly, even after the EOF it is about to report.
        return self._reader.get_buffer(sizehint)

    def receive_buffer_filled(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last receive buffer."""
        if nbytes and self._eof:
            raise self._local("data received after end of stream")
        if nbytes:
            self._reader.buffer_updated(nbytes)

    def next_event(self):
        if self._remote_error is not None:
            raise self._remote_error
        try:
            frame = self._reader.next_frame()
        except wire.FrameError as exc:
            raise self._remote(f"bad frame: {exc.reason}") from None
        if frame is None:
            if not self._eof:
                return NEED_DATA
            if self._reader.mid_frame:
                # Cut off mid-frame: the peer (or the link) went away; what
                # arrived is whole so far, so this is a lost connection, not
                # garbage (native streams say the same: ECONNRESET).
                self._remote_error = ConnectionLost(
                    f"the stream was truncated: the connection ended inside a frame "
                    f"({self._reader.buffered_bytes} bytes of it received)", phase=self.phase, channel=self.name)
                raise self._remote_error
            if self.state is State.CLOSED:
                return CLOSED
            try:
                self.conversation.process_eof(self.our_role.peer)
            except TransitionError as exc:
                # A clean close at a frame boundary, but too early: the peer
                # went away rather than sending garbage.
                self._remote_error = ConnectionLost(str(exc), phase=self.phase,
                                                    channel=self.name)
                raise self._remote_error from None
            return CLOSED
        try:
            event = decode_event(frame.type_id, frame.flags, frame.payload)
        except PayloadError as exc:
            cls = WIRE_IDS[frame.type_id].__name__
            raise self._remote(f"bad {cls} payload: {exc}") from None
        self._check_handshake(event, sender=self.our_role.peer)
        try:
            self.conversation.process(self.our_role.peer, event)
        except TransitionError as exc:
            raise self._remote(str(exc)) from None
        self._after(event)
        return event

    # -- sending --------------------------------------------------------------------
    def send(self, event: Event) -> list:
        """Buffers that carry ``event``: write them in order, unmodified."""
        if self._local_error is not None:
            raise self._local_error
        if self._remote_error is not None and not (
                isinstance(event, Abort) and not self._abort_sent):
            raise self._local(
                f"cannot send {type(event).__name__}: the peer broke the protocol "
                f"({self._remote_error}); only one Abort may follow", sticky=False)
        if not isinstance(event, Event) or type(event) not in WIRE_IDS.values():
            raise self._local(f"{event!r} is not a protocol event", sticky=False)
        if self._remote_error is None:
            self._check_handshake(event, sender=self.our_role)
        try:
            flags, parts = event.encode()
            buffers = wire.encode_frame(event.WIRE_ID, flags, self._send_sequence, parts,
                                        version=self._version,
                                        max_payload_bytes=self.peer_max_payload_bytes)
        except (ValueError, TypeError, OverflowError) as exc:
            raise self._local(f"cannot encode {type(event).__name__}: {exc}",
                              sticky=False) from None
        if self._remote_error is None:
            try:
                self.conversation.process(self.our_role, event)
            except TransitionError as exc:
                raise self._local(str(exc)) from None
        else:
            self._abort_sent = True
        self._send_sequence += 1
        self._after(event)
        return buffers

    # -- internals --------------------------------------------------------------------
    def _check_handshake(self, event: Event, *, sender: Role) -> None:
        fail = self._local if sender is self.our_role else self._remote
        if isinstance(event, Welcome) and self.hello is not None and self.welcome is None:
            h = self.hello
            if not h.min_version <= event.version <= h.max_version:
                raise fail(f"Welcome chose version {event.version}, outside the Hello's "
                           f"{h.min_version}..{h.max_version}")
            extra = event.capabilities - h.capabilities
            if extra:
                raise fail("Welcome grants capabilities never offered: "
                           + ", ".join(sorted(extra)))
        if isinstance(event, (Hello, Welcome)) and not (
                wire.HEADER_BYTES <= event.max_payload_bytes
                <= wire.ABSOLUTE_MAX_PAYLOAD_BYTES):
            raise fail(f"advertised max payload {event.max_payload_bytes} is out of range")

    def _after(self, event: Event) -> None:
        """Record what the handshake fixed, once the state machine accepted it."""
        ours = self.our_role
        if isinstance(event, Hello):
            self.hello = event
            if ours is Role.DESTINATION:
                self.peer_max_payload_bytes = event.max_payload_bytes
        elif isinstance(event, Welcome) and self.welcome is None:
            self.welcome = event
            if ours is Role.SOURCE:
                self.peer_max_payload_bytes = event.max_payload_bytes
            # Handshake frames use wire version 1; later frames the negotiated one.
            self._version = event.version
            self._reader.version = event.version
            self._reader.max_payload_bytes = self.max_payload_bytes
        elif isinstance(event, Refuse):
            self.refusal = event

    def refused_error(self) -> HandshakeRefused | None:
        """The peer's refusal as an exception (None when not refused)."""
        if self.refusal is None:
            return None
        return HandshakeRefused(int(self.refusal.code), self.refusal.reason,
                                phase=Phase.HANDSHAKE.label, channel=self.name)

    def _remote(self, message: str) -> RemoteProtocolError:
        self._remote_error = RemoteProtocolError(message, phase=self.phase, channel=self.name)
        return self._remote_error

    def _local(self, message: str, *, sticky: bool = True) -> LocalProtocolError:
        err = LocalProtocolError(message, phase=self.phase, channel=self.name)
        if sticky:
            self._local_error = err
        return err

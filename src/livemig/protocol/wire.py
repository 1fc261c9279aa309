"""Frames: the fixed little-endian header and an incremental frame reader.

Theory of operation
-------------------
Every message travels as one frame::

    offset size field
    0      4    magic        b"LMIG"
    4      2    version      wire version (handshake frames always 1)
    6      2    type         message id from events.WIRE_IDS; 0 is invalid
    8      2    flags        per-message flags (undefined bits must be 0)
    10     2    reserved     must be 0
    12     4    length       payload bytes, <= the receiver's cap
    16     8    sequence     per direction, starts at 0, strictly +1
    24     8    checksum     xxh3-64 of the payload (seed 0)
    32          payload

Nothing is carried implicitly from one frame to the next: a frame can be
checked on its own (the sequence number is the one exception, and it exists
precisely to detect lost, duplicated or reordered frames).

Copies. Encoding never joins: :func:`encode_frame` returns the 32-byte header
followed by the caller's payload buffers untouched, ready for
``transport.writelines``/``socket.sendmsg``. Decoding is incremental
(:class:`FrameReader`): small frames are sliced out of the receive buffer (one
copy); once the header of a frame whose payload does not fit in what is
buffered is validated, a payload buffer of the exact length is allocated and
every later byte of that payload is copied straight into it from the data the
caller feeds (one copy), never through the receive buffer. With
``get_buffer``/``buffer_updated`` (asyncio.BufferedProtocol) the socket reads
land directly in that payload buffer: no copy in Python at all.

Validation happens on the header before a single payload byte is accepted
(magic, version, type, reserved, length cap), so a hostile peer cannot make us
allocate more than the cap. Failures raise :class:`FrameError` carrying a
short reason; the connection turns it into RemoteProtocolError.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy
import xxhash

from .spec import FRAME_HEADER_FORMAT, FRAME_MAGIC as MAGIC, WIRE_VERSION

HEADER = struct.Struct(FRAME_HEADER_FORMAT)
HEADER_BYTES = HEADER.size  # 32
DEFAULT_MAX_PAYLOAD_BYTES = 64 << 20
# Hard ceiling whatever is negotiated: length is a u32 on the wire.
ABSOLUTE_MAX_PAYLOAD_BYTES = (1 << 32) - 1
# Payloads at least this large are filled in place rather than sliced out.
_DIRECT_FILL_BYTES = 64 << 10
# Receive staging area for get_buffer() between large payloads.
_STAGING_BYTES = 256 << 10

assert HEADER_BYTES == 32


class FrameError(Exception):
    """A frame is malformed; ``reason`` is short and names the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``payload`` is a read-only memoryview that owns its
    own buffer (it stays valid after the reader moves on)."""

    version: int
    type_id: int
    flags: int
    sequence: int
    payload: memoryview


def payload_checksum(parts) -> int:
    """xxh3-64 over the concatenation of ``parts`` without joining them."""
    if len(parts) == 1:
        return xxhash.xxh3_64_intdigest(parts[0])
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def _nbytes(part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def encode_frame(type_id: int, flags: int, sequence: int, parts: list, *,
                 version: int = WIRE_VERSION,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> list:
    """Header + payload parts, as a list of buffers for writelines.

    ``parts`` are bytes-like objects (bytes, bytearray, C-contiguous
    memoryviews); they are referenced, not copied, so the caller must not
    modify them until they are written out.
    """
    if not 0 < type_id <= 0xFFFF:
        raise ValueError(f"frame type {type_id} is invalid (0 is reserved, max 65535)")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"frame flags {flags:#x} do not fit in 16 bits")
    parts = [p for p in parts if _nbytes(p)]
    length_bytes = sum(_nbytes(p) for p in parts)
    if length_bytes > min(max_payload_bytes, ABSOLUTE_MAX_PAYLOAD_BYTES):
        raise ValueError(
            f"payload of {length_bytes} bytes exceeds the cap of {max_payload_bytes} bytes")
    checksum = payload_checksum(parts) if parts else xxhash.xxh3_64_intdigest(b"")
    header = HEADER.pack(MAGIC, version, type_id, flags, 0, length_bytes, sequence, checksum)
    return [header, *parts]


class FrameReader:
    """Incremental frame parser over fed chunks.

    ``feed(data)`` only stores bytes; ``next_frame()`` returns a Frame, or
    None when more data is needed, or raises FrameError. ``valid_types`` is the
    set of defined type ids; ``version`` the only header version accepted.
    """

    def __init__(self, *, valid_types, version: int = WIRE_VERSION,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES):
        self.valid_types = frozenset(valid_types)
        self.version = version
        self.max_payload_bytes = max_payload_bytes
        self.expected_sequence = 0
        self._buf = bytearray()
        # A validated header whose payload is being filled in place.
        self._pending: tuple | None = None
        self._body = None    # numpy.uint8 array: the payload being filled
        self._body_view: memoryview | None = None
        self._filled = 0
        self._staging: memoryview | None = None
        self._expect_large = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) + self._filled

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has been received (truncation at EOF)."""
        return bool(self._buf) or self._pending is not None

    def discard(self) -> None:
        """Forget buffered bytes, a payload being filled and the staging area."""
        self._buf = bytearray()
        self._pending = self._body = self._body_view = self._staging = None
        self._filled = 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next received bytes (asyncio's
        BufferedProtocol shape): the unfilled rest of a large payload, so the
        kernel writes straight into it, or else a staging area. Call
        :meth:`buffer_updated` with the count written before anything else."""
        if self._pending is not None:
            return self._body_view[self._filled:]
        if self._staging is None:
            self._staging = memoryview(bytearray(_STAGING_BYTES))
        if self._expect_large and len(self._buf) < HEADER_BYTES:
            # After a large frame another one most likely follows: read just
            # its header, so that its payload is then received in place
            # rather than staged and copied twice.
            return self._staging[:HEADER_BYTES - len(self._buf)]
        return self._staging

    def buffer_updated(self, nbytes: int) -> None:
        if self._pending is not None:
            self._filled += nbytes
        else:
            self._buf += self._staging[:nbytes]

    def feed(self, data) -> None:
        if self._pending is not None:
            view = data if isinstance(data, memoryview) else memoryview(data)
            view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
            room = len(self._body) - self._filled
            take = min(room, len(view))
            self._body_view[self._filled:self._filled + take] = view[:take]
            self._filled += take
            if take < len(view):
                self._buf += view[take:]
        else:
            self._buf += data

    def next_frame(self) -> Frame | None:
        if self._pending is not None:
            if self._filled < len(self._body):
                return None
            header = self._pending
            payload = self._body
            self._pending = self._body = self._body_view = None
            self._filled = 0
            return self._finish(header, payload)
        if len(self._buf) < HEADER_BYTES:
            prefix = bytes(self._buf[:4])
            if not MAGIC.startswith(prefix):
                raise FrameError(f"bad magic {prefix!r}")
            return None
        header = self._parse_header()
        length = header[3]
        available = len(self._buf) - HEADER_BYTES
        if available >= length:
            payload = self._buf[HEADER_BYTES:HEADER_BYTES + length]
            del self._buf[:HEADER_BYTES + length]
            return self._finish(header, payload)
        if length >= _DIRECT_FILL_BYTES:
            # Uninitialised on purpose: every byte is written before the frame
            # is released, and zero-filling a fresh 1 MiB costs as much as a
            # third of receiving it.
            self._body = numpy.empty(length, dtype=numpy.uint8)
            self._body_view = memoryview(self._body)
            self._body_view[:available] = memoryview(self._buf)[HEADER_BYTES:]
            self._filled = available
            self._pending = header
            self._buf = bytearray()
        return None

    def _parse_header(self) -> tuple:
        magic, version, type_id, flags, reserved, length, sequence, checksum = \
            HEADER.unpack_from(self._buf, 0)
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}")
        if version != self.version:
            raise FrameError(f"unsupported frame version {version} (expected {self.version})")
        if type_id == 0:
            raise FrameError("frame type 0 is invalid")
        if type_id not in self.valid_types:
            raise FrameError(f"unknown frame type {type_id}")
        if reserved != 0:
            raise FrameError(f"reserved header field is {reserved:#x}, must be 0")
        if length > self.max_payload_bytes:
            raise FrameError(
                f"payload length {length} exceeds the cap of {self.max_payload_bytes} bytes")
        if sequence != self.expected_sequence:
            raise FrameError(
                f"sequence {sequence} out of order (expected {self.expected_sequence})")
        return (version, type_id, flags, length, sequence, checksum)

    def _finish(self, header: tuple, payload) -> Frame:
        version, type_id, flags, length, sequence, checksum = header
        if xxhash.xxh3_64_intdigest(payload) != checksum:
            raise FrameError(f"payload checksum mismatch in frame {sequence} (type {type_id})")
        self.expected_sequence = sequence + 1
        self._expect_large = length >= _DIRECT_FILL_BYTES
        return Frame(version, type_id, flags, sequence, memoryview(payload).toreadonly())

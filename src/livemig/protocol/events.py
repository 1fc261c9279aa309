"""Protocol messages: one frozen dataclass per message, each owning its payload layout.

Theory of operation
-------------------
An event knows how to turn itself into payload buffers (``encode() -> (flags,
parts)``) and how to rebuild itself from a frame's payload
(``decode(flags, payload)``). Layouts are explicit little-endian ``struct``
formats; JSON appears only in MigrationOffer's small, human-level VM config.
Wire ids are this protocol's own numbers (:data:`WIRE_IDS`), grouped by phase,
and never reuse internal enum values; 0 is invalid.

Decoding trusts nothing: every length is checked against what is present,
trailing bytes are an error, undefined flag bits and reserved fields must be
0, text must be UTF-8, bitmaps must have zero padding bits. Any violation
raises :class:`PayloadError`, which the connection reports as a
RemoteProtocolError. Bulk page data (PageBatch.data) is never copied: encode
hands the caller's buffer through, decode returns a memoryview slice of the
frame payload.

The layouts are documented field by field in docs/protocol.md.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

import numpy

from .spec import (BATCH_POSTCOPY, BATCH_URGENT, MESSAGE_IDS, PAGE_BATCH_FORMAT,
                   PAGE_REQUEST_FORMAT, SWITCHOVER_POSTCOPY)
from .payload import (_U16, _U32, _U64, Event, PayloadError, _as_bytes_view, _check_bitmap,
                      _decode_caps, _Empty, _encode_caps, _no_flags, _Reader, _text)


class ChannelKind(IntEnum):
    CONTROL = 1   # handshake, offer, rounds, switchover, completion
    BULK = 2      # page batches, source -> destination
    URGENT = 3    # post-copy page requests and their replies


class Mode(IntEnum):
    PRECOPY = 1
    POSTCOPY = 2
    HYBRID = 3    # pre-copy rounds, then switch over to post-copy


class Phase(IntEnum):
    HANDSHAKE = 1
    PRECOPY = 2
    SWITCHOVER = 3
    POSTCOPY = 4
    COMPLETE = 5

    @property
    def label(self) -> str:
        return self.name.lower()


class RefuseCode(IntEnum):
    VERSION = 1        # no common protocol version
    CAPABILITY = 2     # a required capability is missing
    BUSY = 3           # the destination already hosts or receives a VM
    SESSION = 4        # unknown session (e.g. a resume for a session we never saw)
    OFFER = 5          # the offered VM cannot be hosted (size, page size, mode)
    RESOURCES = 6      # not enough memory or other local resources
    CHANNEL = 7        # channel kind not expected now
    OTHER = 255



MAX_TEXT_BYTES = 4096
MAX_CONFIG_BYTES = 1 << 20
MAX_REQUEST_PAGES = 1 << 16
MAX_INVALIDATE_PAGES = 1 << 20   # 8 MiB of indices: 4 GiB of guest memory per frame
SESSION_ID_BYTES = 16
DIGEST_BYTES = 16


# --- handshake ---------------------------------------------------------------

_HELLO = struct.Struct("<HHBBHI16s")


@dataclass(frozen=True)
class Hello(Event):
    """Source -> destination, first frame of every channel."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Hello"]
    min_version: int
    max_version: int
    channel_kind: ChannelKind
    session_id: bytes
    capabilities: frozenset = frozenset()
    resume: bool = False
    max_payload_bytes: int = 64 << 20

    def encode(self):
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError("session_id must be 16 bytes")
        return 0, [_HELLO.pack(self.min_version, self.max_version, int(self.channel_kind),
                               int(self.resume), 0, self.max_payload_bytes, self.session_id)
                   + _encode_caps(frozenset(self.capabilities))]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        vmin, vmax, kind, resume, reserved, max_payload, session = r.unpack(_HELLO)
        if reserved or resume > 1:
            raise PayloadError("Hello reserved field or resume flag invalid")
        if vmin > vmax or vmin == 0:
            raise PayloadError(f"Hello version range {vmin}..{vmax} is invalid")
        try:
            kind = ChannelKind(kind)
        except ValueError:
            raise PayloadError(f"unknown channel kind {kind}") from None
        caps = _decode_caps(r)
        r.end()
        return cls(vmin, vmax, kind, bytes(session), caps, bool(resume), max_payload)


_WELCOME = struct.Struct("<HHI")


@dataclass(frozen=True)
class Welcome(Event):
    """Destination -> source: the chosen version and the common capabilities."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Welcome"]
    version: int
    capabilities: frozenset = frozenset()
    max_payload_bytes: int = 64 << 20

    def encode(self):
        return 0, [_WELCOME.pack(self.version, 0, self.max_payload_bytes)
                   + _encode_caps(frozenset(self.capabilities))]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        version, reserved, max_payload = r.unpack(_WELCOME)
        if reserved:
            raise PayloadError("Welcome reserved field is not 0")
        caps = _decode_caps(r)
        r.end()
        return cls(version, caps, max_payload)


@dataclass(frozen=True)
class Refuse(Event):
    """Destination -> source: no to a Hello or a MigrationOffer, and why."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Refuse"]
    code: RefuseCode
    reason: str = ""

    def encode(self):
        return 0, [_U16.pack(int(self.code)) + _text(self.reason, _U16, MAX_TEXT_BYTES)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        (code,) = r.unpack(_U16)
        reason = r.text(_U16, MAX_TEXT_BYTES)
        r.end()
        try:
            code = RefuseCode(code)
        except ValueError:
            code = RefuseCode.OTHER  # newer peers may add codes; the text says why
        return cls(code, reason)


# --- offer -------------------------------------------------------------------

_OFFER = struct.Struct("<BBHIQI")


@dataclass(frozen=True)
class MigrationOffer(Event):
    """Source -> destination: what VM comes and how it will move."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["MigrationOffer"]
    config: dict
    mode: Mode
    npages: int
    page_size: int = 4096

    def encode(self):
        raw = json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError("VM config exceeds 1 MiB of JSON")
        return 0, [_OFFER.pack(int(self.mode), 0, 0, self.page_size, self.npages, len(raw)), raw]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        mode, res8, res16, page_size, npages, config_len = r.unpack(_OFFER)
        if res8 or res16:
            raise PayloadError("MigrationOffer reserved fields are not 0")
        try:
            mode = Mode(mode)
        except ValueError:
            raise PayloadError(f"unknown migration mode {mode}") from None
        if page_size < 512 or page_size & (page_size - 1):
            raise PayloadError(f"page size {page_size} is not a power of two >= 512")
        if config_len > MAX_CONFIG_BYTES:
            raise PayloadError("VM config exceeds 1 MiB")
        raw = r.take(config_len)
        r.end()
        try:
            config = json.loads(str(raw, "utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PayloadError(f"VM config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise PayloadError("VM config must be a JSON object")
        return cls(config, mode, npages, page_size)


@dataclass(frozen=True)
class Accept(_Empty):
    """Destination -> source: the offer is accepted, memory is ready."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Accept"]


# --- pre-copy ----------------------------------------------------------------

@dataclass(frozen=True)
class RoundStart(Event):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundStart"]
    round: int

    def encode(self):
        return 0, [_U32.pack(self.round)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        (rnd,) = r.unpack(_U32)
        r.end()
        return cls(rnd)


_BATCH = struct.Struct(PAGE_BATCH_FORMAT)


@dataclass(frozen=True)
class PageBatch(Event):
    """Source -> destination: opaque page-codec bytes for ``npages`` pages.

    ``request_id`` is 0 for pushed pages, else the PageRequest answered (then
    flags carry BATCH_URGENT). ``data`` is passed through without copying: one
    buffer, or a list/tuple of buffers sent back to back (an encoder's chunks,
    some of them views of guest memory). Decoded, it is one memoryview.
    """

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageBatch"]
    FLAGS: ClassVar[int] = BATCH_URGENT | BATCH_POSTCOPY
    round: int
    npages: int
    data: object = b""
    flags: int = 0
    request_id: int = 0

    def encode(self):
        if self.flags & ~self.FLAGS:
            raise ValueError(f"undefined PageBatch flags {self.flags:#x}")
        return self.flags, [_BATCH.pack(self.round, self.npages, self.request_id),
                            *self._views()]

    def _views(self) -> list:
        if isinstance(self.data, (list, tuple)):
            return [_as_bytes_view(d) for d in self.data]
        return [_as_bytes_view(self.data)]

    @classmethod
    def decode(cls, flags, payload):
        if flags & ~cls.FLAGS:
            raise PayloadError(f"undefined PageBatch flags {flags:#x}")
        r = _Reader(payload)
        rnd, npages, request_id = r.unpack(_BATCH)
        if request_id and not flags & BATCH_URGENT:
            raise PayloadError("a PageBatch answering a request must be flagged URGENT")
        return cls(rnd, npages, r.rest(), flags, request_id)

    @property
    def variant(self):
        if self.flags & BATCH_URGENT:
            return "urgent"
        return "postcopy" if self.flags & BATCH_POSTCOPY else "precopy"

    @property
    def data_bytes(self) -> int:
        return sum(v.nbytes for v in self._views())


_ROUND_END = struct.Struct("<IIQQ")


@dataclass(frozen=True)
class RoundEnd(Event):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundEnd"]
    round: int
    pages: int
    bytes: int

    def encode(self):
        return 0, [_ROUND_END.pack(self.round, 0, self.pages, self.bytes)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        rnd, reserved, pages, nbytes = r.unpack(_ROUND_END)
        r.end()
        if reserved:
            raise PayloadError("RoundEnd reserved field is not 0")
        return cls(rnd, pages, nbytes)


_ROUND_ACK = struct.Struct("<IIQ")


@dataclass(frozen=True)
class RoundAck(Event):
    """Destination -> source: every page of ``round`` is applied. The source
    times rounds up to this ack, so its bandwidth estimate is end to end (a
    destination slower than the link is measured as such)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundAck"]
    round: int
    pages: int

    def encode(self):
        return 0, [_ROUND_ACK.pack(self.round, 0, self.pages)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        rnd, reserved, pages = r.unpack(_ROUND_ACK)
        r.end()
        if reserved:
            raise PayloadError("RoundAck reserved field is not 0")
        return cls(rnd, pages)


_INVALIDATE = struct.Struct("<II")


@dataclass(frozen=True, eq=False)
class PageInvalidate(Event):
    """Source -> destination, hybrid, guest still running at the source: the
    pages the guest wrote again since they were sent. The destination makes
    them absent (they are owed now, fetched in post-copy) and answers
    RoundAck(round, count). The first one also tells the destination to
    register its memory for post-copy: no page batch follows it.

    ``pages``: strictly ascending page indices (uint64; may be empty)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageInvalidate"]
    round: int
    pages: numpy.ndarray = field(default_factory=lambda: numpy.zeros(0, dtype="<u8"))

    def encode(self):
        pages = numpy.ascontiguousarray(self.pages, dtype="<u8")
        if pages.ndim != 1 or pages.size > MAX_INVALIDATE_PAGES:
            raise ValueError(f"a PageInvalidate names at most {MAX_INVALIDATE_PAGES} pages")
        if pages.size > 1 and not bool(numpy.all(pages[1:] > pages[:-1])):
            raise ValueError("PageInvalidate pages must be strictly ascending")
        return 0, [_INVALIDATE.pack(self.round, pages.size), memoryview(pages).cast("B")]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        rnd, count = r.unpack(_INVALIDATE)
        if count > MAX_INVALIDATE_PAGES:
            raise PayloadError(f"PageInvalidate of {count} pages exceeds "
                               f"{MAX_INVALIDATE_PAGES}")
        raw = r.take(count * 8)
        r.end()
        pages = numpy.frombuffer(raw, dtype="<u8")
        if count > 1 and not bool(numpy.all(pages[1:] > pages[:-1])):
            raise PayloadError("PageInvalidate pages are not strictly ascending")
        return cls(rnd, pages)

    def __eq__(self, other):
        if not isinstance(other, PageInvalidate):
            return NotImplemented
        return self.round == other.round and numpy.array_equal(self.pages, other.pages)

    __hash__ = None


# --- switchover ----------------------------------------------------------------

@dataclass(frozen=True)
class Switchover(Event):
    """Source -> destination, VM paused: CPU/device state, the memory digest
    the destination must reproduce, and for post-copy the pages still owed
    (bit i set = page i not yet sent; bit order: LSB first within a byte)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Switchover"]
    FLAGS: ClassVar[int] = SWITCHOVER_POSTCOPY
    state: bytes
    digest: bytes
    owed_npages: int = 0
    owed_bitmap: bytes | None = None

    def encode(self):
        if len(self.digest) != DIGEST_BYTES:
            raise ValueError("digest must be 16 bytes")
        parts = [bytes(self.digest) + _U32.pack(len(self.state)), self.state]
        if self.owed_bitmap is None:
            return 0, parts
        _check_bitmap(self.owed_npages, bytes(self.owed_bitmap))
        parts += [_U64.pack(self.owed_npages), self.owed_bitmap]
        return SWITCHOVER_POSTCOPY, parts

    @classmethod
    def decode(cls, flags, payload):
        if flags & ~cls.FLAGS:
            raise PayloadError(f"undefined Switchover flags {flags:#x}")
        r = _Reader(payload)
        digest = bytes(r.take(DIGEST_BYTES))
        (state_len,) = r.unpack(_U32)
        state = bytes(r.take(state_len))
        if not flags & SWITCHOVER_POSTCOPY:
            r.end()
            return cls(state, digest)
        (npages,) = r.unpack(_U64)
        bitmap = bytes(r.rest())
        _check_bitmap(npages, bitmap)
        return cls(state, digest, npages, bitmap)

    @property
    def variant(self):
        return "postcopy" if self.owed_bitmap is not None else "precopy"


@dataclass(frozen=True)
class Resumed(_Empty):
    """Destination -> source, answering Commit: the VM runs here now."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Resumed"]


@dataclass(frozen=True)
class Verified(_Empty):
    """Destination -> source: digest and state check out; the VM is loaded
    but still paused, waiting for Commit."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Verified"]


@dataclass(frozen=True)
class Commit(_Empty):
    """Source -> destination: the source gives the VM up and will not resume
    it on its own; resume it."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Commit"]


@dataclass(frozen=True)
class VerifyFailed(Event):
    """Destination -> source: the digest did not match; the source resumes."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["VerifyFailed"]
    expected: bytes
    actual: bytes
    reason: str = ""

    def encode(self):
        if len(self.expected) != DIGEST_BYTES or len(self.actual) != DIGEST_BYTES:
            raise ValueError("digests must be 16 bytes")
        return 0, [bytes(self.expected) + bytes(self.actual)
                   + _text(self.reason, _U16, MAX_TEXT_BYTES)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        expected = bytes(r.take(DIGEST_BYTES))
        actual = bytes(r.take(DIGEST_BYTES))
        reason = r.text(_U16, MAX_TEXT_BYTES)
        r.end()
        return cls(expected, actual, reason)


# --- post-copy and recovery ------------------------------------------------------

_REQUEST = struct.Struct(PAGE_REQUEST_FORMAT)


@dataclass(frozen=True)
class PageRequest(Event):
    """Destination -> source: the guest faulted on these pages; answer first."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageRequest"]
    request_id: int
    pages: tuple = field(default_factory=tuple)

    def encode(self):
        count = len(self.pages)
        if not 0 < count <= MAX_REQUEST_PAGES:
            raise ValueError(f"a PageRequest names 1..{MAX_REQUEST_PAGES} pages")
        return 0, [_REQUEST.pack(self.request_id, count, 0),
                   struct.pack(f"<{count}Q", *self.pages)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        request_id, count, reserved = r.unpack(_REQUEST)
        if reserved or not 0 < count <= MAX_REQUEST_PAGES:
            raise PayloadError(f"PageRequest count {count} or reserved field invalid")
        pages = r.unpack(struct.Struct(f"<{count}Q"))
        r.end()
        return cls(request_id, pages)


@dataclass(frozen=True)
class PresentReport(Event):
    """Destination -> source on a resumed session: pages it already holds
    (bit i set = page i present and valid), so the source skips them."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PresentReport"]
    npages: int
    bitmap: bytes

    def encode(self):
        _check_bitmap(self.npages, bytes(self.bitmap))
        return 0, [_U64.pack(self.npages), self.bitmap]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        (npages,) = r.unpack(_U64)
        bitmap = bytes(r.rest())
        _check_bitmap(npages, bitmap)
        return cls(npages, bitmap)


@dataclass(frozen=True)
class PostcopyComplete(Event):
    """Destination -> source: every owed page has arrived. ``digest`` is the
    digest of the per-page hashes of what landed (hashed from the data as
    placed, before the guest could change it); the source compares it with
    the digest of what it sent and answers Complete, or Abort on a mismatch."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PostcopyComplete"]
    pages: int
    digest: bytes = bytes(DIGEST_BYTES)

    def encode(self):
        if len(self.digest) != DIGEST_BYTES:
            raise ValueError("digest must be 16 bytes")
        return 0, [_U64.pack(self.pages) + bytes(self.digest)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        (pages,) = r.unpack(_U64)
        digest = bytes(r.take(DIGEST_BYTES))
        r.end()
        return cls(pages, digest)


# --- ending ------------------------------------------------------------------------

@dataclass(frozen=True)
class Complete(_Empty):
    """Source -> destination: the source released the VM; the session is over."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Complete"]


_ABORT = struct.Struct("<BB")


@dataclass(frozen=True)
class Abort(Event):
    """Either side: the migration is abandoned; the source keeps (or resumes) the VM."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Abort"]
    phase: Phase
    reason: str = ""

    def encode(self):
        return 0, [_ABORT.pack(int(self.phase), 0) + _text(self.reason, _U16, MAX_TEXT_BYTES)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        phase, reserved = r.unpack(_ABORT)
        reason = r.text(_U16, MAX_TEXT_BYTES)
        r.end()
        if reserved:
            raise PayloadError("Abort reserved field is not 0")
        try:
            phase = Phase(phase)
        except ValueError:
            raise PayloadError(f"unknown phase {phase}") from None
        return cls(phase, reason)


@dataclass(frozen=True)
class Ping(Event):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Ping"]
    nonce: int

    def encode(self):
        return 0, [_U64.pack(self.nonce)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        (nonce,) = r.unpack(_U64)
        r.end()
        return cls(nonce)


@dataclass(frozen=True)
class Pong(Ping):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Pong"]


# --- bandwidth probe (livemig plan) -------------------------------------------------

MAX_PROBE_BYTES = 1 << 30
"""Most filler bytes one probe may announce: a probe is a measurement, not a transfer."""
_PROBE_DATA = struct.Struct("<II")
_PROBE_END = struct.Struct("<IIQ")
_PROBE_RESULT = struct.Struct("<IIQQ")


@dataclass(frozen=True)
class ProbeData(Event):
    """Source -> destination, control channel in READY (before any offer):
    ``data`` is filler the destination counts and drops. ``seq`` numbers the
    frames of one probe from 0."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeData"]
    seq: int
    data: object = b""

    def encode(self):
        return 0, [_PROBE_DATA.pack(self.seq, 0), _as_bytes_view(self.data)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        seq, reserved = r.unpack(_PROBE_DATA)
        if reserved:
            raise PayloadError("ProbeData reserved field is not 0")
        return cls(seq, r.rest())


@dataclass(frozen=True)
class ProbeEnd(Event):
    """Source -> destination: the probe sent ``frames`` ProbeData frames holding
    ``bytes`` filler bytes in all; answer with ProbeResult."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeEnd"]
    frames: int
    bytes: int

    def encode(self):
        return 0, [_PROBE_END.pack(self.frames, 0, self.bytes)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        frames, reserved, nbytes = r.unpack(_PROBE_END)
        r.end()
        if reserved:
            raise PayloadError("ProbeEnd reserved field is not 0")
        if nbytes > MAX_PROBE_BYTES:
            raise PayloadError(f"probe of {nbytes} bytes exceeds {MAX_PROBE_BYTES}")
        return cls(frames, nbytes)


@dataclass(frozen=True)
class ProbeResult(Event):
    """Destination -> source: of the probe, ``bytes`` filler bytes in ``frames``
    frames arrived after the first frame, over ``duration_ns`` measured by the
    destination's clock from the first frame's arrival to ProbeEnd's. The
    first frame only starts the clock, so connection set-up and TCP slow start
    before it do not count."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeResult"]
    frames: int
    bytes: int
    duration_ns: int

    def encode(self):
        return 0, [_PROBE_RESULT.pack(self.frames, 0, self.bytes, self.duration_ns)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        frames, reserved, nbytes, duration_ns = r.unpack(_PROBE_RESULT)
        r.end()
        if reserved:
            raise PayloadError("ProbeResult reserved field is not 0")
        return cls(frames, nbytes, duration_ns)


# --- handover outcome (a source reconnecting after a break past Commit) ----------------

class OutcomeCode(IntEnum):
    COMMITTED = 1        # resumed here, and the VM is this host's
    NOT_COMMITTED = 2    # Commit never arrived: the copy here was discarded unresumed
    ABANDONED = 3        # resumed here in post-copy, then stopped: owed pages never came


_OUTCOME = struct.Struct("<BBH")


@dataclass(frozen=True)
class Outcome(Event):
    """Destination -> source, first answer on a control channel opened with
    Hello(resume=True) for a session that has ended here: what became of it.
    ``digest`` is the digest of the memory the destination verified (pre-copy)
    or of every page as it landed (post-copy), so that the source can check
    what it releases its copy for; zero for NOT_COMMITTED."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Outcome"]
    code: OutcomeCode
    digest: bytes = bytes(DIGEST_BYTES)
    reason: str = ""

    def encode(self):
        if len(self.digest) != DIGEST_BYTES:
            raise ValueError("digest must be 16 bytes")
        return 0, [_OUTCOME.pack(int(self.code), 0, 0) + bytes(self.digest)
                   + _text(self.reason, _U16, MAX_TEXT_BYTES)]

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        r = _Reader(payload)
        code, res8, res16 = r.unpack(_OUTCOME)
        digest = bytes(r.take(DIGEST_BYTES))
        reason = r.text(_U16, MAX_TEXT_BYTES)
        r.end()
        if res8 or res16:
            raise PayloadError("Outcome reserved fields are not 0")
        try:
            code = OutcomeCode(code)
        except ValueError:
            raise PayloadError(f"unknown handover outcome {code}") from None
        return cls(code, digest, reason)


ALL_EVENTS = (Hello, Welcome, Refuse, MigrationOffer, Accept, RoundStart, PageBatch,
              RoundEnd, RoundAck, PageInvalidate, Switchover, Verified, Commit, Resumed,
              VerifyFailed, PageRequest, PresentReport, PostcopyComplete, Complete, Abort, Ping,
              Pong, ProbeData, ProbeEnd, ProbeResult, Outcome)
WIRE_IDS: dict[int, type[Event]] = {cls.WIRE_ID: cls for cls in ALL_EVENTS}
assert len(WIRE_IDS) == len(ALL_EVENTS) and 0 not in WIRE_IDS


def decode_event(type_id: int, flags: int, payload: memoryview) -> Event:
    """The message a frame carries; PayloadError if it does not parse."""
    cls = WIRE_IDS.get(type_id)
    if cls is None:
        raise PayloadError(f"unknown message type {type_id}")
    try:
        return cls.decode(flags, payload)
    except PayloadError:
        raise
    except (struct.error, ValueError, OverflowError) as exc:
        raise PayloadError(f"{cls.__name__}: {exc}") from None

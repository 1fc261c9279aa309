"""Protocol messages: one frozen dataclass per message, its payload declared once.

Theory of operation
-------------------
Each message lists its payload as a field table in wire order (``FIELDS``:
name, wire type, checks; the types are in fields.py), and both
``encode() -> (flags, parts)`` and ``decode(flags, payload)`` are derived
from it (payload.py). The dataclass attributes are the message's API; the
table is its wire layout (the two orders may differ, as in Hello). Layouts
are little-endian; JSON appears only in MigrationOffer's small, human-level
VM config. Wire ids come from ``spec.MESSAGE_IDS`` (this protocol's own
numbers, grouped by phase; 0 is invalid).

Decoding trusts nothing: every length is checked against what is present,
trailing bytes are an error, undefined flag bits and reserved fields must be
0, text must be UTF-8, bitmaps must have zero padding bits, counts stay under
their caps. Any violation raises :class:`PayloadError` naming the message and
the field, which the connection reports as a RemoteProtocolError. Bulk page
data (PageBatch.data) is never copied: encode hands the caller's buffer
through, decode returns a memoryview slice of the frame payload.

The layouts are documented field by field in docs/protocol.md.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

import numpy

from .fields import (Bitmap, Blob, Caps, Count, FixedBytes, Json, Layout, PayloadError, Reader,
                     Reserved, Tail, Text, U64Array, as_bytes_views, u8, u16, u32, u64)
from .payload import Event
from .spec import (BATCH_POSTCOPY, BATCH_URGENT, MESSAGE_IDS, PAGE_BATCH_FORMAT,
                   PAGE_REQUEST_FORMAT, STREAM_ACK_FORMAT, STREAM_END_FORMAT,
                   SWITCHOVER_POSTCOPY)


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


class OutcomeCode(IntEnum):
    """What became of a session that has ended at the destination (Outcome)."""
    COMMITTED = 1        # resumed here, and the VM is this host's
    NOT_COMMITTED = 2    # Commit never arrived: the copy here was discarded unresumed
    ABANDONED = 3        # resumed here in post-copy, then stopped: owed pages never came


MAX_TEXT_BYTES = 4096
MAX_CONFIG_BYTES = 1 << 20
MAX_CAPABILITIES = 64
MAX_REQUEST_PAGES = 1 << 16
MAX_INVALIDATE_PAGES = 1 << 20   # 8 MiB of indices: 4 GiB of guest memory per frame
MAX_PROBE_BYTES = 1 << 30
"""Most filler bytes one probe may announce: a probe is a measurement, not a transfer."""
SESSION_ID_BYTES = 16
DIGEST_BYTES = 16


def _page_size_problem(page_size: int) -> str | None:
    if page_size < 512 or page_size & (page_size - 1):
        return "is not a power of two >= 512"
    return None


_REASON = Text("reason", MAX_TEXT_BYTES)
_DIGEST = FixedBytes("digest", DIGEST_BYTES)


# --- handshake ---------------------------------------------------------------

@dataclass(frozen=True)
class Hello(Event):
    """Source -> destination, first frame of every channel."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Hello"]
    FIELDS = (u16("min_version"), u16("max_version"),
              u8("channel_kind", enum=ChannelKind), u8("resume", boolean=True),
              Reserved("reserved", "H"), u32("max_payload_bytes"),
              FixedBytes("session_id", SESSION_ID_BYTES), Caps("capabilities", MAX_CAPABILITIES))
    min_version: int
    max_version: int
    channel_kind: ChannelKind
    session_id: bytes
    capabilities: frozenset = frozenset()
    resume: bool = False
    max_payload_bytes: int = 64 << 20

    @classmethod
    def _build(cls, flags, values):
        vmin, vmax = values["min_version"], values["max_version"]
        if vmin > vmax or vmin == 0:
            raise PayloadError(f"Hello version range {vmin}..{vmax} is invalid")
        return cls(**values)

    @property
    def variant(self):
        # The control table tells a resumed session's channel from a new one.
        return "resume" if self.resume else "new"


@dataclass(frozen=True)
class Welcome(Event):
    """Destination -> source: the chosen version and the common capabilities."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Welcome"]
    FIELDS = (u16("version"), Reserved("reserved", "H"), u32("max_payload_bytes"),
              Caps("capabilities", MAX_CAPABILITIES))
    version: int
    capabilities: frozenset = frozenset()
    max_payload_bytes: int = 64 << 20


@dataclass(frozen=True)
class Refuse(Event):
    """Destination -> source: no to a Hello or a MigrationOffer, and why."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Refuse"]
    # newer peers may add codes: an unknown one reads as OTHER, the text says why
    FIELDS = (u16("code", enum=RefuseCode, unknown=RefuseCode.OTHER), _REASON)
    code: RefuseCode
    reason: str = ""


# --- offer -------------------------------------------------------------------

@dataclass(frozen=True)
class MigrationOffer(Event):
    """Source -> destination: what VM comes and how it will move."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["MigrationOffer"]
    FIELDS = (u8("mode", enum=Mode), Reserved("reserved8", "B"), Reserved("reserved16", "H"),
              u32("page_size", check=_page_size_problem), u64("npages"),
              Json("config", MAX_CONFIG_BYTES))
    config: dict
    mode: Mode
    npages: int
    page_size: int = 4096


@dataclass(frozen=True)
class Accept(Event):
    """Destination -> source: the offer is accepted, memory is ready."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Accept"]


# --- pre-copy ----------------------------------------------------------------

@dataclass(frozen=True)
class RoundStart(Event):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundStart"]
    FIELDS = (u32("round"),)
    round: int


@dataclass(frozen=True)
class PageBatch(Event):
    """Source -> destination: opaque page-codec bytes for ``npages`` pages.

    ``request_id`` is 0 for pushed pages, else the PageRequest answered (then
    flags carry BATCH_URGENT). ``data`` is passed through without copying: one
    buffer, or a list/tuple of buffers sent back to back (an encoder's chunks,
    some of them views of guest memory). Decoded, it is one memoryview.
    The prefix is spec.PAGE_BATCH_FORMAT, which the native urgent path speaks.
    """

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageBatch"]
    FLAGS: ClassVar[int] = BATCH_URGENT | BATCH_POSTCOPY
    FIELDS = (u32("round"), u32("npages"), u64("request_id"), Tail("data"))
    round: int
    npages: int
    data: object = b""
    flags: int = 0
    request_id: int = 0

    def _frame_flags(self):
        if self.flags & ~self.FLAGS:
            raise ValueError(f"undefined PageBatch flags {self.flags:#x}")
        return self.flags

    @classmethod
    def _build(cls, flags, values):
        if values["request_id"] and not flags & BATCH_URGENT:
            raise PayloadError("a PageBatch answering a request must be flagged URGENT")
        return cls(flags=flags, **values)

    @property
    def variant(self):
        if self.flags & BATCH_URGENT:
            return "urgent"
        return "postcopy" if self.flags & BATCH_POSTCOPY else "precopy"

    @property
    def data_bytes(self) -> int:
        return sum(view.nbytes for view in as_bytes_views(self.data))


@dataclass(frozen=True)
class RoundEnd(Event):
    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundEnd"]
    FIELDS = (u32("round"), Reserved("reserved", "I"), u64("pages"), u64("bytes"))
    round: int
    pages: int
    bytes: int


@dataclass(frozen=True)
class RoundAck(Event):
    """Destination -> source: every page of ``round`` is applied. The source
    times rounds up to this ack, so its bandwidth estimate is end to end (a
    destination slower than the link is measured as such)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["RoundAck"]
    FIELDS = (u32("round"), Reserved("reserved", "I"), u64("pages"))
    round: int
    pages: int


@dataclass(frozen=True)
class StreamEnd(Event):
    """Source -> destination, on a native bulk stream (wire version 2): this
    stream's part of ``round`` is complete, ``pages`` pages in ``bytes``
    page-batch bytes since the previous marker. Closes the round per stream;
    the control channel's RoundEnd follows only once every stream is acked."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamEnd"]
    FIELDS = (u32("round"), Reserved("reserved", "I"), u64("pages"), u64("bytes"))
    round: int
    pages: int
    bytes: int


@dataclass(frozen=True)
class StreamAck(Event):
    """Destination -> source, on a native bulk stream: every page of this
    stream's part of ``round`` is placed (``pages`` of them)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamAck"]
    FIELDS = (u32("round"), Reserved("reserved", "I"), u64("pages"))
    round: int
    pages: int


@dataclass(frozen=True, eq=False)
class PageInvalidate(Event):
    """Source -> destination, hybrid, guest still running at the source: the
    pages the guest wrote again since they were sent. The destination makes
    them absent (they are owed now, fetched in post-copy) and answers
    RoundAck(round, count). The first one also tells the destination to
    register its memory for post-copy: no page batch follows it.

    ``pages``: strictly ascending page indices (uint64; may be empty)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageInvalidate"]
    FIELDS = (u32("round"), Count("count", "I", of="pages"),
              U64Array("pages", "count", max_count=MAX_INVALIDATE_PAGES, ascending=True))
    round: int
    pages: numpy.ndarray = field(default_factory=lambda: numpy.zeros(0, dtype="<u8"))

    def __eq__(self, other):
        if not isinstance(other, PageInvalidate):
            return NotImplemented
        return self.round == other.round and numpy.array_equal(self.pages, other.pages)

    __hash__ = None


# --- switchover ----------------------------------------------------------------

_OWED = Layout("Switchover", (u64("owed_npages"), Bitmap("owed_bitmap", "owed_npages")))


@dataclass(frozen=True)
class Switchover(Event):
    """Source -> destination, VM paused: CPU/device state, the memory digest
    the destination must reproduce, and for post-copy the pages still owed
    (bit i set = page i not yet sent; bit order: LSB first within a byte).

    The one hand-written codec: the owed-pages section exists only when the
    POSTCOPY frame flag is set, a layout that depends on the flags. Both
    parts are still field tables (``FIELDS`` and ``_OWED``)."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Switchover"]
    FLAGS: ClassVar[int] = SWITCHOVER_POSTCOPY
    FIELDS = (_DIGEST, Blob("state"))
    state: bytes
    digest: bytes
    owed_npages: int = 0
    owed_bitmap: bytes | None = None

    def encode(self):
        parts = self.LAYOUT.encode({"digest": self.digest, "state": self.state})
        if self.owed_bitmap is None:
            return 0, parts
        return SWITCHOVER_POSTCOPY, parts + _OWED.encode(
            {"owed_npages": self.owed_npages, "owed_bitmap": self.owed_bitmap})

    @classmethod
    def decode(cls, flags, payload):
        cls._check_flags(flags)
        reader = Reader(payload, cls.__name__)
        values = cls.LAYOUT.decode(reader)
        if flags & SWITCHOVER_POSTCOPY:
            values.update(_OWED.decode(reader))
        reader.end()
        return cls(**values)

    @property
    def variant(self):
        return "postcopy" if self.owed_bitmap is not None else "precopy"


@dataclass(frozen=True)
class Resumed(Event):
    """Destination -> source, answering Commit: the VM runs here now."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Resumed"]


@dataclass(frozen=True)
class Verified(Event):
    """Destination -> source: digest and state check out; the VM is loaded
    but still paused, waiting for Commit."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Verified"]


@dataclass(frozen=True)
class Commit(Event):
    """Source -> destination: the source gives the VM up and will not resume
    it on its own; resume it."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Commit"]


@dataclass(frozen=True)
class VerifyFailed(Event):
    """Destination -> source: the digest did not match; the source resumes."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["VerifyFailed"]
    FIELDS = (FixedBytes("expected", DIGEST_BYTES), FixedBytes("actual", DIGEST_BYTES), _REASON)
    expected: bytes
    actual: bytes
    reason: str = ""


# --- post-copy and recovery ------------------------------------------------------

@dataclass(frozen=True)
class PageRequest(Event):
    """Destination -> source: the guest faulted on these pages; answer first.
    The prefix is spec.PAGE_REQUEST_FORMAT, which the native urgent path speaks."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PageRequest"]
    FIELDS = (u64("request_id"), Count("count", "I", of="pages"), Reserved("reserved", "I"),
              U64Array("pages", "count", min_count=1, max_count=MAX_REQUEST_PAGES,
                       as_tuple=True))
    request_id: int
    pages: tuple = field(default_factory=tuple)


@dataclass(frozen=True)
class PresentReport(Event):
    """Destination -> source on a resumed session: pages it already holds
    (bit i set = page i present and valid), so the source skips them."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PresentReport"]
    FIELDS = (u64("npages"), Bitmap("bitmap", "npages"))
    npages: int
    bitmap: bytes


@dataclass(frozen=True)
class ResumeReport(Event):
    """Destination -> source on a control channel opened with Hello(resume=True)
    for a session whose pre-copy rounds a link break interrupted: what it holds.
    ``acked_round`` is the last round it applied in full and acknowledged
    (spec.NO_ROUND if none); ``landed`` has bit i set when page i arrived in a
    later, unfinished round and was applied. ``npages`` must equal the guest's
    page count, so the bitmap is bounded by the offer both sides agreed on.
    Pre-copy then goes on: the source resends only what is not held."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ResumeReport"]
    FIELDS = (u32("acked_round"), Reserved("reserved", "I"), u64("npages"),
              Bitmap("landed", "npages"))
    acked_round: int
    npages: int
    landed: bytes


@dataclass(frozen=True)
class PostcopyComplete(Event):
    """Destination -> source: every owed page has arrived. ``digest`` is the
    digest of the per-page hashes of what landed (hashed from the data as
    placed, before the guest could change it); the source compares it with
    the digest of what it sent and answers Complete, or Abort on a mismatch."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["PostcopyComplete"]
    FIELDS = (u64("pages"), _DIGEST)
    pages: int
    digest: bytes = bytes(DIGEST_BYTES)


# --- ending ------------------------------------------------------------------------

@dataclass(frozen=True)
class Complete(Event):
    """Source -> destination: the source released the VM; the session is over."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Complete"]


@dataclass(frozen=True)
class Abort(Event):
    """Either side: the migration is abandoned; the source keeps (or resumes) the VM."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Abort"]
    FIELDS = (u8("phase", enum=Phase), Reserved("reserved", "B"), _REASON)
    phase: Phase
    reason: str = ""


_NONCE = (u64("nonce"),)


@dataclass(frozen=True)
class Ping(Event):
    """Source -> destination before an offer: answer with a Pong of the same nonce."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Ping"]
    FIELDS = _NONCE
    nonce: int


@dataclass(frozen=True)
class Pong(Event):
    """Destination -> source: the answer to a Ping, its nonce echoed."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Pong"]
    FIELDS = _NONCE
    nonce: int


# --- bandwidth probe (livemig plan) -------------------------------------------------

@dataclass(frozen=True)
class ProbeData(Event):
    """Source -> destination, control channel in READY (before any offer):
    ``data`` is filler the destination counts and drops. ``seq`` numbers the
    frames of one probe from 0."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeData"]
    FIELDS = (u32("seq"), Reserved("reserved", "I"), Tail("data"))
    seq: int
    data: object = b""


@dataclass(frozen=True)
class ProbeEnd(Event):
    """Source -> destination: the probe sent ``frames`` ProbeData frames holding
    ``bytes`` filler bytes in all; answer with ProbeResult."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeEnd"]
    FIELDS = (u32("frames"), Reserved("reserved", "I"), u64("bytes", limit=(0, MAX_PROBE_BYTES)))
    frames: int
    bytes: int


@dataclass(frozen=True)
class ProbeResult(Event):
    """Destination -> source: of the probe, ``bytes`` filler bytes in ``frames``
    frames arrived after the first frame, over ``duration_ns`` measured by the
    destination's clock from the first frame's arrival to ProbeEnd's. The
    first frame only starts the clock, so connection set-up and TCP slow start
    before it do not count."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["ProbeResult"]
    FIELDS = (u32("frames"), Reserved("reserved", "I"), u64("bytes"), u64("duration_ns"))
    frames: int
    bytes: int
    duration_ns: int


# --- the stream probe (capability "stream-probe", wire version 2) -------------

@dataclass(frozen=True)
class StreamProbe(Event):
    """Source -> destination, control channel in READY: measure the link on
    ``nstreams`` native bulk streams, sending rounds of pages out of a window
    of ``window_bytes`` for about ``duration_ms``. Answered by
    StreamProbeGrant; the destination caps all three."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamProbe"]
    FIELDS = (u32("nstreams"), u32("duration_ms"), u64("window_bytes"))
    nstreams: int
    duration_ms: int
    window_bytes: int


@dataclass(frozen=True)
class StreamProbeGrant(Event):
    """Destination -> source: what it grants of a StreamProbe, at most what was
    asked; ``nstreams`` 0 refuses (``reason`` says why). Granted, the source
    opens ``nstreams`` bulk streams and sends rounds of pages below
    ``window_bytes`` for at most ``duration_ms``; past that (plus a grace for
    opening the streams) the destination closes the streams."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamProbeGrant"]
    FIELDS = (u32("nstreams"), u32("duration_ms"), u64("window_bytes"), _REASON)
    nstreams: int
    duration_ms: int
    window_bytes: int
    reason: str = ""


@dataclass(frozen=True)
class StreamProbeEnd(Event):
    """Source -> destination: the stream probe is over; its streams had
    ``pages`` pages in ``bytes`` page-batch bytes acknowledged. Answered by
    StreamProbeResult."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamProbeEnd"]
    FIELDS = (u64("pages"), u64("bytes"))
    pages: int
    bytes: int


@dataclass(frozen=True)
class StreamProbeResult(Event):
    """Destination -> source: its streams checked and dropped ``pages`` pages in
    ``bytes`` page-batch bytes over ``duration_ns`` (its clock, from the first
    stream's arrival to StreamProbeEnd's), using ``cpu_ns`` of its threads' CPU."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["StreamProbeResult"]
    FIELDS = (u64("pages"), u64("bytes"), u64("duration_ns"), u64("cpu_ns"))
    pages: int
    bytes: int
    duration_ns: int
    cpu_ns: int


# --- handover outcome (a source reconnecting after a break past Commit) ----------------

@dataclass(frozen=True)
class Outcome(Event):
    """Destination -> source, the answer on a control channel opened with
    Hello(resume=True) for a session that has ended here: what became of it.
    ``digest`` is the digest of the memory the destination verified (pre-copy)
    or of every page as it landed (post-copy), so that the source can check
    what it releases its copy for; zero for NOT_COMMITTED."""

    WIRE_ID: ClassVar[int] = MESSAGE_IDS["Outcome"]
    FIELDS = (u8("code", enum=OutcomeCode), Reserved("reserved8", "B"),
              Reserved("reserved16", "H"), _DIGEST, _REASON)
    code: OutcomeCode
    digest: bytes = bytes(DIGEST_BYTES)
    reason: str = ""


ALL_EVENTS = (Hello, Welcome, Refuse, MigrationOffer, Accept, RoundStart, PageBatch,
              RoundEnd, RoundAck, StreamEnd, StreamAck, PageInvalidate, Switchover, Verified, Commit, Resumed,
              VerifyFailed, PageRequest, PresentReport, ResumeReport, PostcopyComplete, Complete, Abort, Ping,
              Pong, ProbeData, ProbeEnd, ProbeResult, Outcome,
              StreamProbe, StreamProbeGrant, StreamProbeEnd, StreamProbeResult)
WIRE_IDS: dict[int, type[Event]] = {cls.WIRE_ID: cls for cls in ALL_EVENTS}
assert len(WIRE_IDS) == len(ALL_EVENTS) and 0 not in WIRE_IDS
# The native urgent path reads and writes these prefixes from spec.py.
assert PageBatch.LAYOUT.fixed_format == PAGE_BATCH_FORMAT
assert PageRequest.LAYOUT.fixed_format == PAGE_REQUEST_FORMAT
# ... and so do the native bulk streams.
assert StreamEnd.LAYOUT.fixed_format == STREAM_END_FORMAT
assert StreamAck.LAYOUT.fixed_format == STREAM_ACK_FORMAT


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

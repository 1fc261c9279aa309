"""What every protocol message is built on: the Event base class, the payload
reader that trusts nothing, and the shared field codecs (length-prefixed
text, capability sets, bitmaps). The messages themselves are in events.py."""
from __future__ import annotations

import abc
import re
import struct
from typing import ClassVar

MAX_CAPABILITIES = 64
_CAP_RE = re.compile(rb"^[a-z0-9][a-z0-9_.\-]{0,31}$")


class PayloadError(Exception):
    """A payload does not match its message layout."""


class _Reader:
    """Bounds-checked little-endian reads over a payload memoryview."""

    __slots__ = ("view", "pos")

    def __init__(self, payload):
        self.view = payload if isinstance(payload, memoryview) else memoryview(payload)
        self.pos = 0

    def unpack(self, st: struct.Struct) -> tuple:
        if self.pos + st.size > len(self.view):
            raise PayloadError(f"payload truncated: need {st.size} bytes at offset {self.pos}")
        values = st.unpack_from(self.view, self.pos)
        self.pos += st.size
        return values

    def take(self, nbytes: int) -> memoryview:
        if nbytes < 0 or self.pos + nbytes > len(self.view):
            raise PayloadError(f"payload truncated: need {nbytes} bytes at offset {self.pos}")
        out = self.view[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def rest(self) -> memoryview:
        return self.take(len(self.view) - self.pos)

    def text(self, st: struct.Struct, limit: int) -> str:
        (nbytes,) = self.unpack(st)
        if nbytes > limit:
            raise PayloadError(f"text of {nbytes} bytes exceeds {limit}")
        try:
            return str(self.take(nbytes), "utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"text is not UTF-8: {exc}") from None

    def end(self) -> None:
        if self.pos != len(self.view):
            raise PayloadError(f"{len(self.view) - self.pos} trailing bytes after the payload")


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _text(value: str, st: struct.Struct, limit: int) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"text of {len(raw)} bytes exceeds {limit}")
    return st.pack(len(raw)) + raw


def _encode_caps(caps: frozenset) -> bytes:
    if len(caps) > MAX_CAPABILITIES:
        raise ValueError(f"at most {MAX_CAPABILITIES} capabilities")
    out = [_U16.pack(len(caps))]
    for name in sorted(caps):
        raw = name.encode("ascii")
        if not _CAP_RE.match(raw):
            raise ValueError(f"capability name {name!r} is not [a-z0-9][a-z0-9_.-]{{0,31}}")
        out.append(bytes([len(raw)]) + raw)
    return b"".join(out)


def _decode_caps(r: _Reader) -> frozenset:
    (count,) = r.unpack(_U16)
    if count > MAX_CAPABILITIES:
        raise PayloadError(f"{count} capabilities exceed the limit of {MAX_CAPABILITIES}")
    names = []
    for _ in range(count):
        (nbytes,) = r.unpack(struct.Struct("<B"))
        raw = bytes(r.take(nbytes))
        if not _CAP_RE.match(raw):
            raise PayloadError(f"bad capability name {raw!r}")
        names.append(raw.decode("ascii"))
    if len(set(names)) != len(names):
        raise PayloadError("duplicate capability names")
    return frozenset(names)


def _check_bitmap(npages: int, bitmap: bytes) -> None:
    if len(bitmap) != (npages + 7) // 8:
        raise PayloadError(f"bitmap of {len(bitmap)} bytes does not cover {npages} pages")
    spare = npages % 8
    if spare and bitmap[-1] >> spare:
        raise PayloadError("bitmap padding bits beyond npages are set")


def _as_bytes_view(data) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.c_contiguous:
        raise ValueError("page data must be C-contiguous")
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


def _no_flags(cls, flags: int) -> None:
    if flags:
        raise PayloadError(f"{cls.__name__} defines no flags, got {flags:#x}")


class Event(abc.ABC):
    """Base of every protocol message."""

    WIRE_ID: ClassVar[int] = 0
    FLAGS: ClassVar[int] = 0   # flag bits this message defines

    @abc.abstractmethod
    def encode(self) -> tuple[int, list]:
        """(frame flags, payload buffers)."""

    @classmethod
    @abc.abstractmethod
    def decode(cls, flags: int, payload: memoryview) -> "Event":
        """The message from a frame's flags and payload; PayloadError if malformed."""

    @property
    def variant(self) -> str | None:
        """Sub-kind the state machine distinguishes (None for most)."""
        return None


class _Empty(Event):
    """Messages without a payload."""

    def encode(self):
        return 0, []

    @classmethod
    def decode(cls, flags, payload):
        _no_flags(cls, flags)
        _Reader(payload).end()
        return cls()

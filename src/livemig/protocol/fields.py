"""Field wire types, and the layout that encodes and decodes a payload from them.

Theory of operation
-------------------
A message describes its payload once, as a tuple of fields in wire order
(events.py). Each field is a wire type (u8..u64, fixed bytes, text, JSON,
capability set, bitmap, u64 array, length-prefixed blob, tail bytes) with its
checks; :class:`Layout` derives both the encoder and the decoder from that
tuple, so the two cannot disagree and each check is written once.

Consecutive fixed-size fields (integers, fixed bytes) are packed and unpacked
by one ``struct.Struct``: a PageBatch or PageRequest costs one struct call, as
a hand-written codec would. Variable-size fields follow in order.

Two kinds of fields are not attributes of the message: *reserved* fields
(sent as 0, refused unless 0) and *count* fields (the length of a later array,
computed on encode, checked against the array's limits on decode).

Decoding trusts nothing: lengths against what is present, reserved fields,
enum values, caps, UTF-8, capability names, bitmap padding, array order.
Every failure is a :class:`PayloadError` naming the message and the field
(``RoundEnd.reserved is 7, must be 0``); a value that cannot be encoded is a
ValueError naming them too. Tail bytes and arrays are never copied on encode:
the caller's buffers go out as separate parts.
"""
from __future__ import annotations

import json
import re
import struct

import numpy

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
# fullmatch: with match and "$" a name ending in a newline would pass
_CAP_NAME = re.compile(rb"[a-z0-9][a-z0-9_.\-]{0,31}")


class PayloadError(Exception):
    """A payload does not match its message layout."""


class Reader:
    """Bounds-checked reads over a payload memoryview."""

    __slots__ = ("view", "pos", "message")

    def __init__(self, payload, message: str):
        self.view = payload if isinstance(payload, memoryview) else memoryview(payload)
        self.pos = 0
        self.message = message

    def unpack(self, st: struct.Struct, where: str) -> tuple:
        self._need(st.size, where)
        values = st.unpack_from(self.view, self.pos)
        self.pos += st.size
        return values

    def take(self, nbytes: int, where: str) -> memoryview:
        self._need(nbytes, where)
        out = self.view[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def rest(self) -> memoryview:
        out = self.view[self.pos:]
        self.pos = len(self.view)
        return out

    def end(self) -> None:
        if self.pos != len(self.view):
            raise PayloadError(f"{self.message}: {len(self.view) - self.pos} trailing bytes "
                               "after the payload")

    def _need(self, nbytes: int, where: str) -> None:
        if self.pos + nbytes > len(self.view):
            raise PayloadError(f"{where}: payload truncated: need {nbytes} bytes at offset "
                               f"{self.pos}, {len(self.view) - self.pos} left")


def as_bytes_view(data) -> memoryview:
    """A flat byte view of ``data`` without copying it."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.c_contiguous:
        raise ValueError("page data must be C-contiguous")
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


def as_bytes_views(data) -> list:
    """Flat byte views of one buffer or of a list/tuple of buffers."""
    if isinstance(data, (list, tuple)):
        return [as_bytes_view(part) for part in data]
    return [as_bytes_view(data)]


# --- fields --------------------------------------------------------------------------

class Field:
    """One field of a message layout."""

    fmt: str | None = None  # fixed-size fields: a struct code
    attr = True           # an attribute of the message
    reads_rest = False    # consumes the payload to its end

    def __init__(self, name: str):
        self.name = name


class FixedField(Field):
    """A fixed-size field: ``fmt`` (a struct code) plus ``to_wire``/``from_wire``.
    Fixed-size fields whose value goes to struct or comes from it as is skip
    those: a PageBatch prefix is then one pack or unpack call."""

    converts = False      # to_wire does something
    checks = False        # from_wire does something

    def to_wire(self, value, values: dict, where: str):
        return value

    def from_wire(self, raw, values: dict, where: str):
        return raw


class VariableField(Field):
    """A variable-size field; each kind says how it is written (``emit``: a
    list of buffers) and read (``read`` from a :class:`Reader`)."""


class Int(FixedField):
    """An unsigned little-endian integer with optional checks: ``enum`` (an
    IntEnum; ``unknown`` is the member an undefined value decodes to, else it
    is an error), ``boolean`` (0 or 1), ``limit`` (inclusive range) and
    ``check`` (value -> problem text or None)."""

    def __init__(self, name: str, fmt: str, *, enum=None, unknown=None, boolean=False,
                 limit: tuple[int, int] | None = None, check=None):
        super().__init__(name)
        self.fmt, self.enum, self.unknown, self.boolean = fmt, enum, unknown, boolean
        self.limit, self.check = limit, check
        if boolean or any(x is not None for x in (enum, limit, check)):
            self.checks = True

    def from_wire(self, raw, values, where):
        if self.boolean:
            if raw > 1:
                raise PayloadError(f"{where} is {raw}, must be 0 or 1")
            return bool(raw)
        if self.limit is not None and not self.limit[0] <= raw <= self.limit[1]:
            raise PayloadError(f"{where} {raw} is not in {self.limit[0]}..{self.limit[1]}")
        if self.check is not None and (problem := self.check(raw)):
            raise PayloadError(f"{where} {raw} {problem}")
        if self.enum is not None:
            try:
                return self.enum(raw)
            except ValueError:
                if self.unknown is not None:
                    return self.unknown
                raise PayloadError(f"{where}: unknown {self.enum.__name__} {raw}") from None
        return raw


class Reserved(Int):
    """Sent as 0; anything else is refused."""

    attr = False
    converts = True
    checks = True

    def to_wire(self, value, values, where):
        return 0

    def from_wire(self, raw, values, where):
        if raw:
            raise PayloadError(f"{where} is {raw}, must be 0")
        return 0


class Count(Int):
    """The number of entries of the array field ``of``; its limits are the array's."""

    attr = False
    converts = True

    def __init__(self, name: str, fmt: str, of: str):
        super().__init__(name, fmt)
        self.of = of

    def to_wire(self, value, values, where):
        return len(values[self.of])


class FixedBytes(FixedField):
    converts = True

    def __init__(self, name: str, nbytes: int):
        super().__init__(name)
        self.nbytes, self.fmt = nbytes, f"{nbytes}s"

    def to_wire(self, value, values, where):
        raw = bytes(value)
        if len(raw) != self.nbytes:   # struct would pad or cut silently
            raise ValueError(f"{where} must be {self.nbytes} bytes, got {len(raw)}")
        return raw


def u8(name: str, **checks) -> Int:
    return Int(name, "B", **checks)


def u16(name: str, **checks) -> Int:
    return Int(name, "H", **checks)


def u32(name: str, **checks) -> Int:
    return Int(name, "I", **checks)


def u64(name: str, **checks) -> Int:
    return Int(name, "Q", **checks)


class Text(VariableField):
    """u16 byte count, then UTF-8."""

    def __init__(self, name: str, max_bytes: int):
        super().__init__(name)
        self.max_bytes = max_bytes

    def emit(self, value, values, where):
        raw = value.encode("utf-8")
        if len(raw) > self.max_bytes:
            raise ValueError(f"{where}: text of {len(raw)} bytes exceeds {self.max_bytes}")
        return [_U16.pack(len(raw)) + raw]

    def read(self, reader, values, where):
        (nbytes,) = reader.unpack(_U16, where)
        if nbytes > self.max_bytes:
            raise PayloadError(f"{where}: text of {nbytes} bytes exceeds {self.max_bytes}")
        try:
            return str(reader.take(nbytes, where), "utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"{where} is not UTF-8: {exc}") from None


class Caps(VariableField):
    """u16 count, then per name a u8 length and ASCII [a-z0-9][a-z0-9_.-]{0,31};
    no duplicates. A frozenset of str."""

    def __init__(self, name: str, max_count: int):
        super().__init__(name)
        self.max_count = max_count

    def emit(self, value, values, where):
        names = frozenset(value)
        if len(names) > self.max_count:
            raise ValueError(f"{where}: at most {self.max_count} capabilities")
        out = [_U16.pack(len(names))]
        for name in sorted(names):
            raw = name.encode("ascii")
            if not _CAP_NAME.fullmatch(raw):
                raise ValueError(f"{where}: capability name {name!r} is not "
                                 "[a-z0-9][a-z0-9_.-]{0,31}")
            out.append(_U8.pack(len(raw)) + raw)
        return [b"".join(out)]

    def read(self, reader, values, where):
        (count,) = reader.unpack(_U16, where)
        if count > self.max_count:
            raise PayloadError(f"{where}: {count} capabilities exceed the limit of "
                               f"{self.max_count}")
        names = []
        for _ in range(count):
            (nbytes,) = reader.unpack(_U8, where)
            raw = bytes(reader.take(nbytes, where))
            if not _CAP_NAME.fullmatch(raw):
                raise PayloadError(f"{where}: bad capability name {raw!r}")
            names.append(raw.decode("ascii"))
        if len(set(names)) != len(names):
            raise PayloadError(f"{where}: duplicate capability names")
        return frozenset(names)


class Json(VariableField):
    """u32 byte count, then a JSON object (sorted keys, compact)."""

    def __init__(self, name: str, max_bytes: int):
        super().__init__(name)
        self.max_bytes = max_bytes

    def emit(self, value, values, where):
        try:
            raw = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        except RecursionError:
            raise ValueError(f"{where} is nested too deeply") from None
        if len(raw) > self.max_bytes:
            raise ValueError(f"{where}: {len(raw)} bytes of JSON exceed {self.max_bytes}")
        return [_U32.pack(len(raw)), raw]

    def read(self, reader, values, where):
        (nbytes,) = reader.unpack(_U32, where)
        if nbytes > self.max_bytes:
            raise PayloadError(f"{where}: {nbytes} bytes of JSON exceed {self.max_bytes}")
        raw = reader.take(nbytes, where)
        try:
            value = json.loads(str(raw, "utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PayloadError(f"{where} is not JSON: {exc}") from None
        except RecursionError:
            # The C scanner recurses per nesting level: "[" * 200000 fits in the
            # byte cap but not in the interpreter's recursion limit.
            raise PayloadError(f"{where} is nested too deeply") from None
        if not isinstance(value, dict):
            raise PayloadError(f"{where} must be a JSON object")
        return value


class Blob(VariableField):
    """u32 byte count, then that many bytes (sent without a copy)."""

    def emit(self, value, values, where):
        view = as_bytes_view(value)
        return [_U32.pack(view.nbytes), view]

    def read(self, reader, values, where):
        (nbytes,) = reader.unpack(_U32, where)
        return bytes(reader.take(nbytes, where))


class Bitmap(VariableField):
    """The rest of the payload: one bit per page of the u64 field ``npages``,
    bit i = page i, least significant bit first, padding bits 0."""

    reads_rest = True

    def __init__(self, name: str, npages: str):
        super().__init__(name)
        self.npages = npages

    def emit(self, value, values, where):
        raw = bytes(value)
        if problem := self._problem(values[self.npages], raw):
            raise ValueError(f"{where}: {problem}")
        return [raw]

    def read(self, reader, values, where):
        raw = bytes(reader.rest())
        if problem := self._problem(values[self.npages], raw):
            raise PayloadError(f"{where}: {problem}")
        return raw

    @staticmethod
    def _problem(npages: int, raw: bytes) -> str | None:
        if len(raw) != (npages + 7) // 8:
            return f"bitmap of {len(raw)} bytes does not cover {npages} pages"
        spare = npages % 8
        if spare and raw[-1] >> spare:
            return "bitmap padding bits beyond npages are set"
        return None


class U64Array(VariableField):
    """``count`` (an earlier :class:`Count` field) u64 entries within
    ``min_count``..``max_count``; ``ascending``: strictly ascending.
    A numpy array, or a tuple of int with ``as_tuple``."""

    def __init__(self, name: str, count: str, *, max_count: int, min_count: int = 0,
                 ascending: bool = False, as_tuple: bool = False):
        super().__init__(name)
        self.count, self.min_count, self.max_count = count, min_count, max_count
        self.ascending, self.as_tuple = ascending, as_tuple

    def emit(self, value, values, where):
        array = numpy.ascontiguousarray(value, dtype="<u8")
        if array.ndim != 1 or not self.min_count <= array.size <= self.max_count:
            raise ValueError(f"{where}: {self.min_count}..{self.max_count} entries, "
                             f"got shape {array.shape}")
        if self.ascending and not self._ascending(array):
            raise ValueError(f"{where} must be strictly ascending")
        return [memoryview(array).cast("B")]

    def read(self, reader, values, where):
        count = values[self.count]
        if not self.min_count <= count <= self.max_count:
            raise PayloadError(f"{where}: count {count} is not in "
                               f"{self.min_count}..{self.max_count}")
        array = numpy.frombuffer(reader.take(count * 8, where), dtype="<u8")
        if self.ascending and not self._ascending(array):
            raise PayloadError(f"{where} are not strictly ascending")
        return tuple(array.tolist()) if self.as_tuple else array

    @staticmethod
    def _ascending(array) -> bool:
        return array.size < 2 or bool(numpy.all(array[1:] > array[:-1]))


class Tail(VariableField):
    """Opaque bytes to the end of the payload, never copied: one buffer or a
    list/tuple of buffers sent back to back; decoded, a memoryview slice."""

    reads_rest = True

    def emit(self, value, values, where):
        return as_bytes_views(value)

    def read(self, reader, values, where):
        return reader.rest()


# --- layouts -------------------------------------------------------------------------

class _Fixed:
    """A run of fixed-size fields packed by one struct."""

    def __init__(self):
        self.names: list = []
        self.fmts: list = []
        self.wheres: list = []
        self.converts: list = []   # (position, field, where) to pass through to_wire
        self.checks: list = []     # (field, where) to pass through from_wire
        self.struct = struct.Struct("<")

    def add(self, field: Field, where: str) -> None:
        if field.converts:
            self.converts.append((len(self.names), field, where))
        if field.checks:
            self.checks.append((field, where))
        self.names.append(field.name)
        self.fmts.append(field.fmt)
        self.wheres.append(where)
        self.struct = struct.Struct(self.struct.format + field.fmt)

    def where_short(self, left: int) -> str:
        """The field the payload ends in, when only ``left`` bytes remain."""
        end = 0
        for fmt, where in zip(self.fmts, self.wheres):
            end += struct.calcsize("<" + fmt)
            if end > left:
                return where
        return self.wheres[-1]


class Layout:
    """A message's payload as an ordered tuple of fields."""

    def __init__(self, message: str, fields: tuple):
        names = [f.name for f in fields]
        assert len(set(names)) == len(names), f"{message}: duplicate field names"
        assert all(not f.reads_rest for f in fields[:-1]), f"{message}: tail not last"
        self.attrs = tuple(f.name for f in fields if f.attr)
        self.fields = tuple(fields)
        self._steps: list = []
        for f in fields:
            where = f"{message}.{f.name}"
            if f.fmt is None:
                self._steps.append((f, where))
                continue
            if not (self._steps and isinstance(self._steps[-1], _Fixed)):
                self._steps.append(_Fixed())
            self._steps[-1].add(f, where)

    @property
    def fixed_format(self) -> str:
        """The struct format of the fixed-size fields that open the payload."""
        first = self._steps[0] if self._steps else None
        return first.struct.format if isinstance(first, _Fixed) else "<"

    def encode(self, values: dict) -> list:
        """Payload parts for the attribute ``values``: small parts joined,
        arrays and tail buffers passed through."""
        parts: list = []
        small: list = []
        for step in self._steps:
            if isinstance(step, _Fixed):
                small.append(self._pack(step, values))
                continue
            field, where = step
            for part in field.emit(values[field.name], values, where):
                if isinstance(part, bytes):
                    small.append(part)
                else:
                    if small:
                        parts.append(b"".join(small))
                        small = []
                    parts.append(part)
        if small:
            parts.append(b"".join(small))
        return parts

    def decode(self, reader: Reader) -> dict:
        """Attribute values read from ``reader`` (the caller checks the end)."""
        values: dict = {}
        for step in self._steps:
            if isinstance(step, _Fixed):
                left = len(reader.view) - reader.pos
                where = step.wheres[0] if left >= step.struct.size else step.where_short(left)
                values.update(zip(step.names, reader.unpack(step.struct, where)))
                for field, where in step.checks:
                    values[field.name] = field.from_wire(values[field.name], values, where)
            else:
                field, where = step
                values[field.name] = field.read(reader, values, where)
        return {name: values[name] for name in self.attrs}

    def _pack(self, step: _Fixed, values: dict) -> bytes:
        wire = [values.get(name) for name in step.names]
        for i, field, where in step.converts:
            wire[i] = field.to_wire(wire[i], values, where)
        try:
            return step.struct.pack(*wire)
        except struct.error:
            # Name the field that does not fit (only on failure: the common
            # path stays one pack call).
            fields = {f.name: f for f in self.fields}
            for name, where, value in zip(step.names, step.wheres, wire):
                try:
                    struct.pack("<" + fields[name].fmt, value)
                except struct.error as exc:
                    raise ValueError(f"{where} = {value!r} does not fit: {exc}") from None
            raise

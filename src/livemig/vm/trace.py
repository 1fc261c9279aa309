"""Dirty-page traces: the file format, its strict reader, and the guest image
that replays one.

A trace is what a running VM wrote, interval by interval: for each collection
interval the sorted set of page indices the dirty tracker reported. It is
recorded by ``livemig dirtyrate NAME --record FILE``
(:func:`livemig.analysis.dirtyrate.record_trace`) and replayed by the
``trace`` workload (``--workload trace:FILE``).

File format (all little-endian)::

    header  8s magic "LMTRACE1" | u16 version (1) | u16 reserved (0) |
            u32 page_size | u64 memory_bytes | u32 interval_us |
            u32 nintervals | u64 body_length | u64 xxh64(body)
    body    nintervals x ( varint count | count x varint gap )

A varint is LEB128 (7 bits per byte, high bit set on every byte but the
last), at most ``MAX_VARINT_BYTES`` long. The pages of an interval are sorted
and distinct; each is stored as its gap from the previous one minus one (the
first as its index), so a dense interval costs one byte per dirty page and a
sparse one ``ceil(log128(npages / count))`` or so. Version policy as for the
VM state blob: a reader accepts exactly the versions it knows. The checksum
covers the body, so a truncated or altered file is refused before a field is
interpreted; the checks after it (counts, order, bounds, no trailing bytes)
guard against a well-formed file that describes an impossible trace. A file
is read whole only after its size is checked against ``MAX_TRACE_BYTES``, and
every number decoded from it took at least one byte of it and is held in four
(page indices are below 2**28: ``MAX_MEMORY_BYTES`` of pages), so a hostile
trace costs at most about nine times its size in memory.

Replay (``TraceImage``): the guest itself writes the pages, so a migration
sees a real guest. Each vCPU's data partition is split into write targets
and, at its end, a read-only *trace area* holding that vCPU's share of the
trace as u64 words: per interval ``count, page...`` and finally ``END``. A
recorded page ``p`` maps to target ``p mod (targets x nvcpus)`` of the VM,
which is exact (one recorded page, one replayed page) when the VM has at
least the recorded memory plus the trace areas. Every interval lasts the
same ``slots`` TICKs on every vCPU — one per page written, the rest padding
— so at a pace of ``slots / interval_s`` TICKs per second the pages are
written at the recorded times, and the trace loops. Nothing depends on wall
time, so replay is as deterministic as every other workload.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import ConfigError
from ..units import PAGE_SIZE

MAGIC = b"LMTRACE1"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQIIQQ")
HEADER_BYTES = _HEADER.size
MAX_VARINT_BYTES = 4                 # 28 bits: every page index of MAX_MEMORY_BYTES
MAX_TRACE_BYTES = 64 << 20           # a larger body is refused before it is read
MAX_INTERVALS = 1_000_000
MIN_INTERVAL_US = 1_000
MAX_INTERVAL_US = 60_000_000
MAX_MEMORY_BYTES = 1 << 40
END_WORD = (1 << 64) - 1             # ends a vCPU's trace area: back to the start
WORD_BYTES = 8
_DECODE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Trace:
    memory_bytes: int
    interval_s: float
    intervals: tuple[np.ndarray, ...]
    """Per interval, the sorted distinct page indices written."""

    @property
    def npages(self) -> int:
        return self.memory_bytes // PAGE_SIZE

    @property
    def dirty_pages(self) -> int:
        return sum(len(p) for p in self.intervals)

    @property
    def duration_s(self) -> float:
        return len(self.intervals) * self.interval_s

    @property
    def dirty_rate_bps(self) -> float:
        """Recorded dirty rate: pages per interval, summed, over the duration."""
        return self.dirty_pages * PAGE_SIZE / self.duration_s

    def describe(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "interval_s": self.interval_s,
                "intervals": len(self.intervals), "duration_s": self.duration_s,
                "dirty_pages": self.dirty_pages, "dirty_rate_bps": self.dirty_rate_bps}


# -- varints -----------------------------------------------------------------
def _encode_varints(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64)
    if len(v) and int(v.max()) >= 1 << (7 * MAX_VARINT_BYTES):
        raise ConfigError("a trace value does not fit in a varint")
    nbytes = np.ones(len(v), dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * k))
    ends = np.cumsum(nbytes)
    out = np.zeros(int(ends[-1]) if len(v) else 0, dtype=np.uint8)
    starts = ends - nbytes
    for k in range(MAX_VARINT_BYTES):
        has = nbytes > k
        chunk = (v[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[has] > k + 1).astype(np.uint8) << 7
        out[starts[has] + k] = chunk.astype(np.uint8) | more
    return out.tobytes()


def _decode_varints(body: bytes, where: str) -> np.ndarray:
    """The body's numbers as uint32, decoded a chunk at a time so that the
    temporaries stay small whatever the file's size."""
    b = np.frombuffer(body, dtype=np.uint8)
    if len(b) and b[-1] >= 0x80:
        raise ConfigError(f"{where}: the body ends inside a number (truncated)")
    out = np.empty(int(np.count_nonzero(b < 0x80)), dtype=np.uint32)
    done = n = 0
    while done < len(b):
        chunk = b[done:done + _DECODE_CHUNK_BYTES]
        ends = np.flatnonzero(chunk < 0x80)
        if len(ends) == 0:
            raise ConfigError(f"{where}: a number longer than {MAX_VARINT_BYTES} bytes")
        chunk = chunk[:int(ends[-1]) + 1]
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts + 1
        if int(lengths.max()) > MAX_VARINT_BYTES:
            raise ConfigError(f"{where}: a number longer than {MAX_VARINT_BYTES} bytes")
        which = np.repeat(np.arange(len(ends)), lengths)
        shift = (7 * (np.arange(len(chunk)) - starts[which])).astype(np.uint64)
        parts = (chunk & 0x7F).astype(np.uint64) << shift
        out[n:n + len(ends)] = np.add.reduceat(parts, starts)
        n += len(ends)
        done += len(chunk)
    return out


# -- file --------------------------------------------------------------------
def encode(trace: Trace) -> bytes:
    """The file bytes of ``trace`` (see the module docstring)."""
    values = []
    for pages in trace.intervals:
        p = np.asarray(pages, dtype=np.int64)
        gaps = np.diff(p, prepend=-1) - 1
        values.append(np.array([len(p)], dtype=np.int64))
        values.append(gaps)
    body = _encode_varints(np.concatenate(values)) if values else b""
    interval_us = int(round(trace.interval_s * 1e6))
    return _HEADER.pack(MAGIC, VERSION, 0, PAGE_SIZE, trace.memory_bytes, interval_us,
                        len(trace.intervals), len(body), xxhash.xxh64_intdigest(body)) + body


def write(path: str, trace: Trace) -> int:
    """Write ``trace`` to ``path`` (atomically: a temporary file renamed); bytes written."""
    data = encode(trace)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def decode(data: bytes, *, where: str = "trace") -> Trace:
    """Parse and validate trace bytes; ConfigError naming ``where`` on anything wrong."""
    if len(data) < HEADER_BYTES:
        raise ConfigError(f"{where}: {len(data)} bytes is shorter than the {HEADER_BYTES}-byte "
                          "header (truncated, or not a trace)")
    (magic, version, reserved, page_size, memory_bytes, interval_us, nintervals, body_len,
     checksum) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ConfigError(f"{where}: not a livemig dirty-page trace (bad magic)")
    if version != VERSION:
        raise ConfigError(f"{where}: trace version {version} is not supported (this livemig "
                          f"reads version {VERSION})")
    if reserved:
        raise ConfigError(f"{where}: non-zero reserved header bits")
    if page_size != PAGE_SIZE:
        raise ConfigError(f"{where}: recorded with {page_size}-byte pages; this host uses "
                          f"{PAGE_SIZE}")
    if not 0 < memory_bytes <= MAX_MEMORY_BYTES or memory_bytes % PAGE_SIZE:
        raise ConfigError(f"{where}: impossible memory size {memory_bytes}")
    if not MIN_INTERVAL_US <= interval_us <= MAX_INTERVAL_US:
        raise ConfigError(f"{where}: interval {interval_us} µs is outside "
                          f"{MIN_INTERVAL_US}..{MAX_INTERVAL_US}")
    if not 1 <= nintervals <= MAX_INTERVALS:
        raise ConfigError(f"{where}: {nintervals} intervals (1..{MAX_INTERVALS} allowed)")
    body = data[HEADER_BYTES:]
    if len(body) != body_len:
        raise ConfigError(f"{where}: body is {len(body)} bytes, the header says {body_len} "
                          "(truncated or extended)")
    if xxhash.xxh64_intdigest(body) != checksum:
        raise ConfigError(f"{where}: checksum mismatch (corrupted)")
    values = _decode_varints(body, where)
    npages = memory_bytes // PAGE_SIZE
    intervals = []
    off = 0
    for i in range(nintervals):
        if off >= len(values):
            raise ConfigError(f"{where}: interval {i} of {nintervals} is missing")
        count = int(values[off])
        off += 1
        if count > npages or off + count > len(values):
            raise ConfigError(f"{where}: interval {i} claims {count} pages, more than "
                              "the memory or the file holds")
        pages = np.cumsum(values[off:off + count].astype(np.int64) + 1) - 1
        off += count
        if count and int(pages[-1]) >= npages:
            raise ConfigError(f"{where}: interval {i} names page {int(pages[-1])}, past the "
                              f"recorded memory's {npages} pages")
        intervals.append(pages.astype(np.uint32))
    if off != len(values):
        raise ConfigError(f"{where}: {len(values) - off} numbers after the last interval")
    return Trace(memory_bytes, interval_us / 1e6, tuple(intervals))


def load(path: str) -> Trace:
    """Read and validate the trace file at ``path`` (size checked before reading)."""
    where = f"trace file {path}"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > HEADER_BYTES + MAX_TRACE_BYTES:
                raise ConfigError(f"{where}: {size} bytes is more than the "
                                  f"{MAX_TRACE_BYTES >> 20} MiB a trace may hold")
            data = f.read(HEADER_BYTES + MAX_TRACE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    return decode(data, where=where)


# -- replay image ------------------------------------------------------------
@dataclass(frozen=True)
class TraceImage:
    """A trace laid out for one VM: what each vCPU's trace area holds."""

    trace_npages: int
    """Pages at the end of every vCPU's data partition holding its trace words."""
    slots: int
    """TICKs per interval on every vCPU (the busiest vCPU-interval's page count)."""
    pages_per_tick: float
    """Pages written per TICK, over the whole trace and every vCPU."""
    interval_s: float
    streams: tuple[np.ndarray, ...]
    """Per vCPU, the uint64 words of its trace area."""

    @property
    def params(self) -> dict:
        """The ``trace`` workload's parameters (they travel in the VM state)."""
        return {"trace_npages": self.trace_npages, "slots": self.slots,
                "pages_per_tick": self.pages_per_tick}

    def dirty_rate_bps(self, nvcpus: int) -> float:
        """The VM-wide rate that paces every vCPU at ``slots / interval_s`` TICKs/s."""
        return self.pages_per_tick * PAGE_SIZE * nvcpus * self.slots / self.interval_s


def trace_area_npages(trace: Trace) -> int:
    """Pages a vCPU's trace area needs however the pages fall among the vCPUs."""
    words = len(trace.intervals) + trace.dirty_pages + 1
    return -(-words * WORD_BYTES // PAGE_SIZE)


def image_for(trace: Trace, *, data_npages: int, nvcpus: int, where: str = "trace") -> TraceImage:
    """Lay ``trace`` out for a VM whose vCPUs each own ``data_npages`` data pages."""
    area = trace_area_npages(trace)
    targets = data_npages - area
    if targets < 1:
        need = (area + 1) * nvcpus * PAGE_SIZE
        raise ConfigError(f"{where}: its trace areas alone need {need >> 20} MiB + code pages "
                          f"for {nvcpus} vCPU(s); give the VM at least "
                          f"{(trace.memory_bytes + need) >> 20} MiB to replay it exactly")
    span = targets * nvcpus
    per_vcpu: list[list[np.ndarray]] = [[] for _ in range(nvcpus)]
    slots, written = 1, 0
    for pages in trace.intervals:
        r = np.unique(pages % span)
        owner = r // targets
        local = r % targets
        counts = np.bincount(owner, minlength=nvcpus)
        slots = max(slots, int(counts.max()) if len(counts) else 0)
        written += len(r)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for v in range(nvcpus):
            per_vcpu[v].append(np.array([counts[v]], dtype=np.uint64))
            per_vcpu[v].append(local[bounds[v]:bounds[v + 1]].astype(np.uint64))
    end = np.array([END_WORD], dtype=np.uint64)
    streams = tuple(np.concatenate(parts + [end]) for parts in per_vcpu)
    total_ticks = slots * len(trace.intervals) * nvcpus
    return TraceImage(area, slots, written / total_ticks, trace.interval_s, streams)


__all__ = ["Trace", "TraceImage", "encode", "decode", "write", "load", "image_for",
           "trace_area_npages", "MAX_TRACE_BYTES", "END_WORD"]

"""A fast path for post-copy page batches: ZERO and RAW runs only.

A post-copy fault reply names one or a few pages and must land within tens of
microseconds. The general codec (codec.BatchEncoder / decoder.BatchDecoder)
spends 130-200 µs of fixed numpy work per batch whatever its size, which is
most of a fault's service time. These two functions speak the same wire
format (batchformat: header, run table, RAW section) with a handful of
``struct`` calls:

* :func:`encode_raw` builds a batch over sorted distinct pages: ZERO runs
  for the pages a native scan finds zero, RAW runs for the rest; the payload
  chunks are views of guest memory (the source VM is frozen in post-copy, so
  they cannot change before they are sent).
* :func:`parse_raw` validates a batch as strictly as the general decoder does
  for these encodings (magic, version, reserved bytes, run bounds, ascending
  disjoint runs, payload sizes adding up) and returns its runs, or ``None``
  when the batch uses another encoding or has too many runs, so the caller
  falls back to the general decoder. Malformed input raises CodecError.

Post-copy pushes use it too (no LZ4): every push batch is encoded on the
source's loop and placed on the destination's, and a fault reply waits for
whichever batch is in hand. Measured on loopback, the codec's fixed cost put
fault service at 0.5-1.5 ms p50 under a full push; this path brings the
per-batch work down to the copies themselves. On a slow link LZ4 could
shorten post-copy's total time; that trade is not taken here.
"""
from __future__ import annotations

import struct

import numpy as np

from . import batchformat as bf
from ..errors import CodecError
from ..native import PAGE_SIZE
from ..pages import runs_of
from ..protocol import spec

MAX_FAST_RUNS = 256
_RUN = struct.Struct(spec.BATCH_RUN_FORMAT)
assert _RUN.size == bf.RUN_BYTES


def encode_raw(pages_view: np.ndarray, page_indices: np.ndarray, zero: np.ndarray | None = None
               ) -> tuple[list, int, int]:
    """Chunks of a batch of ``page_indices`` (sorted, distinct) read from
    ``pages_view`` (GuestMemory.pages); ``zero[i]`` marks page i as ZERO (None:
    all RAW). Returns (chunks, nbytes, raw_pages)."""
    n = int(page_indices.size)
    if zero is None and int(page_indices[-1]) - int(page_indices[0]) + 1 == n:
        # one RAW run (a fault reply, usually one page): no numpy on this path
        first = int(page_indices[0])
        head = bf.HEADER.pack(bf.MAGIC, bf.VERSION, 0, 0, 1, n, n * PAGE_SIZE) \
            + _RUN.pack(first, n, bf.RAW, 0, 0, 0, n * PAGE_SIZE)
        return [head, memoryview(pages_view[first:first + n]).cast("B")], \
            len(head) + n * PAGE_SIZE, n
    if zero is None:
        zero = np.zeros(n, dtype=bool)
    zs, zc = runs_of(page_indices[zero])
    rs, rc = runs_of(page_indices[~zero])
    starts = np.concatenate([zs, rs])
    counts = np.concatenate([zc, rc])
    encs = np.concatenate([np.full(zs.size, bf.ZERO), np.full(rs.size, bf.RAW)])
    order = np.argsort(starts, kind="stable")
    raw_pages = int(rc.sum())
    table = b"".join(_RUN.pack(s, c, e, 0, 0, 0, c * PAGE_SIZE if e == bf.RAW else 0)
                     for s, c, e in zip(starts[order].tolist(), counts[order].tolist(),
                                        encs[order].tolist()))
    header = bf.HEADER.pack(bf.MAGIC, bf.VERSION, 0, 0, starts.size, int(counts.sum()),
                            raw_pages * PAGE_SIZE)
    chunks = [header + table]
    for s, c in zip(rs.tolist(), rc.tolist()):
        # RAW payloads in run-table order: the table is sorted by page, and so
        # are the RAW runs among themselves
        chunks.append(memoryview(pages_view[s:s + c]).cast("B"))
    return chunks, len(chunks[0]) + raw_pages * PAGE_SIZE, raw_pages


def parse_raw(mv: memoryview, total_pages: int
              ) -> list[tuple[int, int, memoryview | None]] | None:
    """``[(first_page, npages, data)]`` (data None for a ZERO run) of a
    ZERO/RAW batch, or None (not a fast-path batch). Raises CodecError on
    malformed input."""
    if len(mv) < bf.HEADER.size:
        raise CodecError(f"page batch: {len(mv)} bytes is shorter than the header")
    magic, version, flags, reserved, nruns, npages, payload_bytes = bf.HEADER.unpack_from(mv)
    if magic != bf.MAGIC or version != bf.VERSION or flags or reserved:
        return None    # the general decoder explains precisely what is wrong
    if not 0 < nruns <= MAX_FAST_RUNS:
        return None
    table_end = bf.HEADER.size + nruns * bf.RUN_BYTES
    if len(mv) < table_end:
        return None
    runs = [_RUN.unpack_from(mv, bf.HEADER.size + i * bf.RUN_BYTES) for i in range(nruns)]
    if any(r[2] != bf.RAW and r[2] != bf.ZERO for r in runs):
        return None
    if table_end + payload_bytes != len(mv):
        raise CodecError(f"page batch: length {len(mv)} does not match the header "
                         f"({nruns} runs, {payload_bytes} payload bytes)")
    out = []
    off = table_end
    prev_end = 0
    seen = 0
    for first, count, enc, r0, r1, r2, pb in runs:
        if r0 or r1 or r2:
            raise CodecError("page batch: reserved run-table bytes set")
        want = count * PAGE_SIZE if enc == bf.RAW else 0
        if count == 0 or pb != want:
            raise CodecError(f"page batch: {bf.NAMES[enc]} run of {count} pages with {pb} "
                             "payload bytes")
        if first < prev_end or first + count > total_pages:
            raise CodecError("page batch: runs out of range, overlapping or out of order")
        prev_end = first + count
        out.append((first, count, mv[off:off + pb] if enc == bf.RAW else None))
        off += pb
        seen += count
    if seen != npages or off != len(mv):
        raise CodecError("page batch: run counts or payload sizes do not add up to the header")
    return out


__all__ = ["encode_raw", "parse_raw", "MAX_FAST_RUNS"]

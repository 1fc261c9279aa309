"""Page sets, runs and orderings, vectorised with numpy.

A page set travels through the engine in two shapes: a sorted ``int64``
array of page indices (what a dirty tracker returns and what the encoder
takes) and a dense bitmap over all ``npages`` (:class:`PageBitmap`, what the
destination keeps to know which pages it holds). A *run* is a maximal stretch
of consecutive indices, ``(start, count)``; the wire and the post-copy placer
(UFFDIO_COPY of a whole run) work in runs.

On the wire a bitmap is sent as its runs: a little-endian header
``<QQ`` (npages, nruns) and then ``nruns`` pairs ``<QQ`` (start, count).
A bitmap of a few dense regions costs a few dozen bytes; a pathological one
(every other page) costs 16 bytes per set page, so :meth:`PageBitmap.to_bytes`
falls back to numpy's packbits (1 bit per page) whenever that is smaller;
the first byte says which (1 = runs, 2 = packbits).
"""
from __future__ import annotations

import struct
from typing import Iterator

import numpy as np

from .errors import CodecError, ConfigError

_RUNS = 1
_PACKBITS = 2
_HDR = struct.Struct("<BQQ")  # kind, npages, nruns (runs) or nbytes (packbits)


def as_indices(pages) -> np.ndarray:
    """A 1-D int64 array from any sequence of page indices (no copy when possible)."""
    arr = np.asarray(pages, dtype=np.int64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def runs_of(indices) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``(starts, counts)`` of an ascending index array, in order.

    Consecutive equal indices are not merged: the input must be strictly
    ascending (use :func:`np.unique` first otherwise).
    """
    idx = as_indices(indices)
    if idx.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    first = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return idx[first], (ends - first).astype(np.int64)


def indices_of_runs(starts, counts) -> np.ndarray:
    """The inverse of :func:`runs_of`: every index covered by the runs."""
    starts = as_indices(starts)
    counts = as_indices(counts)
    total = int(counts.sum()) if counts.size else 0
    if total == 0:
        return np.empty(0, np.int64)
    # offset of each element inside its run, built without a Python loop
    run_of = np.repeat(np.arange(counts.size), counts)
    first_pos = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return starts[run_of] + (np.arange(total) - first_pos[run_of])


def split_runs(starts, counts, max_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Split runs longer than ``max_count`` pages into pieces of at most that many."""
    if max_count <= 0:
        raise ConfigError(f"max_count must be positive, got {max_count}")
    starts = as_indices(starts)
    counts = as_indices(counts)
    pieces = (counts + max_count - 1) // max_count
    run_of = np.repeat(np.arange(counts.size), pieces)
    first_piece = np.concatenate(([0], np.cumsum(pieces)[:-1]))
    k = np.arange(run_of.size) - first_piece[run_of]
    new_starts = starts[run_of] + k * max_count
    new_counts = np.minimum(max_count, counts[run_of] - k * max_count)
    return new_starts, new_counts


class PageBitmap:
    """A dense set of pages over ``[0, npages)``, one bool per page."""

    __slots__ = ("npages", "bits")

    def __init__(self, npages: int, bits: np.ndarray | None = None):
        if npages < 0:
            raise ConfigError(f"npages must not be negative, got {npages}")
        self.npages = int(npages)
        if bits is None:
            bits = np.zeros(self.npages, dtype=np.bool_)
        elif bits.shape != (self.npages,) or bits.dtype != np.bool_:
            raise ConfigError("bitmap array must be bool[npages]")
        self.bits = bits

    @classmethod
    def full(cls, npages: int) -> "PageBitmap":
        return cls(npages, np.ones(npages, dtype=np.bool_))

    @classmethod
    def from_indices(cls, npages: int, indices) -> "PageBitmap":
        bm = cls(npages)
        bm.set(indices)
        return bm

    def _check(self, idx: np.ndarray) -> np.ndarray:
        if idx.size and (idx.min() < 0 or idx.max() >= self.npages):
            raise IndexError(f"page index out of range [0, {self.npages})")
        return idx

    def set(self, indices) -> None:
        self.bits[self._check(as_indices(indices))] = True

    def clear(self, indices) -> None:
        self.bits[self._check(as_indices(indices))] = False

    def set_range(self, start: int, count: int) -> None:
        self._check(as_indices([start, start + count - 1]) if count else as_indices([]))
        self.bits[start:start + count] = True

    def clear_range(self, start: int, count: int) -> None:
        self._check(as_indices([start, start + count - 1]) if count else as_indices([]))
        self.bits[start:start + count] = False

    def test(self, indices) -> np.ndarray:
        """Membership of each index, as a bool array."""
        return self.bits[self._check(as_indices(indices))]

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.npages and bool(self.bits[index])

    def count(self) -> int:
        return int(np.count_nonzero(self.bits))

    def __len__(self) -> int:
        return self.count()

    def indices(self) -> np.ndarray:
        """Sorted int64 indices of the set pages."""
        return np.flatnonzero(self.bits).astype(np.int64)

    def missing(self) -> np.ndarray:
        """Sorted int64 indices of the pages not in the set."""
        return np.flatnonzero(~self.bits).astype(np.int64)

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, counts)`` of the set pages, computed from the bit edges."""
        padded = np.concatenate(([False], self.bits, [False])).view(np.int8)
        edges = np.diff(padded)
        starts = np.flatnonzero(edges == 1).astype(np.int64)
        ends = np.flatnonzero(edges == -1).astype(np.int64)
        return starts, ends - starts

    def iter_runs(self) -> Iterator[tuple[int, int]]:
        starts, counts = self.runs()
        return zip(starts.tolist(), counts.tolist())

    def union(self, other: "PageBitmap") -> "PageBitmap":
        self._same(other)
        return PageBitmap(self.npages, self.bits | other.bits)

    def difference(self, other: "PageBitmap") -> "PageBitmap":
        self._same(other)
        return PageBitmap(self.npages, self.bits & ~other.bits)

    def _same(self, other: "PageBitmap") -> None:
        if other.npages != self.npages:
            raise ConfigError(f"bitmaps differ in size: {self.npages} vs {other.npages} pages")

    def copy(self) -> "PageBitmap":
        return PageBitmap(self.npages, self.bits.copy())

    def __eq__(self, other) -> bool:
        return (isinstance(other, PageBitmap) and other.npages == self.npages
                and bool(np.array_equal(self.bits, other.bits)))

    def __repr__(self) -> str:
        return f"<PageBitmap {self.count()}/{self.npages} pages>"

    # -- wire form --------------------------------------------------------------
    def to_bytes(self) -> bytes:
        starts, counts = self.runs()
        runs_len = starts.size * 16
        packed_len = (self.npages + 7) // 8
        if runs_len <= packed_len:
            table = np.empty((starts.size, 2), dtype="<u8")
            table[:, 0] = starts
            table[:, 1] = counts
            return _HDR.pack(_RUNS, self.npages, starts.size) + table.tobytes()
        packed = np.packbits(self.bits, bitorder="little")
        return _HDR.pack(_PACKBITS, self.npages, packed.size) + packed.tobytes()

    @classmethod
    def from_bytes(cls, data, *, max_npages: int | None = None) -> "PageBitmap":
        """Parse :meth:`to_bytes` output; malformed input raises CodecError."""
        mv = memoryview(data).cast("B")
        if len(mv) < _HDR.size:
            raise CodecError("page bitmap: truncated header")
        kind, npages, n = _HDR.unpack_from(mv)
        if max_npages is not None and npages > max_npages:
            raise CodecError(f"page bitmap: {npages} pages exceeds the limit {max_npages}")
        body = mv[_HDR.size:]
        if kind == _RUNS:
            if len(body) != n * 16:
                raise CodecError("page bitmap: run table length mismatch")
            table = np.frombuffer(body, dtype="<u8").reshape(-1, 2).astype(np.int64)
            starts, counts = table[:, 0], table[:, 1]
            if np.any(counts <= 0) or np.any(starts < 0) or np.any(starts + counts > npages) \
                    or np.any(starts[1:] < starts[:-1] + counts[:-1]):
                raise CodecError("page bitmap: runs out of range or overlapping")
            bm = cls(npages)
            # +1 at each start, -1 after each end, prefix sum -> membership
            edges = np.zeros(npages + 1, dtype=np.int64)
            np.add.at(edges, starts, 1)
            np.add.at(edges, starts + counts, -1)
            bm.bits[:] = np.cumsum(edges[:-1]) > 0
            return bm
        if kind == _PACKBITS:
            if n != (npages + 7) // 8 or len(body) != n:
                raise CodecError("page bitmap: packed length mismatch")
            bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=npages,
                                 bitorder="little").astype(np.bool_)
            return cls(npages, bits)
        raise CodecError(f"page bitmap: unknown encoding {kind}")


# -- orderings ----------------------------------------------------------------
def order_near_faults(indices, fault_pages, *, window_pages: int = 64) -> np.ndarray:
    """Reorder ``indices`` so pages close to recent faults come first.

    Post-copy pre-paging: a guest that faulted on page f will likely touch
    f+1, f+2, ... soon (sequential access) and, less often, pages just below.
    Pages within ``window_pages`` after a fault come first, by distance; then
    those within the window before a fault; then the rest in their given
    order. The most recent fault should be last in ``fault_pages``: ties in
    distance go to the later fault.
    """
    idx = as_indices(indices)
    faults = as_indices(fault_pages)
    if idx.size == 0 or faults.size == 0:
        return idx.copy()
    # distance to the nearest fault at or below / above each page
    fs = np.unique(faults)
    pos = np.searchsorted(fs, idx, side="right")  # fs[pos-1] <= idx < fs[pos]
    below = np.where(pos > 0, idx - fs[np.maximum(pos - 1, 0)], np.iinfo(np.int64).max)
    above = np.where(pos < fs.size, fs[np.minimum(pos, fs.size - 1)] - idx, np.iinfo(np.int64).max)
    # key: after-fault pages (0 <= below < window) rank by distance; before-fault
    # pages (above <= window) rank after all of those; the rest keep order last
    big = np.int64(4 * window_pages + 4)
    key = np.full(idx.size, big, dtype=np.int64)
    near_before = above <= window_pages
    key[near_before] = window_pages + above[near_before]
    after = below < window_pages
    key[after] = below[after]
    return idx[np.argsort(key, kind="stable")]


def interleave(*arrays) -> np.ndarray:
    """Round-robin merge of several index arrays (urgent first, then others).

    Used to spread pre-paging across several fault neighbourhoods instead of
    exhausting one before starting the next."""
    arrs = [as_indices(a) for a in arrays if len(a)]
    if not arrs:
        return np.empty(0, np.int64)
    longest = max(a.size for a in arrs)
    grid = np.full((len(arrs), longest), -1, dtype=np.int64)
    for row, a in enumerate(arrs):
        grid[row, :a.size] = a
    flat = grid.T.reshape(-1)
    return flat[flat >= 0]


def chunk_indices(indices, max_npages: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``max_npages`` indices (views, no copies)."""
    if max_npages <= 0:
        raise ConfigError(f"max_npages must be positive, got {max_npages}")
    idx = as_indices(indices)
    for lo in range(0, idx.size, max_npages):
        yield idx[lo:lo + max_npages]


__all__ = ["as_indices", "runs_of", "indices_of_runs", "split_runs", "PageBitmap",
           "order_near_faults", "interleave", "chunk_indices"]

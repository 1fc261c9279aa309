"""BLOCK pages: re-send only the 256-byte blocks of a page that changed.

The source keeps, for every guest page, the hashes of the 16 blocks the
receiver holds (:class:`Fingerprints`, 128 bytes per 4 KiB page); see
csrc/codec/lm_blockdelta.c for the theory. The encoder fingerprints each page it
sends from the bytes it sends (a staging snapshot, a delta-cache slab, or
frozen memory), which yields the page hash it needs anyway, and learns which
blocks changed since the last send. The receiver writes the blocks over its
own copy of the page, so BLOCK, like DELTA, is for pre-copy only.

Wire form (a section of the batch, pages in run order)::

    <H mask per BLOCK page (bit b = block b follows), then the blocks
"""
from __future__ import annotations

import numpy as np

from ..native import PAGE_SIZE, check, ffi, lib
from .kernels import _iptr, _pages_ptr

BLOCK_BYTES = lib.LM_BLOCK_BYTES
BLOCKS_PER_PAGE = lib.LM_BLOCKS_PER_PAGE
FULL_MASK = (1 << BLOCKS_PER_PAGE) - 1
MASK_BYTES = 2

_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.int64)


def block_counts(masks: np.ndarray) -> np.ndarray:
    """Blocks each mask names."""
    return _POPCOUNT16[np.asarray(masks, dtype=np.uint16)]


def block_page_bytes(masks: np.ndarray) -> np.ndarray:
    """Wire bytes of each BLOCK page: its mask and its blocks."""
    return MASK_BYTES + block_counts(masks) * BLOCK_BYTES


class _BlockTable:
    """Block hashes of pages, one row per guest page, and which rows hold."""

    def __init__(self, npages: int):
        self.table = np.zeros((npages, BLOCKS_PER_PAGE), dtype=np.uint64)
        self.valid = np.zeros(npages, dtype=np.uint8)
        self._zero = np.zeros(PAGE_SIZE, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.valid.nbytes

    def set_zero(self, rows) -> None:
        """These pages now hold zeros (there)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if rows.size:
            check(lib.lm_pages_set_fingerprint(
                ffi.from_buffer("uint64_t[]", self.table), self.table.shape[0], _iptr(rows),
                rows.size, ffi.from_buffer("uint8_t[]", self._zero)), "block fingerprinting")
            self.valid[rows] = 1


class Fingerprints(_BlockTable):
    """The source's block hashes of what the receiver holds.

    A row is trusted only while ``valid[page]``: a page the encoder has not
    sent exactly (or was told to forget) has every block counted as changed."""

    def update(self, pages: np.ndarray, rows, page_indices) -> tuple[np.ndarray, np.ndarray]:
        """Fingerprint ``pages[rows]`` (``rows=None``: every row) as the new
        content of ``page_indices``; return (changed-block masks, page hashes).
        Validity is not changed here: the caller sets it once the bytes are
        committed to the wire."""
        _, masks, hashes = self._fingerprint(pages, rows, page_indices, copy=False)
        return masks, hashes

    def snapshot(self, pages: np.ndarray, rows, page_indices
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copy ``pages[rows]`` into a new staging array and fingerprint the
        copy as the new content of ``page_indices``, in one pass; return
        (staging, changed-block masks, page hashes)."""
        return self._fingerprint(pages, rows, page_indices, copy=True)

    def _fingerprint(self, pages, rows, page_indices, *, copy: bool):
        fp_rows = np.ascontiguousarray(page_indices, dtype=np.int64)
        r = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        n = fp_rows.size
        staging = np.empty((n, PAGE_SIZE), dtype=np.uint8) if copy else None
        masks = np.empty(n, dtype=np.uint16)
        hashes = np.empty(n, dtype=np.uint64)
        if n:
            check(lib.lm_pages_snapshot_fingerprint(
                _pages_ptr(pages), pages.shape[0], _iptr(r), n,
                ffi.NULL if staging is None else ffi.from_buffer("uint8_t[]", staging),
                ffi.from_buffer("uint64_t[]", self.table), self.table.shape[0], _iptr(fp_rows),
                ffi.from_buffer("uint8_t[]", self.valid),
                ffi.from_buffer("uint16_t[]", masks), ffi.from_buffer("uint64_t[]", hashes)),
                "fingerprinting pages")
        return staging, masks, hashes


class HeldBlocks(_BlockTable):
    """The receiver's block hashes of the pages it holds (pre-copy placer):
    a BLOCK page's new page hash then costs only its changed blocks."""

    def place(self, pages: np.ndarray, rows: np.ndarray, staging: np.ndarray) -> np.ndarray:
        """Write ``staging`` to ``pages[rows]``; the landed pages' hashes."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(rows.size, dtype=np.uint64)
        if rows.size:
            if staging.shape != (rows.size, PAGE_SIZE):
                raise ValueError(f"staging holds {staging.shape[0]} pages for {rows.size} rows")
            check(lib.lm_pages_place_fingerprint(
                ffi.from_buffer("uint8_t[]", pages), pages.shape[0], _iptr(rows), rows.size,
                _pages_ptr(np.ascontiguousarray(staging)),
                ffi.from_buffer("uint64_t[]", self.table),
                ffi.from_buffer("uint8_t[]", self.valid), ffi.from_buffer("uint64_t[]", out)),
                "placing pages")
        return out

    def apply(self, pages: np.ndarray, rows: np.ndarray, masks: np.ndarray, data
              ) -> np.ndarray | None:
        """Write BLOCK pages' blocks over ``pages[rows]``; their new hashes, or
        None (nothing written) if ``data`` is not exactly what the masks name."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        masks = np.ascontiguousarray(masks, dtype=np.uint16)
        out = np.empty(rows.size, dtype=np.uint64)
        if rows.size != masks.size or (rows.size and (rows.min() < 0
                                                      or rows.max() >= pages.shape[0])):
            return None
        if not rows.size:
            return out if len(data) == 0 else None
        rc = lib.lm_pages_apply_blocks_fingerprint(
            ffi.from_buffer("uint8_t[]", pages), pages.shape[0], _iptr(rows),
            ffi.from_buffer("uint16_t[]", masks), rows.size, ffi.from_buffer("uint8_t[]", data),
            len(data), ffi.from_buffer("uint64_t[]", self.table),
            ffi.from_buffer("uint8_t[]", self.valid), ffi.from_buffer("uint64_t[]", out))
        return out if rc == 0 else None


def gather_blocks(pages: np.ndarray, rows: np.ndarray, masks: np.ndarray,
                  out_offsets: np.ndarray, out: np.ndarray) -> None:
    """Copy the blocks each mask names from ``pages[rows[i]]`` to ``out`` at
    ``out_offsets[i]``."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.size:
        check(lib.lm_pages_gather_blocks(
            _pages_ptr(pages), pages.shape[0], _iptr(rows),
            ffi.from_buffer("uint16_t[]", np.ascontiguousarray(masks, dtype=np.uint16)),
            _iptr(np.ascontiguousarray(out_offsets, dtype=np.int64)), rows.size,
            ffi.from_buffer("uint8_t[]", out), out.size), "gathering changed blocks")


__all__ = ["BLOCK_BYTES", "BLOCKS_PER_PAGE", "FULL_MASK", "MASK_BYTES", "Fingerprints", "HeldBlocks",
           "block_counts", "block_page_bytes", "gather_blocks"]

"""Python face of the page-codec hot loops in csrc/codec/lm_pagecodec.c.

Each function takes whole arrays of pages and makes one native call, so the
per-page cost is the C loop's, not the interpreter's. Pages are addressed as
rows of a 2-D ``uint8[npages, 4096]`` numpy array (guest memory's ``.pages``,
a delta-cache slab, or a decode staging buffer); page indices are int64.
The array must be C-contiguous: the native side sees only its base pointer.
"""
from __future__ import annotations

import numpy as np

from ..native import PAGE_SIZE, check, ffi, lib

DELTA_TOO_BIG = lib.LM_DELTA_TOO_BIG


def _pages_ptr(pages: np.ndarray):
    if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE or pages.dtype != np.uint8:
        raise TypeError(f"expected a uint8[n, {PAGE_SIZE}] page array, got {pages.dtype}{pages.shape}")
    if not pages.flags.c_contiguous:
        raise TypeError("page array must be C-contiguous")
    return ffi.from_buffer("uint8_t[]", pages, require_writable=False)


def _indices(indices) -> np.ndarray | None:
    if indices is None:
        return None
    return np.ascontiguousarray(indices, dtype=np.int64)


def _iptr(arr: np.ndarray | None):
    return ffi.NULL if arr is None else ffi.from_buffer("int64_t[]", arr)


def zero_scan(pages: np.ndarray, indices=None) -> np.ndarray:
    """Boolean mask: True where page ``indices[i]`` (or row i) is all zero."""
    idx = _indices(indices)
    n = pages.shape[0] if idx is None else idx.size
    out = np.empty(n, dtype=np.uint8)
    if n:
        check(lib.lm_pages_zero_scan(_pages_ptr(pages), pages.shape[0], _iptr(idx), n,
                                     ffi.from_buffer("uint8_t[]", out)), "zero-page scan")
    return out.view(np.bool_)


def hash_pages(pages: np.ndarray, indices=None) -> np.ndarray:
    """The 64-bit content hash of page ``indices[i]`` (or of every row)."""
    idx = _indices(indices)
    n = pages.shape[0] if idx is None else idx.size
    out = np.empty(n, dtype=np.uint64)
    if n:
        check(lib.lm_pages_hash(_pages_ptr(pages), pages.shape[0], _iptr(idx), n,
                                ffi.from_buffer("uint64_t[]", out)), "page hashing")
    return out


def delta_encode(pages: np.ndarray, indices: np.ndarray, slab: np.ndarray, slots: np.ndarray,
                 max_page_bytes: int) -> tuple[bytes, np.ndarray]:
    """XOR-delta pages against their old versions in ``slab[slots]``.

    Every page's snapshot replaces its old version in the slab. Returns the
    concatenated deltas and per-page lengths (``DELTA_TOO_BIG`` where the
    delta exceeded ``max_page_bytes``; such pages appended nothing).
    """
    idx = _indices(indices)
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    n = idx.size
    lengths = np.empty(n, dtype=np.int32)
    if not n:
        return b"", lengths
    cap = n * max_page_bytes
    out = bytearray(cap)
    total = check(lib.lm_pages_delta_encode(
        _pages_ptr(pages), pages.shape[0], _iptr(idx), ffi.from_buffer("uint8_t[]", slab),
        slab.shape[0], _iptr(slots), n, ffi.from_buffer("uint8_t[]", out), cap, max_page_bytes,
        ffi.from_buffer("int32_t[]", lengths)), "delta encoding")
    del out[total:]
    return bytes(out), lengths


def delta_apply(staging: np.ndarray, deltas, lengths: np.ndarray) -> bool:
    """Apply concatenated deltas in place onto the rows of ``staging``.

    Returns False (staging then holds garbage) when a delta is malformed."""
    lengths = np.ascontiguousarray(lengths, dtype=np.uint16)
    if staging.shape[0] != lengths.size:
        return False
    if not lengths.size:
        return len(deltas) == 0
    rc = lib.lm_pages_delta_apply(ffi.from_buffer("uint8_t[]", staging), lengths.size,
                                  ffi.from_buffer("uint8_t[]", deltas), len(deltas),
                                  ffi.from_buffer("uint16_t[]", lengths))
    return rc == 0


ZERO_PAGE_HASH = int(hash_pages(np.zeros((1, PAGE_SIZE), dtype=np.uint8))[0])

__all__ = ["zero_scan", "hash_pages", "delta_encode", "delta_apply", "DELTA_TOO_BIG",
           "ZERO_PAGE_HASH"]

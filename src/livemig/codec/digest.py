"""Memory verification digests.

After the final round the destination must prove its memory equals the
source's. Rehashing all memory at switchover costs about 100 ms per GiB of
downtime, so both sides keep a :class:`PageHashes` array instead — one 64-bit
content hash per page (csrc/codec/lm_pagecodec.c: four multiply-rotate lanes and
the splitmix64 finaliser; 5-6 GB/s per core, one native call per batch rather
than 0.5-1.6 us per page calling xxhash from Python). The
source records the hash of each page *as sent*, the destination the hash of
each page *as landed*; the digest is xxh3-128 over the array (2 MiB per GiB,
well under a millisecond), so comparing digests costs nothing at switchover.

Both arrays start at the hash of a zero page, because a fresh region reads as
zeros on both sides: pages never sent then agree without being hashed.

:func:`memory_digest_full` rehashes everything (xxh3-128 over the whole
region) for tests and ``verify="full"``.
"""
from __future__ import annotations

import numpy as np
import xxhash

from .kernels import ZERO_PAGE_HASH, hash_pages

# The hash-array entry of a page owed at a post-copy switchover, on both sides:
# no page's content hashes to 0 in practice, and the digest of the pages as they
# land must not count a page that has not arrived yet.
OWED_PAGE_HASH = 0


class PageHashes:
    """numpy ``uint64[npages]`` of per-page content hashes."""

    __slots__ = ("values",)

    def __init__(self, npages: int):
        self.values = np.full(npages, ZERO_PAGE_HASH, dtype=np.uint64)

    @classmethod
    def of_memory(cls, pages: np.ndarray) -> "PageHashes":
        """Hash every page of a ``uint8[npages, 4096]`` array (e.g. memory.pages)."""
        ph = cls(pages.shape[0])
        ph.values[:] = hash_pages(pages)
        return ph

    @property
    def npages(self) -> int:
        return self.values.size

    def update(self, indices: np.ndarray, hashes: np.ndarray) -> None:
        self.values[indices] = hashes

    def record(self, pages: np.ndarray, indices: np.ndarray) -> None:
        """Hash pages ``indices`` of ``pages`` and record the result."""
        self.values[indices] = hash_pages(pages, indices)

    def digest(self) -> bytes:
        """xxh3-128 of the little-endian hash array (16 bytes)."""
        return xxhash.xxh3_128_digest(self.values.astype("<u8", copy=False))

    def hexdigest(self) -> str:
        return self.digest().hex()

    def mismatches(self, other: "PageHashes") -> np.ndarray:
        """Indices where two arrays disagree (for diagnostics after a failed verify)."""
        return np.flatnonzero(self.values != other.values)


def memory_digest_full(memory) -> bytes:
    """xxh3-128 over all of guest memory (``memory.bytes``), 16 bytes."""
    return xxhash.xxh3_128_digest(memory.bytes)


def memory_page_hashes(memory) -> PageHashes:
    """A fresh PageHashes of the current contents of guest memory."""
    return PageHashes.of_memory(memory.pages)


__all__ = ["PageHashes", "memory_digest_full", "memory_page_hashes"]

"""Wire layout of an encoded page batch (shared by encoder and decoder).

A batch is self-describing; nothing is carried over from earlier batches
except what DUP and DELTA refer to (pages the receiver already holds)::

    header   <4sBBHIIQ  magic "LMPB", version, flags (0), reserved (0),
                        nruns, npages, payload_bytes
    run table nruns x 20 bytes: <Q first_page, <I npages, B encoding,
                        3 reserved bytes (0), <I payload_bytes
    payload  sections in this order, each the concatenation over its runs
             in run-table order:
               DUP    per page: 16-byte xxh3-128 of the content + <Q source page
               DELTA  <H length per DELTA page, then all the deltas
               BLOCK  <H block mask per BLOCK page, then the 256-byte
                      blocks the masks name (blockdelta.py)
               LZ4    per run: one lz4 block of the run's npages * 4096 bytes
               RAW    per run: npages * 4096 bytes
             ZERO runs have no payload.

Sections (rather than per-run interleaving) let both sides handle each
encoding with a few vectorised numpy/C calls per batch instead of Python per
run. Encoding numbers are wire values, 0 is invalid. Version 1.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from ..native import PAGE_SIZE
from ..protocol import spec

MAGIC = spec.BATCH_MAGIC
VERSION = spec.BATCH_VERSION
HEADER = struct.Struct(spec.BATCH_HEADER_FORMAT)
RUN_DTYPE = np.dtype({
    "names": ["first", "count", "encoding", "r0", "r1", "r2", "payload_bytes"],
    "formats": ["<u8", "<u4", "u1", "u1", "u1", "u1", "<u4"],
    "offsets": [0, 8, 12, 13, 14, 15, 16],
    "itemsize": 20,
})
RUN_BYTES = RUN_DTYPE.itemsize
assert RUN_BYTES == struct.calcsize(spec.BATCH_RUN_FORMAT)
DUP_DTYPE = np.dtype([("hash", "V16"), ("source", "<u8")])
DUP_ENTRY_BYTES = DUP_DTYPE.itemsize

CODES = dict(spec.ENCODINGS)
NAMES = {code: name for name, code in CODES.items()}
ZERO, DUP, DELTA, LZ4, RAW, BLOCK = (CODES[n] for n in ("zero", "dup", "delta", "lz4", "raw", "block"))
SECTION_ORDER = (DUP, DELTA, BLOCK, LZ4, RAW)

# LZ4's worst case for n input bytes is n + n/255 + 16; a run whose payload
# exceeds that is malformed whatever its contents.
def lz4_bound(nbytes: int) -> int:
    return nbytes + nbytes // 255 + 16


def max_pages_per_batch(max_batch_bytes: int) -> int:
    """Pages that always fit: every page RAW in a run of its own."""
    return max(0, (max_batch_bytes - HEADER.size) // (PAGE_SIZE + RUN_BYTES))


def _zero_counts() -> dict[str, int]:
    return {name: 0 for name in NAMES.values()}


@dataclass
class EncodedBatch:
    """One batch ready to send: write ``chunks`` in order (``nbytes`` in total).

    RAW payload chunks may be memoryviews into guest memory: send them before
    the guest can change them again if the receiver's hashes must match (the
    encoder accounts for this; see BatchEncoder)."""

    chunks: list
    npages: int
    nbytes: int
    page_indices: np.ndarray
    pages_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    bytes_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    nruns: int = 0

    def tobytes(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks)


@dataclass
class DecodedBatch:
    """What one applied batch changed at the receiver."""

    page_indices: np.ndarray
    npages: int
    nbytes: int
    pages_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    bytes_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    nruns: int = 0


__all__ = ["MAGIC", "VERSION", "HEADER", "RUN_DTYPE", "RUN_BYTES", "DUP_DTYPE",
           "DUP_ENTRY_BYTES", "ZERO", "DUP", "DELTA", "LZ4", "RAW", "BLOCK", "NAMES", "CODES",
           "SECTION_ORDER", "lz4_bound", "max_pages_per_batch", "EncodedBatch", "DecodedBatch"]

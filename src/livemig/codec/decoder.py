"""Page-batch decoder: validate everything, then place pages, DUP last.

Order of work for one batch (see batchformat for the layout):

1. Parse and validate the header and the whole run table with numpy: known
   encodings, zero reserved bytes, page ranges inside guest memory, no page
   twice, per-run payload sizes consistent with the encoding, and section
   sizes adding up to the payload. Any violation raises CodecError before a
   single page is touched.
2. Build staging buffers: RAW pages are viewed in place in the payload, LZ4
   runs are decompressed, DELTA pages are copied from memory and patched in
   C; BLOCK masks are checked against the BLOCK data's length. A
   decompression or delta error raises CodecError; still nothing placed.
3. Place ZERO, RAW, LZ4 and DELTA pages, write BLOCK pages' blocks over
   their current content (all independent: each page appears once per
   batch), then resolve DUP pages from the receiver's memory
   — which now includes this batch's earlier pages — verifying each source
   page's xxh3-128 first. A mismatch raises CodecError with no DUP placed.
4. Record the per-page hashes of what landed (:class:`PageHashes`), hashed
   from memory after placing (proves the placer wrote what we meant), or from
   the staging buffers when the placer says memory must not be read back
   (post-copy: the guest may already be writing the page).

The *placer* decides how bytes land. :class:`MemoryPlacer` writes into guest
memory with numpy; post-copy passes one that issues UFFDIO_COPY per run, so
staging is always contiguous per run (rows in run order).
"""
from __future__ import annotations

import lz4.block
import numpy as np
import xxhash

from . import batchformat as bf
from .digest import PageHashes
from ..errors import CodecError
from ..native import PAGE_SIZE
from .blockdelta import MASK_BYTES, HeldBlocks, block_page_bytes
from .kernels import ZERO_PAGE_HASH, delta_apply, hash_pages, zero_scan
from ..pages import indices_of_runs

class MemoryPlacer:
    """Lands pages by writing guest memory directly (pre-copy destination)."""

    hash_after_place = True
    """Hash pages from memory after placing (False: from the staging buffers).
    A placer whose place_runs returns hashes has hashed what landed itself."""
    supports_delta = True
    """DELTA and DUP read the receiver's current pages; a post-copy placer says
    False, and batches using them are refused."""

    def __init__(self, memory):
        self.memory = memory
        self.held = HeldBlocks(int(memory.npages))  # block hashes of what memory holds

    def place_runs(self, starts: np.ndarray, counts: np.ndarray, staging: np.ndarray
                   ) -> np.ndarray:
        """Write ``staging`` rows (run order, ``counts.sum()`` rows) to the runs;
        return the hash of each page as it landed."""
        return self.held.place(self.memory.pages, indices_of_runs(starts, counts), staging)

    def place_zero_runs(self, starts: np.ndarray, counts: np.ndarray) -> None:
        """Zero the runs, writing only pages that are not zero already: a page
        never written reads as the kernel's zero page, and writing it would
        allocate memory (and cost a fault) for nothing."""
        idx = indices_of_runs(starts, counts)
        pages = self.memory.pages
        dirty = idx[~zero_scan(pages, idx)]
        if dirty.size:
            pages[dirty] = 0
        self.held.set_zero(idx)

    def place_blocks(self, page_indices: np.ndarray, masks: np.ndarray, data
                     ) -> np.ndarray | None:
        """Write BLOCK pages' blocks over their current content; the landed
        pages' hashes (only the written blocks rehashed), or None (nothing
        written) if ``data`` is not exactly what the masks name."""
        return self.held.apply(self.memory.pages, page_indices, masks, data)


class BatchDecoder:
    """Applies encoded batches to ``memory`` and keeps the landed-page hashes."""

    def __init__(self, memory, placer=None, *, verify_dup: bool = True):
        self.memory = memory
        self.placer = placer if placer is not None else MemoryPlacer(memory)
        self.verify_dup = verify_dup
        self.npages = int(memory.npages)
        self.hashes = PageHashes(self.npages)

    def apply(self, payload) -> bf.DecodedBatch:
        mv = memoryview(payload).cast("B")
        runs, nruns, npages, body = self._parse(mv)
        enc = runs["encoding"]
        starts = runs["first"].astype(np.int64)
        counts = runs["count"].astype(np.int64)
        pbytes = runs["payload_bytes"].astype(np.int64)
        all_idx = indices_of_runs(starts, counts)
        if np.unique(all_idx).size != all_idx.size:
            raise CodecError("page batch: a page appears more than once")

        # -- sections -------------------------------------------------------------
        section = {}
        off = 0
        for e in bf.SECTION_ORDER:
            size = int(pbytes[enc == e].sum())
            section[e] = body[off:off + size]
            off += size
        sel = {e: enc == e for e in bf.NAMES}

        # -- staging, all validated before anything is placed ----------------------
        dup_idx = indices_of_runs(starts[sel[bf.DUP]], counts[sel[bf.DUP]])
        dup_entries = np.frombuffer(section[bf.DUP], dtype=bf.DUP_DTYPE)
        if dup_entries.size:
            if not self.placer.supports_delta:
                raise CodecError("page batch: DUP pages, but the receiver's pages may be "
                                 "changing under a running guest (post-copy placer)")
            src = dup_entries["source"].astype(np.int64)
            if np.any(dup_entries["source"] >= self.npages):
                raise CodecError("page batch: DUP source page out of range")
            is_dup = np.zeros(self.npages, dtype=np.bool_)
            is_dup[dup_idx] = True
            if np.any(is_dup[src] & (src != dup_idx)):
                raise CodecError("page batch: DUP source is another DUP page of the batch")
        delta_staging = self._delta_staging(starts[sel[bf.DELTA]], counts[sel[bf.DELTA]],
                                            pbytes[sel[bf.DELTA]], section[bf.DELTA])
        lz4_staging = self._lz4_staging(counts[sel[bf.LZ4]], pbytes[sel[bf.LZ4]], section[bf.LZ4])
        raw_staging = np.frombuffer(section[bf.RAW], dtype=np.uint8).reshape(-1, PAGE_SIZE)
        block_idx, block_masks, block_data = self._block_parts(
            starts[sel[bf.BLOCK]], counts[sel[bf.BLOCK]], pbytes[sel[bf.BLOCK]],
            section[bf.BLOCK])

        # -- placement --------------------------------------------------------------
        placer = self.placer
        if sel[bf.ZERO].any():
            zs, zc = starts[sel[bf.ZERO]], counts[sel[bf.ZERO]]
            placer.place_zero_runs(zs, zc)
            self.hashes.values[indices_of_runs(zs, zc)] = ZERO_PAGE_HASH
        for e, staging in ((bf.RAW, raw_staging), (bf.LZ4, lz4_staging),
                           (bf.DELTA, delta_staging)):
            if sel[e].any():
                self._place(starts[sel[e]], counts[sel[e]], staging)
        if block_idx.size:
            landed = placer.place_blocks(block_idx, block_masks, block_data)
            if landed is None:
                raise CodecError("page batch: BLOCK data does not match its masks")
            self.hashes.values[block_idx] = landed
        if dup_entries.size:
            pages = self.memory.pages
            if self.verify_dup:
                want = dup_entries["hash"]
                for i, s in enumerate(src.tolist()):
                    if xxhash.xxh3_128_digest(pages[s]) != want[i].tobytes():
                        raise CodecError(
                            f"page batch: DUP source page {s} does not hold the announced "
                            f"content (for page {int(dup_idx[i])})")
            self._place(starts[sel[bf.DUP]], counts[sel[bf.DUP]], pages[src])

        out = bf.DecodedBatch(page_indices=all_idx, npages=npages, nbytes=len(mv), nruns=nruns)
        for code, name in bf.NAMES.items():
            out.pages_by_encoding[name] = int(counts[sel[code]].sum())
            out.bytes_by_encoding[name] = int(pbytes[sel[code]].sum())
        return out

    def _place(self, starts, counts, staging) -> None:
        landed = self.placer.place_runs(starts, counts, staging)
        idx = indices_of_runs(starts, counts)
        if landed is not None:
            self.hashes.values[idx] = landed
        elif self.placer.hash_after_place:
            self.hashes.record(self.memory.pages, idx)
        else:
            self.hashes.values[idx] = hash_pages(np.ascontiguousarray(staging))

    # -- parsing -------------------------------------------------------------------
    def _parse(self, mv: memoryview):
        if len(mv) < bf.HEADER.size:
            raise CodecError(f"page batch: {len(mv)} bytes is shorter than the header")
        magic, version, flags, reserved, nruns, npages, payload_bytes = bf.HEADER.unpack_from(mv)
        if magic != bf.MAGIC:
            raise CodecError(f"page batch: bad magic {magic!r}")
        if version != bf.VERSION:
            raise CodecError(f"page batch: unsupported version {version} (we speak {bf.VERSION})")
        if flags or reserved:
            raise CodecError("page batch: reserved header bits set")
        table_end = bf.HEADER.size + nruns * bf.RUN_BYTES
        if table_end + payload_bytes != len(mv):
            raise CodecError(f"page batch: length {len(mv)} does not match the header "
                             f"({nruns} runs, {payload_bytes} payload bytes)")
        runs = np.frombuffer(mv[bf.HEADER.size:table_end], dtype=bf.RUN_DTYPE)
        enc = runs["encoding"]
        counts = runs["count"].astype(np.int64)
        first = runs["first"]
        pb = runs["payload_bytes"].astype(np.int64)
        unknown = (enc < bf.ZERO) | (enc > max(bf.NAMES))
        if np.any(unknown):
            raise CodecError(f"page batch: unknown encoding {int(enc[unknown][0])}")
        if np.any(runs["r0"] | runs["r1"] | runs["r2"]):
            raise CodecError("page batch: reserved run-table bytes set")
        if np.any(counts == 0):
            raise CodecError("page batch: empty run")
        if np.any(first >= self.npages) or np.any(first.astype(np.int64) + counts > self.npages):
            raise CodecError(f"page batch: page index out of range [0, {self.npages})")
        if int(counts.sum()) != npages:
            raise CodecError("page batch: run counts do not add up to the header's page count")
        if int(pb.sum()) != payload_bytes:
            raise CodecError("page batch: run payload sizes do not add up to the payload")
        bad = ((enc == bf.ZERO) & (pb != 0)) \
            | ((enc == bf.RAW) & (pb != counts * PAGE_SIZE)) \
            | ((enc == bf.DUP) & (pb != counts * bf.DUP_ENTRY_BYTES)) \
            | ((enc == bf.DELTA) & ((pb < 2 * counts) | (pb > counts * (2 + PAGE_SIZE)))) \
            | ((enc == bf.BLOCK) & ((pb < 2 * counts) | (pb > counts * (2 + PAGE_SIZE)))) \
            | ((enc == bf.LZ4) & ((pb <= 0) | (pb > counts * PAGE_SIZE + counts * PAGE_SIZE // 255 + 16)))
        if np.any(bad):
            r = int(np.flatnonzero(bad)[0])
            raise CodecError(f"page batch: run {r} ({bf.NAMES[int(enc[r])]}) has a payload of "
                             f"{int(pb[r])} bytes for {int(counts[r])} pages")
        return runs, nruns, npages, mv[table_end:]

    def _delta_staging(self, starts, counts, pbytes, section) -> np.ndarray:
        n = int(counts.sum())
        if not n:
            return np.empty((0, PAGE_SIZE), dtype=np.uint8)
        if not self.placer.supports_delta:
            raise CodecError("page batch: DELTA pages, but the receiver holds no base copy "
                             "(post-copy placer)")
        lens = np.frombuffer(section[:2 * n], dtype="<u2")
        data = section[2 * n:]
        run_first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        per_run = np.add.reduceat(lens.astype(np.int64), run_first)
        if np.any(per_run != pbytes - 2 * counts) or int(lens.sum()) != len(data):
            raise CodecError("page batch: DELTA lengths do not match the DELTA data")
        staging = self.memory.pages[indices_of_runs(starts, counts)]
        if not delta_apply(staging, data, lens):
            raise CodecError("page batch: malformed DELTA encoding")
        return staging

    def _block_parts(self, starts, counts, pbytes, section):
        """BLOCK pages, their masks and blocks, checked against the run table."""
        n = int(counts.sum())
        if not n:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint16), b""
        if not self.placer.supports_delta:
            raise CodecError("page batch: BLOCK pages, but the receiver's pages may be "
                             "changing under a running guest (post-copy placer)")
        masks = np.frombuffer(section[:MASK_BYTES * n], dtype="<u2")
        run_first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        per_run = np.add.reduceat(block_page_bytes(masks), run_first)
        if np.any(per_run != pbytes):
            raise CodecError("page batch: BLOCK masks do not match the BLOCK data")
        return indices_of_runs(starts, counts), masks, section[MASK_BYTES * n:]

    def _lz4_staging(self, counts, pbytes, section) -> np.ndarray:
        n = int(counts.sum())
        staging = np.empty((n, PAGE_SIZE), dtype=np.uint8)
        flat = staging.reshape(-1)
        off = row = 0
        for c, b in zip(counts.tolist(), pbytes.tolist()):
            want = c * PAGE_SIZE
            try:
                out = lz4.block.decompress(section[off:off + b], uncompressed_size=want)
            except lz4.block.LZ4BlockError as exc:
                raise CodecError(f"page batch: LZ4 run does not decompress: {exc}") from None
            if len(out) != want:
                raise CodecError("page batch: LZ4 run decompresses to the wrong size")
            flat[row * PAGE_SIZE:row * PAGE_SIZE + want] = np.frombuffer(out, dtype=np.uint8)
            off += b
            row += c
        return staging


__all__ = ["BatchDecoder", "MemoryPlacer"]

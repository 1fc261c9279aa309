"""Page-batch encoder: picks an encoding per page from what it measures.

For each page of a batch, cheapest first:

1. ZERO  — the page is all zero bytes (native scan, one call per batch);
2. DUP   — its 64-bit content hash names a page the receiver holds with the
           same content (a direct-mapped table of hashes of pages sent, or an
           earlier page of the same batch); the wire carries the xxh3-128 of
           the content and the source page index, and the receiver checks it;
3. DELTA — the page was sent before, its last-sent version is in the delta
           cache, and the XOR delta is at most ``delta_max_page_bytes``;
   BLOCK — the page was sent before (exactly) and at most
           ``_BLOCK_MAX_BLOCKS`` of its 16 blocks changed since, by the block
           fingerprints of what the receiver holds (blockdelta.py): only
           those blocks travel. Needs no copy of old pages, so it covers
           all of memory where the delta cache covers a fraction; not where
           LZ4 would send the pages in fewer bytes (sampled per chunk);
4. LZ4   — runs of up to ``lz4_chunk_pages`` consecutive pages, when that
           saves ``lz4_min_saving_pct`` and, once the link's bandwidth is
           known (``link_bytes_per_s``) and the encoder is given a clock,
           when the time compressing costs is less than the time the saved
           bytes would take on the link — on a fast link compression only
           lengthens the stop-and-copy;
5. RAW   — otherwise. A batch is never larger than RAW plus its header and
           20 bytes per run.

Hazards, and how they are handled:

* The guest keeps running during pre-copy, so a page may change between the
  encoder reading it and its bytes leaving. Every frame carries a checksum of
  its payload, computed when the frame is built, so bytes read from live
  memory later by the socket could contradict it (and a receiver rightly
  rejects such a frame). Hence while the guest runs, RAW pages are copied once
  into a staging buffer and sent from there; only frozen memory
  (``encode(..., frozen=True)``: the final round, vCPUs paused) is sent as
  memoryviews into guest memory. The dirty tracker reports a page written
  after its copy again, so the page heals next round. A page is usable as a
  DUP source or DELTA base only if it is *exact*: its bytes on the wire came
  from a snapshot we hashed (delta-cache slab, a staging copy) or from frozen
  memory. Live pages that are themselves sent as DUP are re-read into a
  snapshot and rehashed; a page that changed meanwhile falls back to RAW.
* Pages that enter the delta cache are sent from their cache snapshot (one
  copy), as QEMU's XBZRLE does, so the cached base is exactly what the
  receiver reconstructs. Only pages sent a second time are cached: the first
  round's bulk stays zero-copy and the cache holds pages that do get re-dirtied.
* DUP and DELTA refer to the receiver's *current* pages, so the batches of one
  encoder must be applied in the order they were produced (one encoder per
  ordered stream; split page ranges between streams). Within a batch the
  receiver applies everything else first and DUP last, so a DUP may refer to
  an earlier non-DUP page of the same batch.
"""
from __future__ import annotations

from typing import Callable, Iterator

import lz4.block
import numpy as np
import xxhash

from . import batchformat as bf
from ..config import CodecConfig
from .decoder import BatchDecoder, MemoryPlacer
from .blockdelta import (BLOCK_BYTES, FULL_MASK, Fingerprints, block_counts,
                         block_page_bytes, gather_blocks)
from .deltacache import DeltaCache
from .digest import PageHashes
from ..errors import CodecUsageError
from ..native import PAGE_SIZE
from .kernels import ZERO_PAGE_HASH, delta_encode, hash_pages, zero_scan
from ..pages import as_indices, indices_of_runs

_LIVE, _SLAB, _STAGING = 0, 1, 2
_LZ4_PROBE_CHUNKS = 8
_LZ4_SKIP_AFTER_MISS = 7  # batches sent without probing after a probe found LZ4 does not pay
_ZERO_COPY_MIN_PAGES = 4  # shorter live RAW runs are gathered into one copy
_BLOCK_MAX_BLOCKS = 12    # more changed blocks than this: RAW (LZ4) is as good
_MAX_CHUNK_FACTOR = 8     # a chunk holds at most this many all-RAW batches' pages


class BatchEncoder:
    """Encodes pages of ``memory`` (a GuestMemory) into self-describing batches.

    ``sent_hashes`` (:class:`PageHashes`) records the hash of each page as
    sent; its digest is what the destination's digest must equal.

    ``clock`` (seconds, e.g. ``time.perf_counter``) times the LZ4 probe so its
    cost can be weighed against the link; the engine passes one. The encoder
    never reads a clock of its own: without one, LZ4 is judged by its
    compression ratio alone, and the output is a function of the inputs."""

    def __init__(self, memory, config: CodecConfig | None = None, *,
                 clock: Callable[[], float] | None = None):
        self.memory = memory
        self._clock = clock
        self.config = config or CodecConfig()
        self.npages = int(memory.npages)
        self.sent_hashes = PageHashes(self.npages)
        self._exact = np.zeros(self.npages, dtype=np.bool_)
        self._sent = np.zeros(self.npages, dtype=np.bool_)
        self._in_batch = np.zeros(self.npages, dtype=np.bool_)
        entries = self.config.dup_cache_entries if self.config.enabled("dup") else 0
        entries = 1 << (int(entries).bit_length() - 1) if entries else 0
        self._dup_keys = np.zeros(entries, dtype=np.uint64)
        self._dup_pages = np.full(entries, -1, dtype=np.int64)
        self._cache: DeltaCache | None = None
        self.delta_enabled = False
        self.set_delta(self.config.enabled("delta"))
        self._fp = Fingerprints(self.npages) if self.config.enabled("block") else None
        self._lz4_skip_batches = 0
        self._bytes_per_page: float | None = None  # of the last chunk, sizes the next
        self.link_bytes_per_s: float | None = None
        """Measured bandwidth of the link the batches travel; None = unknown
        (then LZ4 is judged by its compression ratio alone)."""

    # -- switches ----------------------------------------------------------------
    def set_delta(self, enabled: bool) -> None:
        """Turn DELTA on or off. Off frees the cache (post-copy: the receiver
        has no old copy of the pages it is missing)."""
        if enabled and self.config.delta_cache_bytes >= PAGE_SIZE:
            if self._cache is None:
                self._cache = DeltaCache(self.npages, self.config.delta_cache_bytes)
            self.delta_enabled = True
        else:
            self._cache = None
            self.delta_enabled = False

    def set_postcopy(self) -> None:
        """Switch to post-copy encoding: no DELTA (the receiver lacks the pages)
        and no DUP (the destination guest runs, so a page it holds may differ
        from what we sent by the time a DUP refers to it)."""
        self.set_delta(False)
        self._fp = None
        self._dup_keys = np.zeros(0, dtype=np.uint64)
        self._dup_pages = np.full(0, -1, dtype=np.int64)

    @property
    def delta_cache(self) -> DeltaCache | None:
        return self._cache

    @property
    def fingerprints(self) -> Fingerprints | None:
        """The block fingerprints of what the receiver holds (None without
        BLOCK); the native bulk streams keep them up to date as they send."""
        return self._fp

    def forget(self, page_indices) -> None:
        """These pages are no longer valid at the receiver: never use them as
        DUP sources or DELTA bases again (until sent anew). Their entries in
        ``sent_hashes`` stay as they were; send them again before comparing
        digests."""
        idx = self._checked(page_indices)
        self._exact[idx] = False
        self._sent[idx] = False
        if self._fp is not None:
            self._fp.valid[idx] = False
        if self._cache is not None:
            self._cache.drop(idx)

    # -- encoding ----------------------------------------------------------------
    def encode(self, page_indices, max_batch_bytes: int, *, frozen: bool = False
               ) -> Iterator[bf.EncodedBatch]:
        """Encode the pages (distinct indices, in the order they should be sent)
        into batches of at most ``max_batch_bytes`` each.

        ``frozen=True`` promises that memory does not change until the
        batches are sent (vCPUs paused), which makes every page exact."""
        idx = self._checked(page_indices)
        if idx.size > 1:
            ordered = np.all(idx[1:] > idx[:-1])
            if not ordered and np.unique(idx).size != idx.size:
                raise CodecUsageError("page indices passed to encode() must be distinct")
        per_batch = bf.max_pages_per_batch(max_batch_bytes)
        if per_batch < 1:
            raise CodecUsageError(
                f"max_batch_bytes={max_batch_bytes} cannot hold one page "
                f"(needs {bf.HEADER.size + bf.RUN_BYTES + PAGE_SIZE})")
        return self._batches(idx, per_batch, max_batch_bytes, frozen)

    def _batches(self, idx, per_batch, max_batch_bytes, frozen) -> Iterator[bf.EncodedBatch]:
        """Encode chunks sized by the bytes per page the last chunk needed:
        pages that travel small (ZERO, DUP, DELTA, BLOCK) are taken up to
        ``_MAX_CHUNK_FACTOR`` times as many at once as fit in a batch when
        all RAW, since much of the cost of a batch is per batch, not per
        page. A chunk that turns out larger is cut into several batches."""
        pos = 0
        while pos < idx.size:
            n = per_batch
            if self._bytes_per_page is not None:
                want = int(max_batch_bytes / max(self._bytes_per_page, 1.0))
                n = min(max(per_batch, want), per_batch * _MAX_CHUNK_FACTOR)
            chunk = idx[pos:pos + n]
            pos += chunk.size
            yield from self._encode_chunk(chunk, frozen, max_batch_bytes)

    def _checked(self, page_indices) -> np.ndarray:
        idx = as_indices(page_indices)
        if idx.size and (idx.min() < 0 or idx.max() >= self.npages):
            raise CodecUsageError(f"page index out of range [0, {self.npages})")
        return idx

    def _encode_chunk(self, idx: np.ndarray, frozen: bool, max_batch_bytes: int
                      ) -> list[bf.EncodedBatch]:
        cfg = self.config
        mem = self.memory.pages
        n = idx.size
        enc = np.full(n, bf.RAW, dtype=np.uint8)
        h = np.empty(n, dtype=np.uint64)
        exact = np.zeros(n, dtype=np.bool_)
        kind = np.zeros(n, dtype=np.int8)
        row = idx.copy()  # row of each page in its source array (memory, slab, staging)
        masks = np.full(n, FULL_MASK, dtype=np.uint16)  # blocks changed since last sent

        zero = zero_scan(mem, idx) if cfg.enabled("zero") else np.zeros(n, dtype=np.bool_)
        enc[zero] = bf.ZERO
        h[zero] = ZERO_PAGE_HASH
        exact[zero] = True
        if self._fp is not None and zero.any():
            self._fp.set_zero(idx[zero])
        nz = np.flatnonzero(~zero)

        delta_len = np.full(n, -1, dtype=np.int64)
        delta_data = b""
        if self.delta_enabled and nz.size:
            delta_data = self._snapshot_and_delta(idx, nz, enc, h, exact, kind, row, delta_len,
                                                  masks, frozen)

        staging = None
        live = nz[kind[nz] == _LIVE]
        if live.size:
            if frozen and cfg.zero_copy_raw:
                # paused guest: the bytes cannot change before they leave
                h[live] = self._hash(mem, idx[live], idx[live], masks, live)
                exact[live] = True
            else:
                if self._fp is not None:
                    staging, masks[live], h[live] = self._fp.snapshot(mem, idx[live], idx[live])
                else:
                    staging = mem[idx[live]]
                    h[live] = hash_pages(staging)
                kind[live] = _STAGING
                row[live] = np.arange(live.size)
                exact[live] = True

        dup_src = np.full(n, -1, dtype=np.int64)
        dup_hashes = b""
        if self._dup_keys.size and nz.size:
            dup_hashes = self._find_dups(idx, nz, enc, h, exact, kind, row, staging,
                                         delta_len, dup_src, frozen)

        if self._fp is not None:
            blk = np.flatnonzero((enc == bf.RAW) & exact
                                 & (block_counts(masks) <= _BLOCK_MAX_BLOCKS))
            if blk.size and not self._lz4_beats_block(blk, masks, idx, kind, row, staging):
                enc[blk] = bf.BLOCK

        batches = [self._assemble(*part) for part in self._split(
            max_batch_bytes, idx, enc, kind, row, staging, delta_len, delta_data, dup_src,
            dup_hashes, masks)]
        if self.delta_enabled and self._fp is not None and staging is not None:
            # only now: new cache entries may evict slots this chunk's pages
            # were read from while the batches were assembled
            self._cache_unblockable(idx, np.flatnonzero(kind == _STAGING), masks, row, staging)
        self._record(idx, enc, h, exact, zero)
        self._bytes_per_page = sum(b.nbytes for b in batches) / idx.size
        return batches

    @staticmethod
    def _split(max_batch_bytes, idx, enc, kind, row, staging, delta_len, delta_data, dup_src,
               dup_hashes, masks):
        """Cut a chunk's positions into pieces whose batches cannot exceed
        ``max_batch_bytes`` (each page counted at its largest: RAW for LZ4
        candidates, a run-table entry of its own), and yield the per-piece
        arguments of :meth:`_assemble`. DUP sources are always earlier
        positions, so they land in an earlier or the same batch."""
        n = idx.size
        size = np.full(n, PAGE_SIZE + bf.RUN_BYTES, dtype=np.int64)
        size[enc == bf.ZERO] = bf.RUN_BYTES
        size[enc == bf.DUP] = bf.DUP_ENTRY_BYTES + bf.RUN_BYTES
        dl = enc == bf.DELTA
        size[dl] = delta_len[dl] + 2 + bf.RUN_BYTES
        bl = enc == bf.BLOCK
        size[bl] = block_page_bytes(masks[bl]) + bf.RUN_BYTES
        ends = np.cumsum(size)
        if int(ends[-1]) + bf.HEADER.size <= max_batch_bytes:
            yield idx, enc, kind, row, staging, delta_len, delta_data, dup_src, dup_hashes, masks
            return
        delta_off = np.concatenate(([0], np.cumsum(np.maximum(delta_len, 0))))
        dup_off = np.concatenate(([0], np.cumsum(dup_src >= 0)))
        a = 0
        while a < n:
            base = int(ends[a - 1]) if a else 0
            b = int(np.searchsorted(ends, base + max_batch_bytes - bf.HEADER.size, "right"))
            b = max(b, a + 1)
            dd = delta_data[int(delta_off[a]):int(delta_off[b])]
            dh = dup_hashes[16 * int(dup_off[a]):16 * int(dup_off[b])]
            yield (idx[a:b], enc[a:b], kind[a:b], row[a:b], staging, delta_len[a:b], dd,
                   dup_src[a:b], dh, masks[a:b])
            a = b

    def _hash(self, pages, rows, page_indices, masks, pos) -> np.ndarray:
        """Hashes of ``pages[rows]`` (the bytes that will be sent for
        ``page_indices``, batch positions ``pos``); with BLOCK on, also their
        changed-block masks, from the same pass."""
        if self._fp is None:
            return hash_pages(pages, rows)
        masks[pos], hashes = self._fp.update(pages, rows, page_indices)
        return hashes

    def _snapshot_and_delta(self, idx, nz, enc, h, exact, kind, row, delta_len,
                            masks, frozen) -> bytes:
        """Snapshot re-sent pages into the delta cache; DELTA-encode the ones
        that had a base. Returns the concatenated deltas (position order).
        With memory frozen (the final round) only pages that already have a
        base are touched: caching others would serve no later round and costs
        a page copy each inside the downtime. With BLOCK on, only pages that
        have a base are touched here too; others enter the cache later, from
        their staging copy, and only if BLOCK would not have served them
        (:meth:`_cache_unblockable`)."""
        cache = self._cache
        mem = self.memory.pages
        cand = nz[self._sent[idx[nz]]]
        if (frozen or self._fp is not None) and cand.size:
            cand = cand[cache.lookup(idx[cand]) >= 0]
        if not cand.size:
            return b""
        had = cache.lookup(idx[cand]) >= 0
        slots = cache.assign(idx[cand])
        ok = slots >= 0
        cand, had, slots = cand[ok], had[ok], slots[ok]
        data = b""
        fresh = ~had
        if fresh.any():
            cache.slab[slots[fresh]] = mem[idx[cand[fresh]]]
        if had.any():
            dpos = cand[had]
            data, lens = delta_encode(mem, idx[dpos], cache.slab, slots[had],
                                      self.config.delta_max_page_bytes)
            delta_len[dpos] = lens
            enc[dpos[lens >= 0]] = bf.DELTA
        kind[cand] = _SLAB
        row[cand] = slots
        h[cand] = self._hash(cache.slab, slots, idx[cand], masks, cand)
        exact[cand] = True
        return data

    def _lz4_beats_block(self, pos, masks, idx, kind, row, staging) -> bool:
        """Would LZ4 send these pages in fewer bytes than BLOCK? Judged on up to
        ``_LZ4_PROBE_CHUNKS`` sample pages: a page that is mostly zeros with a
        few words set (the toy workloads' own memory) compresses to a few
        dozen bytes, less than one 256-byte block; random data does not
        compress at all, and is then probed again only every few batches."""
        if not self.config.enabled("lz4") or self._lz4_skip_batches > 0:
            return False
        sample = pos[np.linspace(0, pos.size - 1, min(_LZ4_PROBE_CHUNKS, pos.size)).astype(np.int64)]
        lz4_bytes = block_bytes = 0
        for p in np.unique(sample).tolist():
            data = self._content(p, 1, idx, kind, row, staging)
            lz4_bytes += len(lz4.block.compress(data, store_size=False))
            block_bytes += int(block_page_bytes(masks[p:p + 1])[0])
        return lz4_bytes < block_bytes

    def _cache_unblockable(self, idx, live, masks, row, staging) -> None:
        """Put re-sent pages with too many changed blocks for BLOCK into the
        delta cache, copied from their staging rows (they are still sent from
        staging). Next time they may go as DELTA; pages BLOCK serves stay out,
        so a guest dirtying all of memory does not churn the cache."""
        pos = live[self._sent[idx[live]] & (block_counts(masks[live]) > _BLOCK_MAX_BLOCKS)]
        if not pos.size:
            return
        slots = self._cache.assign(idx[pos])
        ok = slots >= 0
        self._cache.slab[slots[ok]] = staging[row[pos[ok]]]

    def _find_dups(self, idx, nz, enc, h, exact, kind, row, staging, delta_len, dup_src,
                   frozen) -> bytes:
        """Mark DUP pages in ``dup_src`` (source page index); return their xxh3-128s."""
        mask = np.uint64(self._dup_keys.size - 1)
        tiny_delta = (enc[nz] == bf.DELTA) & (delta_len[nz] + 2 <= bf.DUP_ENTRY_BYTES)
        cand = nz[~tiny_delta]
        if cand.size:
            slot = (h[cand] & mask).astype(np.int64)
            src = self._dup_pages[slot]
            hit = (src >= 0) & (self._dup_keys[slot] == h[cand])
            safe = np.where(hit, src, 0)
            self._in_batch[idx] = True
            hit &= (self._exact[safe] & (self.sent_hashes.values[safe] == h[cand])
                    & (~self._in_batch[safe] | (safe == idx[cand])))
            self._in_batch[idx] = False
            dup_src[cand[hit]] = src[hit]
            # an earlier exact, non-DUP page of this batch with the same content
            rest = cand[~hit]
            elig = nz[exact[nz] & (dup_src[nz] < 0)]
            if rest.size and elig.size:
                uniq, first = np.unique(h[elig], return_index=True)
                first_pos = elig[first]
                k = np.minimum(np.searchsorted(uniq, h[rest]), uniq.size - 1)
                m = (uniq[k] == h[rest]) & (first_pos[k] < rest)
                dup_src[rest[m]] = idx[first_pos[k[m]]]
        dpos = np.flatnonzero(dup_src >= 0)
        if not dpos.size:
            return b""
        mem = self.memory.pages
        content = np.empty((dpos.size, PAGE_SIZE), dtype=np.uint8)
        k = kind[dpos]
        if self._cache is not None:
            content[k == _SLAB] = self._cache.slab[row[dpos[k == _SLAB]]]
        if staging is not None:
            content[k == _STAGING] = staging[row[dpos[k == _STAGING]]]
        content[k == _LIVE] = mem[idx[dpos[k == _LIVE]]]
        if not frozen:
            # live pages may have changed since they were hashed: keep only
            # those whose snapshot still has the hash we matched on
            racy = k == _LIVE
            if racy.any():
                same = np.ones(dpos.size, dtype=np.bool_)
                same[racy] = hash_pages(content[racy]) == h[dpos[racy]]
                dup_src[dpos[~same]] = -1
                dpos, content = dpos[same], content[same]
        enc[dpos] = bf.DUP
        exact[dpos] = True
        return b"".join([xxhash.xxh3_128_digest(content[i]) for i in range(dpos.size)])

    # -- wire assembly -------------------------------------------------------------
    def _content(self, pos0: int, count: int, idx, kind, row, staging):
        """The bytes of ``count`` pages starting at batch position ``pos0`` (one source kind)."""
        k = kind[pos0]
        if k == _LIVE:
            first = int(idx[pos0])
            return memoryview(self.memory.bytes[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
        if k == _STAGING:
            r = int(row[pos0])
            return memoryview(staging[r:r + count]).cast("B")
        return memoryview(self._cache.slab[row[pos0:pos0 + count]]).cast("B")

    def _assemble(self, idx, enc, kind, row, staging, delta_len, delta_data, dup_src,
                  dup_hashes, masks) -> bf.EncodedBatch:
        cfg = self.config
        n = idx.size
        brk = np.ones(n, dtype=np.bool_)
        brk[1:] = (np.diff(idx) != 1) | (enc[1:] != enc[:-1]) | (kind[1:] != kind[:-1])
        run_pos = np.flatnonzero(brk)
        run_cnt = np.diff(np.append(run_pos, n))
        # RAW candidates are cut into LZ4-sized chunks
        run_enc = enc[run_pos]
        is_raw = run_enc == bf.RAW
        if is_raw.any() and run_cnt[is_raw].max() > cfg.lz4_chunk_pages:
            pieces = np.where(is_raw, (run_cnt + cfg.lz4_chunk_pages - 1) // cfg.lz4_chunk_pages, 1)
            owner = np.repeat(np.arange(run_pos.size), pieces)
            k = np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            step = np.where(is_raw[owner], cfg.lz4_chunk_pages, 0)
            run_pos = run_pos[owner] + k * step
            run_cnt = np.where(is_raw[owner], np.minimum(cfg.lz4_chunk_pages,
                                                         run_cnt[owner] - k * step), run_cnt[owner])
            run_enc = enc[run_pos]
        nruns = run_pos.size
        pbytes = np.zeros(nruns, dtype=np.int64)
        pbytes[run_enc == bf.DUP] = run_cnt[run_enc == bf.DUP] * bf.DUP_ENTRY_BYTES
        pbytes[run_enc == bf.RAW] = run_cnt[run_enc == bf.RAW] * PAGE_SIZE

        sections: dict[int, list] = {e: [] for e in bf.SECTION_ORDER}
        if dup_hashes:
            dpos = np.flatnonzero(enc == bf.DUP)
            entries = np.empty(dpos.size, dtype=bf.DUP_DTYPE)
            entries["hash"] = np.frombuffer(dup_hashes, dtype="V16")
            entries["source"] = dup_src[dpos]
            sections[bf.DUP].append(entries.tobytes())
        dl_pos = np.flatnonzero(enc == bf.DELTA)
        if dl_pos.size:
            lens = delta_len[dl_pos]
            used = np.flatnonzero(delta_len >= 0)  # positions whose delta is in delta_data
            keep = np.repeat(enc[used] == bf.DELTA, delta_len[used])
            data = np.frombuffer(delta_data, dtype=np.uint8)[keep] if keep.size else b""
            sections[bf.DELTA] += [lens.astype("<u2").tobytes(), memoryview(data)]
            per_pos = np.zeros(n, dtype=np.int64)
            per_pos[dl_pos] = lens + 2
            dl_runs = run_enc == bf.DELTA
            sums = np.add.reduceat(per_pos, run_pos) if nruns else per_pos[:0]
            pbytes[dl_runs] = sums[dl_runs]
        bl_pos = np.flatnonzero(enc == bf.BLOCK)
        if bl_pos.size:
            sections[bf.BLOCK] = self._block_section(bl_pos, masks[bl_pos], idx, kind, row,
                                                     staging)
            per_pos = np.zeros(n, dtype=np.int64)
            per_pos[bl_pos] = block_page_bytes(masks[bl_pos])
            bl_runs = run_enc == bf.BLOCK
            sums = np.add.reduceat(per_pos, run_pos) if nruns else per_pos[:0]
            pbytes[bl_runs] = sums[bl_runs]

        raw_runs = np.flatnonzero(run_enc == bf.RAW)
        if cfg.enabled("lz4") and raw_runs.size and self._lz4_worth_trying() and self._lz4_pays(
                raw_runs, run_pos, run_cnt, idx, kind, row, staging):
            saving = 1.0 - cfg.lz4_min_saving_pct / 100.0
            for r in raw_runs.tolist():
                pos0, cnt = int(run_pos[r]), int(run_cnt[r])
                comp = lz4.block.compress(self._content(pos0, cnt, idx, kind, row, staging),
                                          store_size=False)
                if len(comp) <= saving * cnt * PAGE_SIZE:
                    run_enc[r] = bf.LZ4
                    pbytes[r] = len(comp)
                    sections[bf.LZ4].append(comp)
                    enc[pos0:pos0 + cnt] = bf.LZ4
            raw_runs = np.flatnonzero(run_enc == bf.RAW)
        if raw_runs.size:
            sections[bf.RAW] = self._raw_section(raw_runs, run_pos, run_cnt, idx, kind, row,
                                                 staging)
        table = np.zeros(nruns, dtype=bf.RUN_DTYPE)
        table["first"] = idx[run_pos]
        table["count"] = run_cnt
        table["encoding"] = run_enc
        table["payload_bytes"] = pbytes
        payload_bytes = int(pbytes.sum())
        head = bf.HEADER.pack(bf.MAGIC, bf.VERSION, 0, 0, nruns, n, payload_bytes) + table.tobytes()
        chunks = [head]
        for e in bf.SECTION_ORDER:
            chunks += sections[e]
        batch = bf.EncodedBatch(chunks=chunks, npages=n, nbytes=len(head) + payload_bytes,
                                page_indices=idx, nruns=nruns)
        for code, name in bf.NAMES.items():
            sel = run_enc == code
            batch.pages_by_encoding[name] = int(run_cnt[sel].sum())
            batch.bytes_by_encoding[name] = int(pbytes[sel].sum())
        return batch

    def _block_section(self, pos, masks, idx, kind, row, staging) -> list:
        """BLOCK payload: the masks, then the changed blocks of each page, read
        from the bytes that were fingerprinted (staging, slab or frozen memory)."""
        sizes = block_counts(masks) * BLOCK_BYTES
        offsets = np.cumsum(sizes) - sizes
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        k = kind[pos]
        for code, pages in ((_LIVE, self.memory.pages), (_STAGING, staging),
                            (_SLAB, None if self._cache is None else self._cache.slab)):
            sel = k == code
            if sel.any():
                rows = idx[pos[sel]] if code == _LIVE else row[pos[sel]]
                gather_blocks(pages, rows, masks[sel], offsets[sel], out)
        return [masks.astype("<u2").tobytes(), memoryview(out)]

    def _raw_section(self, raw_runs, run_pos, run_cnt, idx, kind, row, staging) -> list:
        """RAW payload chunks: long live runs (and staging runs) as views, every
        stretch of other runs gathered with one numpy copy."""
        k = kind[run_pos[raw_runs]]
        view = ((k == _LIVE) & (run_cnt[raw_runs] >= _ZERO_COPY_MIN_PAGES)) | (k == _STAGING)
        seg_start = view.copy()
        seg_start[0] = True
        seg_start[1:] |= view[:-1]
        bounds = np.append(np.flatnonzero(seg_start), raw_runs.size)
        chunks = []
        mem = self.memory.pages
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            runs = raw_runs[a:b]
            if view[a]:
                chunks.append(self._content(int(run_pos[runs[0]]), int(run_cnt[runs[0]]),
                                            idx, kind, row, staging))
                continue
            pos = indices_of_runs(run_pos[runs], run_cnt[runs])
            pk = kind[pos]
            if np.all(pk == _LIVE):
                data = mem[idx[pos]]
            else:
                data = np.empty((pos.size, PAGE_SIZE), dtype=np.uint8)
                data[pk == _LIVE] = mem[idx[pos[pk == _LIVE]]]
                if self._cache is not None:
                    data[pk == _SLAB] = self._cache.slab[row[pos[pk == _SLAB]]]
            chunks.append(memoryview(data).cast("B"))
        return chunks

    def _lz4_worth_trying(self) -> bool:
        """After a batch whose probe said LZ4 does not pay, skip probing the next
        few: incompressible memory would otherwise have a share of every batch
        compressed only to learn that again."""
        if self._lz4_skip_batches > 0:
            self._lz4_skip_batches -= 1
            return False
        return True

    def _lz4_pays(self, raw_runs, run_pos, run_cnt, idx, kind, row, staging) -> bool:
        """Compress a few chunks spread over the batch and decide for the whole
        batch. Skip LZ4 when none of them would be sent compressed (random data
        costs ~2 us per page to compress for nothing), and, on a link whose
        bandwidth is known, when compressing (and decompressing, taken as half
        as much again) takes longer than sending the bytes it saves."""
        saving = 1.0 - self.config.lz4_min_saving_pct / 100.0
        probe = raw_runs[np.linspace(0, raw_runs.size - 1,
                                     min(_LZ4_PROBE_CHUNKS, raw_runs.size)).astype(np.int64)]
        worth = False
        in_bytes = saved_bytes = 0
        t0 = self._clock() if self._clock is not None else 0.0
        for r in np.unique(probe).tolist():
            data = self._content(int(run_pos[r]), int(run_cnt[r]), idx, kind, row, staging)
            out_len = len(lz4.block.compress(data, store_size=False))
            in_bytes += len(data)
            saved_bytes += max(0, len(data) - out_len)
            worth = worth or out_len <= saving * len(data)
        if worth and self.link_bytes_per_s and self._clock is not None:
            cpu_s = 1.5 * (self._clock() - t0)
            worth = saved_bytes / self.link_bytes_per_s > cpu_s
        if not worth:
            self._lz4_skip_batches = _LZ4_SKIP_AFTER_MISS
        return worth

    def _record(self, idx, enc, h, exact, zero) -> None:
        """Remember what the receiver now holds."""
        self.sent_hashes.values[idx] = h
        self._exact[idx] = exact
        self._sent[idx] = True
        if self._fp is not None:
            self._fp.valid[idx] = exact
        if self._cache is not None and zero.any():
            self._cache.drop(idx[zero])
        if self._dup_keys.size:
            ins = np.flatnonzero(exact & ~zero)
            slot = (h[ins] & np.uint64(self._dup_keys.size - 1)).astype(np.int64)
            self._dup_keys[slot] = h[ins]
            self._dup_pages[slot] = idx[ins]


__all__ = ["BatchEncoder", "BatchDecoder", "MemoryPlacer"]

import numpy as np
import pytest

from livemig.codec import batchformat as bf
from livemig.codec.encoder import BatchDecoder, BatchEncoder
from livemig.config import CodecConfig
from livemig.codec.digest import PageHashes, memory_digest_full
from livemig.errors import CodecError, CodecUsageError
from livemig.native.memory import GuestMemory
from codec_helpers import TEXT, Pair, totals


@pytest.fixture
def pair():
    p = Pair(64)
    yield p
    p.close()


def rnd(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), dtype=np.uint8)


def test_zero_pages_are_zero_and_free(pair):
    (b,) = pair.send(np.arange(64))
    assert b.pages_by_encoding["zero"] == 64
    assert b.nbytes == bf.HEADER.size + bf.RUN_BYTES  # one run, no payload


def test_random_pages_go_raw_text_goes_lz4(pair):
    pair.src.pages[0:8] = rnd(8, 1)
    pair.src.pages[20:28] = TEXT
    pair.src.pages[20:28, 0] = np.arange(8)  # distinct pages, still compressible
    # LZ4 decides per run of up to lz4_chunk_pages consecutive pages
    (b,) = pair.send(np.r_[0:8, 20:28])
    assert b.pages_by_encoding["raw"] == 8
    assert b.pages_by_encoding["lz4"] == 8
    assert b.bytes_by_encoding["lz4"] < 8 * 4096 // 4
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_raw_pages_of_frozen_memory_are_zero_copy_views_of_guest_memory(pair):
    pair.src.pages[0:8] = rnd(8, 2)
    batch = next(pair.enc.encode(np.arange(8), 1 << 20, frozen=True))
    views = [c for c in batch.chunks if isinstance(c, memoryview) and c.nbytes == 8 * 4096]
    assert views, "a run of 8 random pages should be one memoryview"
    assert np.shares_memory(np.frombuffer(views[0], np.uint8), pair.src.bytes)


def test_duplicates_within_a_frozen_batch_are_dup(pair):
    pair.src.pages[0:10] = rnd(1, 3)
    (b,) = pair.send(np.arange(10), frozen=True)
    assert b.pages_by_encoding["dup"] == 9
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_live_pages_are_copied_so_the_frame_cannot_change_after_encoding(pair):
    """The frame checksum is computed when a batch is built; bytes of a running
    guest read later by the socket could contradict it. Live RAW pages are
    therefore copied at encode time; frozen memory is sent zero-copy."""
    pair.src.pages[0:10] = rnd(10, 10)
    (live,) = pair.send(np.arange(10))
    sent = live.tobytes()
    pair.src.pages[0:10] ^= 0xFF                       # the guest rewrites them
    assert live.tobytes() == sent
    (frozen,) = pair.send(np.arange(10), frozen=True)
    before = frozen.tobytes()
    pair.src.pages[0:10] ^= 0xFF
    assert frozen.tobytes() != before                  # views of guest memory: no copy


def test_live_copied_pages_can_be_dup_sources(pair):
    pair.src.pages[0:10] = rnd(1, 3)
    (b,) = pair.send(np.arange(10))
    assert b.pages_by_encoding["dup"] == 9


def test_dup_across_batches_refers_to_receiver_pages(pair):
    pair.src.pages[3] = rnd(1, 4)
    pair.send([3], frozen=True)
    pair.src.pages[40] = pair.src.pages[3]
    (b,) = pair.send([40])
    assert b.pages_by_encoding["dup"] == 1
    assert b.nbytes == bf.HEADER.size + bf.RUN_BYTES + bf.DUP_ENTRY_BYTES
    assert np.array_equal(pair.src.pages[40], pair.dst.pages[40])


NO_BLOCK = CodecConfig().without("block")


@pytest.fixture
def delta_pair():
    """A pair whose encoder has BLOCK off, so re-sent pages go through the delta cache."""
    p = Pair(64, NO_BLOCK)
    yield p
    p.close()


def test_delta_for_small_edits_of_resent_pages(delta_pair):
    pair = delta_pair
    pair.src.pages[0:16] = rnd(16, 5)
    pair.send(np.arange(16))            # round 0: zero-copy, not cached
    pair.src.pages[0:16, 100] ^= 1
    b1 = pair.send(np.arange(16))       # round 1: cached from a snapshot, no base yet
    assert totals(b1)["delta"] == 0
    pair.src.pages[0:16, 200:210] ^= 7
    b2 = pair.send(np.arange(16))       # round 2: DELTA against the snapshot
    assert totals(b2)["delta"] == 16
    assert b2[0].nbytes < 16 * 40
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_unchanged_resent_page_is_a_dup_of_itself(pair):
    pair.src.pages[5] = rnd(1, 6)
    pair.send([5], frozen=True)
    (b,) = pair.send([5])
    assert b.pages_by_encoding["dup"] + b.pages_by_encoding["delta"] == 1
    assert b.nbytes <= bf.HEADER.size + bf.RUN_BYTES + bf.DUP_ENTRY_BYTES


def test_forget_drops_dup_sources_and_delta_bases(delta_pair):
    pair = delta_pair
    pair.src.pages[0:4] = rnd(4, 7)
    pair.send(np.arange(4))
    pair.send(np.arange(4))  # now cached and exact
    pair.enc.forget([0, 1, 2, 3])
    assert len(pair.enc.delta_cache) == 0
    pair.src.pages[10] = pair.src.pages[0]
    pair.src.pages[0:4, 7] ^= 1
    t = totals(pair.send([0, 1, 2, 3, 10]))
    assert t["dup"] == 0 and t["delta"] == 0


def test_set_delta_off_stops_delta(delta_pair):
    pair = delta_pair
    pair.src.pages[0:4] = rnd(4, 8)
    pair.send(np.arange(4))
    pair.send(np.arange(4))
    pair.enc.set_delta(False)
    pair.src.pages[0:4, 9] ^= 1
    t = totals(pair.send(np.arange(4)))
    assert t["delta"] == 0
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_delta_cache_is_bounded():
    p = Pair(128, CodecConfig(delta_cache_bytes=8 * 4096).without("block"))
    try:
        p.src.pages[:] = rnd(128, 9)
        for r in range(4):
            p.src.pages[:, r] ^= 1
            p.send(np.arange(128), max_batch_bytes=64 << 10)
            cache = p.enc.delta_cache
            assert len(cache) <= 8 and cache.slab.nbytes == 8 * 4096
            held = np.flatnonzero(cache.slot_of >= 0)
            assert np.array_equal(np.sort(cache.page_of[cache.page_of >= 0]), held)
        assert np.array_equal(p.src.bytes, p.dst.bytes)
    finally:
        p.close()


def test_block_sends_only_the_changed_blocks_of_resent_pages(pair):
    pair.src.pages[0:16] = rnd(16, 11)
    pair.send(np.arange(16))
    pair.src.pages[0:16, 300] ^= 1              # one word in block 1
    pair.src.pages[0:8, 4000] ^= 1              # and block 15 of half of them
    (b,) = pair.send(np.arange(16))
    assert b.pages_by_encoding["block"] == 16
    assert b.bytes_by_encoding["block"] == 16 * 2 + (16 + 8) * 256
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)
    assert np.array_equal(pair.enc.sent_hashes.values, pair.dec.hashes.values)


def test_block_is_not_used_when_most_blocks_changed_or_the_receiver_copy_is_unknown(pair):
    pair.src.pages[0:4] = rnd(4, 12)
    pair.send(np.arange(4))
    pair.src.pages[0:4] = rnd(4, 13)            # every block changed: RAW
    assert totals(pair.send(np.arange(4)))["block"] == 0
    pair.enc.forget([0, 1])
    pair.src.pages[0:4, 7] ^= 1                 # forgotten pages cannot be BLOCK;
    t = totals(pair.send(np.arange(4)))         # the others entered the delta cache
    assert t["raw"] == 2 and t["delta"] == 2 and t["block"] == 0
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_block_fingerprints_follow_zero_pages_and_the_delta_cache(pair):
    """A page sent as ZERO, or DELTA/RAW from the cache, leaves a fingerprint
    of exactly what the receiver holds."""
    pair.src.pages[0:4] = rnd(4, 14)
    pair.send(np.arange(4))
    pair.src.pages[0] = 0                        # ZERO, then one word set
    pair.src.pages[1:4] = rnd(3, 15)             # RAW, and cached (too many blocks)
    pair.send(np.arange(4))
    assert len(pair.enc.delta_cache) == 3
    pair.src.pages[0, 5] = 9
    pair.src.pages[1:4, 2000] ^= 3
    t = totals(pair.send(np.arange(4)))
    assert t["block"] == 1 and t["delta"] == 3
    pair.src.pages[1:4, 10] ^= 3                 # base refreshed by the DELTA send
    t = totals(pair.send(np.arange(4)))
    assert t["delta"] == 3
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_pages_lz4_shrinks_below_a_block_go_lz4_not_block(pair):
    """Mostly-zero pages with a few words set compress to a few dozen bytes:
    less than one 256-byte block, so LZ4 is chosen over BLOCK."""
    pair.src.pages[0:16, 0:8] = np.arange(8, dtype=np.uint8)
    pair.src.pages[0:16, 10] = np.arange(16, dtype=np.uint8)   # distinct pages: no DUP
    pair.send(np.arange(16))
    pair.src.pages[0:16, 300] = 7
    t = totals(pair.send(np.arange(16)))
    assert t["lz4"] == 16 and t["block"] == 0
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_block_pages_refused_by_a_postcopy_placer(pair):
    pair.src.pages[0:2] = rnd(2, 16)
    pair.send(np.arange(2))
    pair.src.pages[0:2, 1] ^= 1
    (b,) = pair.enc.encode(np.arange(2), 1 << 20)
    assert b.pages_by_encoding["block"] == 2

    class NoBase:
        hash_after_place = False
        supports_delta = False

    with pytest.raises(CodecError, match="BLOCK"):
        BatchDecoder(pair.dst, NoBase()).apply(b.tobytes())


def test_small_pages_are_taken_many_at_once_and_a_chunk_that_grows_is_cut():
    """After a chunk of small (BLOCK) pages the encoder takes more pages at
    once; when those turn out large (RAW, DELTA, DUP mixed) the chunk is cut
    into batches that still respect the limit, and everything lands."""
    p = Pair(512, CodecConfig(delta_cache_bytes=64 * 4096))
    try:
        p.src.pages[:] = rnd(512, 17)
        p.send(np.arange(512), max_batch_bytes=64 << 10)
        p.src.pages[:, 9] ^= 1
        small = p.send(np.arange(512), max_batch_bytes=64 << 10)
        assert max(b.npages for b in small) > bf.max_pages_per_batch(64 << 10)
        p.src.pages[0:300] = rnd(300, 18)          # RAW, then cached for DELTA
        p.src.pages[300:310] = p.src.pages[400]    # DUP of an earlier-sent page
        big = p.send(np.r_[0:512], max_batch_bytes=64 << 10)
        assert all(b.nbytes <= 64 << 10 for b in big)
        p.src.pages[0:300, 5] ^= 1
        t = totals(p.send(np.arange(512), max_batch_bytes=64 << 10))
        assert t["delta"] > 0 and t["block"] > 0
        assert np.array_equal(p.src.bytes, p.dst.bytes)
        assert np.array_equal(p.enc.sent_hashes.values, p.dec.hashes.values)
    finally:
        p.close()


def test_cache_entries_made_for_a_chunk_never_evict_the_slots_it_is_sent_from():
    """A page sent from its delta-cache slot (DELTA too large: RAW from the
    slab) and, in the same chunk, new pages entering a full cache: the new
    entries are made only after the batch is built, so the slot still holds
    that page's bytes when they are read."""
    cfg = CodecConfig(encodings=("dup", "zero", "block", "delta"), delta_cache_bytes=4 * 4096,
                      dup_cache_entries=0, zero_copy_raw=False)
    p = Pair(32, cfg)
    try:
        p.send(np.arange(5))                            # all ZERO
        p.src.pages[[0, 3, 4]] = rnd(3, 19)             # every block changed: cached
        p.send([0, 3, 4])
        p.src.pages[0] = rnd(1, 20)                     # from its slot, RAW
        p.src.pages[1:3] = rnd(2, 21)                   # enter the full cache
        t = totals(p.send([0, 1, 2]))
        assert t["raw"] == 3
        assert np.array_equal(p.src.bytes, p.dst.bytes)
    finally:
        p.close()


def test_batches_respect_max_bytes():
    p = Pair(256)
    try:
        p.src.pages[:] = rnd(256, 10)
        batches = p.send(np.arange(0, 256, 2), max_batch_bytes=64 << 10)
        assert len(batches) > 1 and all(b.nbytes <= 64 << 10 for b in batches)
    finally:
        p.close()


def test_usage_errors(pair):
    with pytest.raises(CodecUsageError):
        pair.enc.encode([3, 1, 3], 1 << 20)
    with pytest.raises(CodecUsageError):
        pair.enc.encode([64], 1 << 20)
    with pytest.raises(CodecUsageError):
        pair.enc.encode([1], 4096)


def test_digest_after_multiround_transfer_with_writes_in_flight():
    """A guest writes pages between encoding and sending; the dirty pages are
    sent again; after a final frozen round both digests equal a full rehash."""
    p = Pair(256, CodecConfig(delta_cache_bytes=64 * 4096))
    rng = np.random.default_rng(11)
    try:
        src = p.src
        src.pages[:64] = rnd(64, 12)
        src.pages[64:128] = TEXT
        src.pages[128:160] = src.pages[0]  # many duplicates
        dirty = set()

        def guest_writes():
            pages = rng.integers(0, 256, 6)
            for pg in pages.tolist():
                if rng.random() < 0.5:
                    src.pages[pg] = src.pages[int(rng.integers(0, 256))]  # make duplicates
                else:
                    src.pages[pg, rng.integers(0, 4096, 3)] ^= 0xA5
            dirty.update(pages.tolist())

        todo = np.arange(256)
        for _ in range(5):
            dirty.clear()
            p.send(todo, max_batch_bytes=64 << 10, mutate=guest_writes)
            todo = np.array(sorted(dirty), dtype=np.int64)
        p.send(todo, frozen=True)  # vCPUs paused: the last dirty pages
        assert np.array_equal(src.bytes, p.dst.bytes)
        assert p.enc.sent_hashes.digest() == p.dec.hashes.digest()
        assert p.dec.hashes.digest() == PageHashes.of_memory(p.dst.pages).digest()
        assert memory_digest_full(src) == memory_digest_full(p.dst)
    finally:
        p.close()


class RecordingPlacer:
    """A placer like post-copy's: may not read memory back, no DELTA."""

    hash_after_place = False
    supports_delta = False

    def __init__(self, memory):
        self.memory = memory
        self.calls = []

    def place_runs(self, starts, counts, staging):
        assert staging.flags.c_contiguous and staging.shape == (int(counts.sum()), 4096)
        row = 0
        for s, c in zip(starts.tolist(), counts.tolist()):
            self.calls.append(("copy", s, c))
            self.memory.pages[s:s + c] = staging[row:row + c]
            row += c

    def place_zero_runs(self, starts, counts):
        for s, c in zip(starts.tolist(), counts.tolist()):
            self.calls.append(("zero", s, c))
            self.memory.pages[s:s + c] = 0


def test_custom_placer_gets_contiguous_runs_and_hashes_come_from_staging():
    src = GuestMemory(32 * 4096, hugepages=False)
    dst = GuestMemory(32 * 4096, hugepages=False)
    placer = RecordingPlacer(dst)
    enc = BatchEncoder(src, CodecConfig())
    enc.set_postcopy()
    dec = BatchDecoder(dst, placer)
    src.pages[0:10] = rnd(10, 13)
    src.pages[20:30] = TEXT
    for b in enc.encode(np.arange(32), 1 << 20, frozen=True):
        dec.apply(b.tobytes())
    assert ("copy", 0, 10) in placer.calls and ("zero", 10, 10) in placer.calls
    assert np.array_equal(src.bytes, dst.bytes)
    assert enc.sent_hashes.digest() == dec.hashes.digest()
    # a DELTA batch cannot be applied without a base copy
    full = Pair(8, NO_BLOCK)
    try:
        full.src.pages[0] = rnd(1, 14)
        full.send([0])
        full.send([0])
        full.src.pages[0, 5] ^= 1
        (b,) = list(full.enc.encode([0], 1 << 20))
        assert b.pages_by_encoding["delta"] == 1
        with pytest.raises(CodecError, match="DELTA"):
            BatchDecoder(dst, placer).apply(b.tobytes())
    finally:
        full.close()
        src.close()
        dst.close()


# -- malformed batches ---------------------------------------------------------
def _batch(pair, pages, **kw):
    return next(pair.enc.encode(np.asarray(pages), 1 << 20, **kw)).tobytes()


def _table(data):
    n = bf.HEADER.unpack_from(data)[4]
    return np.frombuffer(bytearray(data[bf.HEADER.size:bf.HEADER.size + n * bf.RUN_BYTES]),
                         dtype=bf.RUN_DTYPE).copy()


def _with_table(data, table):
    n = table.size
    return data[:bf.HEADER.size] + table.tobytes() + data[bf.HEADER.size + n * bf.RUN_BYTES:]


@pytest.mark.parametrize("edit", ["magic", "version", "encoding", "range", "count", "reserved",
                                  "truncate", "extra"])
def test_malformed_batches_raise_codec_error_and_change_nothing(pair, edit):
    pair.src.pages[0:4] = rnd(4, 15)
    data = _batch(pair, np.arange(4))
    t = _table(data)
    if edit == "magic":
        bad = b"XXXX" + data[4:]
    elif edit == "version":
        bad = data[:4] + b"\x09" + data[5:]
    elif edit == "encoding":
        t["encoding"][0] = 9
        bad = _with_table(data, t)
    elif edit == "range":
        t["first"][0] = 62
        bad = _with_table(data, t)
    elif edit == "count":
        t["count"][0] = 3
        bad = _with_table(data, t)
    elif edit == "reserved":
        t["r1"][0] = 1
        bad = _with_table(data, t)
    elif edit == "truncate":
        bad = data[:-1]
    else:
        bad = data + b"\0"
    with pytest.raises(CodecError):
        pair.dec.apply(bad)
    assert not pair.dst.bytes.any()


def test_dup_hash_mismatch_is_detected(pair):
    pair.src.pages[0] = rnd(1, 16)
    pair.send([0], frozen=True)
    pair.src.pages[9] = pair.src.pages[0]
    data = bytearray(_batch(pair, [9]))
    assert _table(bytes(data))["encoding"][0] == bf.DUP
    data[-1 - 8] ^= 0xFF  # last byte of the 16-byte hash
    with pytest.raises(CodecError, match="DUP"):
        pair.dec.apply(bytes(data))
    assert not pair.dst.pages[9].any()


def test_lz4_garbage_is_detected(pair):
    pair.src.pages[0:4] = TEXT
    pair.src.pages[0:4, 0] = np.arange(4)
    data = bytearray(_batch(pair, np.arange(4)))
    assert _table(bytes(data))["encoding"][0] == bf.LZ4
    start = bf.HEADER.size + bf.RUN_BYTES
    data[start:start + 8] = b"\xff" * 8
    with pytest.raises(CodecError):
        pair.dec.apply(bytes(data))
    assert not pair.dst.bytes.any()


def test_postcopy_encoder_sends_no_dup_and_postcopy_placer_refuses_dup(pair):
    pair.src.pages[0:4] = rnd(1, 17)
    (b,) = pair.send(np.arange(4), frozen=True)
    assert b.pages_by_encoding["dup"] == 3
    dup_batch = _batch(pair, [0, 1], frozen=True)  # unchanged pages: DUP of themselves
    assert _table(dup_batch)["encoding"][0] == bf.DUP
    with pytest.raises(CodecError, match="DUP"):
        BatchDecoder(pair.dst, RecordingPlacer(pair.dst)).apply(dup_batch)
    pair.enc.set_postcopy()
    pair.src.pages[10:14] = pair.src.pages[0]
    (b,) = pair.send(np.arange(10, 14), frozen=True)
    assert b.pages_by_encoding["dup"] == 0 and b.pages_by_encoding["delta"] == 0
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_after_lz4_fails_to_pay_the_next_batches_skip_the_probe(pair):
    """Incompressible memory must not have a share of every batch compressed
    just to learn again that LZ4 does not pay; probing resumes afterwards."""
    from livemig.codec.encoder import _LZ4_SKIP_AFTER_MISS

    pair.src.pages[0:16] = rnd(16, 4)
    (b,) = pair.send(np.arange(16))
    assert b.pages_by_encoding["lz4"] == 0 and b.pages_by_encoding["raw"] == 16
    pair.src.pages[16:16 + _LZ4_SKIP_AFTER_MISS + 1] = TEXT
    pair.src.pages[16:16 + _LZ4_SKIP_AFTER_MISS + 1, 0] = np.arange(_LZ4_SKIP_AFTER_MISS + 1)
    for k in range(_LZ4_SKIP_AFTER_MISS):
        (b,) = pair.send([16 + k])
        assert b.pages_by_encoding["lz4"] == 0   # not even tried
    (b,) = pair.send([16 + _LZ4_SKIP_AFTER_MISS])
    assert b.pages_by_encoding["lz4"] == 1       # probing resumed
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def _compressible(pair, n):
    pair.src.pages[0:n] = TEXT
    pair.src.pages[0:n, 0] = np.arange(n)   # distinct pages, still compressible


@pytest.mark.parametrize("seconds_per_tick, want_lz4", [(0.0, True), (10.0, False)])
def test_lz4_cost_is_weighed_on_the_injected_clock(pair, seconds_per_tick, want_lz4):
    """With a known link, LZ4 is used only when compressing costs less time
    than the saved bytes take on the link — time as the given clock tells it."""
    ticks = []

    def clock():
        ticks.append(None)
        return len(ticks) * seconds_per_tick

    pair.enc = BatchEncoder(pair.src, CodecConfig(), clock=clock)
    pair.enc.link_bytes_per_s = 1e6
    _compressible(pair, 8)
    (b,) = pair.send(np.arange(8))
    assert ticks, "the encoder must time the probe on the clock it was given"
    assert (b.pages_by_encoding["lz4"] == 8) is want_lz4
    assert np.array_equal(pair.src.bytes, pair.dst.bytes)


def test_without_a_clock_lz4_is_judged_by_ratio_alone(pair):
    """The codec reads no clock of its own: the same input gives the same
    output, however fast the link is said to be."""
    pair.enc.link_bytes_per_s = 1e15
    _compressible(pair, 8)
    (b,) = pair.send(np.arange(8))
    assert b.pages_by_encoding["lz4"] == 8

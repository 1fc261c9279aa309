"""Round-trip properties of the page codec over arbitrary page contents."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_helpers import TEXT, Pair, totals
from livemig.config import CodecConfig
from livemig.codec.digest import PageHashes

NPAGES = 32

op = st.one_of(
    st.tuples(st.just("zero")),
    st.tuples(st.just("random"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("copy"), st.integers(0, NPAGES - 1)),
    st.tuples(st.just("edit"), st.integers(0, 4095), st.integers(1, 255), st.integers(1, 64)),
    st.tuples(st.just("text"), st.integers(0, 255)),
)
round_ops = st.lists(st.tuples(st.integers(0, NPAGES - 1), op), min_size=1, max_size=20)
configs = st.builds(
    CodecConfig,
    encodings=st.sets(st.sampled_from(["zero", "dup", "delta", "block", "lz4"])).map(tuple),
    lz4_chunk_pages=st.sampled_from([1, 3, 16]),
    zero_copy_raw=st.booleans(),
    delta_cache_bytes=st.sampled_from([0, 4 * 4096, 64 * 4096]),
    dup_cache_entries=st.sampled_from([0, 1, 64]),
)


def apply_op(pages, page, o):
    kind = o[0]
    if kind == "zero":
        pages[page] = 0
    elif kind == "random":
        pages[page] = np.random.default_rng(o[1]).integers(0, 256, 4096, dtype=np.uint8)
    elif kind == "copy":
        pages[page] = pages[o[1]]
    elif kind == "edit":
        pos, val, length = o[1], o[2], o[3]
        pages[page, pos:pos + length] ^= val
    else:
        pages[page] = TEXT
        pages[page, 0] = o[1]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1, max_size=30))
def test_small_edits_of_resent_pages_without_a_delta_base_are_block(edits):
    pair = Pair(4, CodecConfig(delta_cache_bytes=0))
    try:
        pair.src.pages[0] = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
        pair.send([0])
        for pos, val in edits:
            pair.src.pages[0, pos] ^= val
        changed = np.flatnonzero(pair.src.pages[0] != pair.dst.pages[0])
        blocks = np.unique(changed // 256).size
        (b,) = pair.send([0])
        if 0 < blocks <= 12:
            assert b.pages_by_encoding["block"] == 1
            assert b.bytes_by_encoding["block"] == 2 + 256 * blocks
        assert np.array_equal(pair.src.bytes, pair.dst.bytes)
    finally:
        pair.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.lists(round_ops, min_size=1, max_size=5), st.booleans(),
       st.sampled_from([1 << 20, 3 * 4200]), st.randoms(use_true_random=False))
def test_roundtrip_any_contents(config, rounds, frozen, max_batch_bytes, rnd):
    pair = Pair(NPAGES, config)
    try:
        for ops in rounds:
            for page, o in ops:
                apply_op(pair.src.pages, page, o)
            sent = sorted({page for page, _ in ops})
            if rnd.random() < 0.5:
                rnd.shuffle(sent)  # priority orders are not sorted
            zero_pages = int((~pair.src.pages[sent].any(axis=1)).sum())
            batches = pair.send(sent, max_batch_bytes, frozen=frozen)
            t = totals(batches)
            assert sum(t.values()) == len(sent)
            if config.enabled("zero"):
                assert t["zero"] == zero_pages
            if not config.enabled("delta") or config.delta_cache_bytes == 0:
                assert t["delta"] == 0
            if not config.enabled("dup") or config.dup_cache_entries == 0:
                assert t["dup"] == 0
            assert np.array_equal(pair.src.bytes, pair.dst.bytes)
            assert pair.enc.sent_hashes.digest() == pair.dec.hashes.digest()
        assert pair.dec.hashes.digest() == PageHashes.of_memory(pair.dst.pages).digest()
    finally:
        pair.close()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_identical_pages_in_a_frozen_batch_are_sent_once(ncopies, seed):
    pair = Pair(NPAGES)
    try:
        pair.src.pages[:ncopies] = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8)
        (b,) = pair.send(np.arange(ncopies), frozen=True)
        assert b.pages_by_encoding["dup"] == ncopies - 1
        assert np.array_equal(pair.src.bytes, pair.dst.bytes)
    finally:
        pair.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1, max_size=30))
def test_small_edits_of_resent_pages_are_delta(edits):
    pair = Pair(4, CodecConfig().without("block"))
    try:
        pair.src.pages[0] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
        pair.send([0])
        pair.send([0])
        for pos, val in edits:
            pair.src.pages[0, pos] ^= val
        changed = pair.src.pages[0] != pair.dst.pages[0]
        (b,) = pair.send([0])
        if changed.any():
            assert b.pages_by_encoding["delta"] == 1
            assert b.bytes_by_encoding["delta"] <= 2 + 3 * len(edits) + int(changed.sum())
        assert np.array_equal(pair.src.bytes, pair.dst.bytes)
    finally:
        pair.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.lists(round_ops, min_size=1, max_size=4),
       st.lists(st.lists(st.tuples(st.integers(0, NPAGES - 1), op), max_size=4), max_size=12))
def test_writes_in_flight_heal_by_the_frozen_final_round(config, rounds, in_flight):
    """The guest writes between encoding and sending (pre-copy); pages it wrote
    are re-sent next round (what a dirty tracker reports); a final frozen
    round makes memory and digests equal — whatever DUP/DELTA referred to."""
    pair = Pair(NPAGES, config)
    writes = iter(in_flight)
    dirty: set[int] = set()

    def guest():
        for page, o in next(writes, []):
            apply_op(pair.src.pages, page, o)
            dirty.add(page)
    try:
        todo = list(range(NPAGES))
        for ops in rounds:
            dirty.clear()
            for page, o in ops:
                apply_op(pair.src.pages, page, o)
                dirty.add(page)
            pair.send(todo, 3 * 4200, mutate=guest)
            todo = sorted(dirty)
        pair.send(todo, 3 * 4200, frozen=True)
        assert np.array_equal(pair.src.bytes, pair.dst.bytes)
        assert pair.enc.sent_hashes.digest() == pair.dec.hashes.digest()
    finally:
        pair.close()

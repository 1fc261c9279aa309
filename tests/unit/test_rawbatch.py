"""The post-copy fast path speaks the page-batch format: the general decoder
reads what encode_raw writes, parse_raw reads it back, and malformed input
raises CodecError or declines (None), never anything else."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.codec import batchformat as bf
from livemig.codec.decoder import BatchDecoder
from livemig.errors import CodecError
from livemig.native.memory import GuestMemory
from livemig.codec.kernels import hash_pages
from livemig.codec.rawbatch import MAX_FAST_RUNS, encode_raw, parse_raw

NPAGES = 64


@pytest.fixture(scope="module")
def source():
    mem = GuestMemory(NPAGES * 4096)
    rng = np.random.default_rng(3)
    mem.pages[:] = rng.integers(0, 256, size=(NPAGES, 4096), dtype=np.uint8)
    mem.pages[::5] = 0
    yield mem
    mem.close()


page_sets = st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=NPAGES, unique=True).map(
    lambda xs: np.array(sorted(xs), dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(pages=page_sets, use_zero=st.booleans())
def test_general_decoder_reads_fast_batches(source, pages, use_zero):
    zero = np.all(source.pages[pages] == 0, axis=1) if use_zero else None
    chunks, nbytes, raw_pages = encode_raw(source.pages, pages, zero)
    data = b"".join(bytes(c) for c in chunks)
    assert len(data) == nbytes
    with GuestMemory(NPAGES * 4096) as dst:
        dec = BatchDecoder(dst)
        out = dec.apply(data)
        assert out.npages == pages.size
        assert np.array_equal(dst.pages[pages], source.pages[pages])
        assert np.array_equal(dec.hashes.values[pages], hash_pages(source.pages, pages))
    runs = parse_raw(memoryview(data), NPAGES)
    if runs is None:   # declined: more runs than the fast path takes
        return
    got = np.concatenate([np.arange(f, f + c) for f, c, _ in runs])
    assert np.array_equal(got, pages)
    assert sum(c for f, c, v in runs if v is not None) == raw_pages
    for f, c, v in runs:
        if v is not None:
            assert bytes(v) == source.pages[f:f + c].tobytes()


def test_parse_raw_declines_other_encodings_and_too_many_runs(source):
    many = np.arange(0, NPAGES, 2)[:MAX_FAST_RUNS + 1]
    if many.size > MAX_FAST_RUNS:
        chunks, _, _ = encode_raw(source.pages, many)
        assert parse_raw(memoryview(b"".join(bytes(c) for c in chunks)), NPAGES) is None
    chunks, _, _ = encode_raw(source.pages, np.array([1, 2]))
    data = bytearray(b"".join(bytes(c) for c in chunks))
    data[bf.HEADER.size + 12] = bf.LZ4
    assert parse_raw(memoryview(bytes(data)), NPAGES) is None


@settings(max_examples=200, deadline=None)
@given(pages=page_sets, pos=st.integers(0, 200), value=st.integers(0, 255))
def test_corruption_raises_codec_error_or_declines(source, pages, pos, value):
    chunks, _, _ = encode_raw(source.pages, pages[:8])
    data = bytearray(b"".join(bytes(c) for c in chunks))
    pos %= len(data)
    data[pos] = value
    try:
        runs = parse_raw(memoryview(bytes(data)), NPAGES)
    except CodecError:
        return
    if runs is None:
        return
    for f, c, v in runs:
        assert 0 <= f and f + c <= NPAGES
        assert v is None or len(v) == c * 4096
    with pytest.raises(CodecError):   # a batch that parsed, cut short by one byte
        parse_raw(memoryview(bytes(data[:-1])), NPAGES)

"""Garbage in, only CodecError out: byte flips, truncations and splices of valid batches."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_helpers import TEXT, Pair
from livemig.codec import batchformat as bf
from livemig.codec.encoder import BatchDecoder
from livemig.errors import CodecError

NPAGES = 32


@pytest.fixture(scope="module")
def corpus():
    """A destination state and a batch using every encoding against it."""
    pair = Pair(NPAGES)
    rng = np.random.default_rng(5)
    src = pair.src
    src.pages[0:8] = rng.integers(0, 256, (8, 4096), dtype=np.uint8)
    src.pages[8:16] = TEXT
    src.pages[8:16, 0] = np.arange(8)
    pair.send(np.arange(NPAGES), frozen=True)
    src.pages[0:4] = TEXT                  # re-sent live, every block new (LZ4 pays):
    src.pages[0:4, 0] = 100 + np.arange(4)  # delta-cache snapshots
    pair.send(np.arange(4))
    src.pages[0:4, 10] ^= 1                # -> DELTA
    src.pages[4:6, 700] ^= 1               # -> BLOCK (one changed block each)
    src.pages[20] = src.pages[6]           # -> DUP of a receiver page
    src.pages[21] = 0                      # -> ZERO
    src.pages[23] = TEXT                   # -> LZ4
    src.pages[25] = rng.integers(0, 256, 4096, dtype=np.uint8)  # -> RAW
    baseline = pair.dst.bytes.copy()
    (b,) = list(pair.enc.encode(np.r_[0:6, 20:24, 25], 1 << 20, frozen=True))
    assert all(b.pages_by_encoding[e] for e in bf.NAMES.values()), \
        str(b.pages_by_encoding)
    data = b.tobytes()
    yield pair, baseline, data
    pair.close()


def _apply(corpus, payload):
    pair, baseline, _ = corpus
    pair.dst.bytes[:] = baseline
    try:
        BatchDecoder(pair.dst).apply(payload)
    except CodecError:
        return False
    return True


def test_the_corpus_batch_applies(corpus):
    assert _apply(corpus, corpus[2])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips(corpus, flips):
    data = bytearray(corpus[2])
    for pos, x in flips:
        data[pos % len(data)] ^= x
    _apply(corpus, bytes(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6))
def test_truncations_always_fail(corpus, cut):
    data = corpus[2]
    assert not _apply(corpus, data[:cut % len(data)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.binary(min_size=1, max_size=40))
def test_insertions(corpus, at, junk):
    data = corpus[2]
    at %= len(data)
    _apply(corpus, data[:at] + junk + data[at:])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_header(corpus, junk):
    header = bf.HEADER.pack(bf.MAGIC, bf.VERSION, 0, 0, len(junk) // bf.RUN_BYTES, 3,
                            len(junk) % bf.RUN_BYTES)
    _apply(corpus, header + junk)


def test_flipped_run_table_never_touches_other_runs_pages(corpus):
    """A corrupt DELTA run is rejected before any page of the batch is placed."""
    pair, baseline, data = corpus
    n = bf.HEADER.unpack_from(data)[4]
    table = np.frombuffer(data[bf.HEADER.size:bf.HEADER.size + n * bf.RUN_BYTES], bf.RUN_DTYPE)
    assert bf.DELTA in table["encoding"]
    payload_start = bf.HEADER.size + n * bf.RUN_BYTES
    dup_bytes = int(table["payload_bytes"][table["encoding"] == bf.DUP].sum())
    ndelta = int(table["count"][table["encoding"] == bf.DELTA].sum())
    bad = bytearray(data)
    bad[payload_start + dup_bytes + 2 * ndelta] = 0xFF  # first delta record: a huge skip
    bad[payload_start + dup_bytes + 2 * ndelta + 1] = 0xFF
    assert not _apply(corpus, bytes(bad))
    assert np.array_equal(pair.dst.bytes, baseline)

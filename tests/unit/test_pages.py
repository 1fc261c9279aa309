import numpy as np
import pytest

from livemig.errors import CodecError, ConfigError
from livemig.pages import (PageBitmap, chunk_indices, indices_of_runs, interleave,
                           order_near_faults, runs_of, split_runs)


def test_runs_of_and_back():
    idx = np.array([0, 1, 2, 5, 7, 8, 100])
    starts, counts = runs_of(idx)
    assert starts.tolist() == [0, 5, 7, 100]
    assert counts.tolist() == [3, 1, 2, 1]
    assert indices_of_runs(starts, counts).tolist() == idx.tolist()
    assert runs_of([])[0].size == 0


def test_split_runs():
    s, c = split_runs([0, 50], [10, 3], 4)
    assert list(zip(s.tolist(), c.tolist())) == [(0, 4), (4, 4), (8, 2), (50, 3)]
    with pytest.raises(ConfigError):
        split_runs([0], [1], 0)


def test_bitmap_set_clear_test_count_runs():
    bm = PageBitmap(20)
    bm.set([1, 2, 3, 10])
    bm.set_range(15, 5)
    bm.clear([2])
    assert bm.count() == 8
    assert bm.test([1, 2, 3]).tolist() == [True, False, True]
    assert list(bm.iter_runs()) == [(1, 1), (3, 1), (10, 1), (15, 5)]
    assert 19 in bm and 20 not in bm
    assert bm.missing().size == 12
    with pytest.raises(IndexError):
        bm.set([20])


@pytest.mark.parametrize("pattern", ["empty", "full", "dense", "alternating"])
def test_bitmap_wire_roundtrip_and_compactness(pattern):
    n = 10_000
    bm = PageBitmap(n)
    if pattern == "full":
        bm = PageBitmap.full(n)
    elif pattern == "dense":
        bm.set_range(100, 5000)
        bm.set_range(7000, 10)
    elif pattern == "alternating":
        bm.set(np.arange(0, n, 2))
    data = bm.to_bytes()
    assert PageBitmap.from_bytes(data) == bm
    assert len(data) <= 17 + (n + 7) // 8  # never worse than packbits
    if pattern in ("empty", "full", "dense"):
        assert len(data) <= 17 + 2 * 16


def test_bitmap_from_bytes_rejects_garbage():
    good = PageBitmap.from_indices(100, [1, 2, 50]).to_bytes()
    for bad in (good[:5], good[:-1], b"\x09" + good[1:]):
        with pytest.raises(CodecError):
            PageBitmap.from_bytes(bad)
    with pytest.raises(CodecError):
        PageBitmap.from_bytes(good, max_npages=10)
    # overlapping runs
    import struct
    evil = struct.pack("<BQQ", 1, 100, 2) + struct.pack("<QQQQ", 0, 10, 5, 10)
    with pytest.raises(CodecError):
        PageBitmap.from_bytes(evil)


def test_order_near_faults_puts_pages_after_faults_first():
    idx = np.arange(0, 1000)
    out = order_near_faults(idx, [500], window_pages=8)
    assert out[:8].tolist() == list(range(500, 508))
    assert set(out[8:16].tolist()) == set(range(492, 500))  # the window before the fault next
    assert out[16] == 0  # then the rest, in the given order
    assert sorted(out.tolist()) == idx.tolist()
    assert order_near_faults(idx, []).tolist() == idx.tolist()


def test_interleave_and_chunks():
    assert interleave([1, 2, 3], [10], [20, 21]).tolist() == [1, 10, 20, 2, 21, 3]
    chunks = list(chunk_indices(np.arange(10), 4))
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

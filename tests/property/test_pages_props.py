import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.pages import PageBitmap, indices_of_runs, order_near_faults, runs_of, split_runs

index_sets = st.sets(st.integers(0, 4999), max_size=400).map(lambda s: np.array(sorted(s), np.int64))


@settings(max_examples=200, deadline=None)
@given(index_sets)
def test_runs_roundtrip_and_are_maximal(idx):
    starts, counts = runs_of(idx)
    assert np.array_equal(indices_of_runs(starts, counts), idx)
    if starts.size > 1:
        assert np.all(starts[1:] > starts[:-1] + counts[:-1])  # gaps between runs


@settings(max_examples=200, deadline=None)
@given(index_sets, st.integers(1, 7))
def test_split_runs_keeps_pages(idx, k):
    s, c = split_runs(*runs_of(idx), k)
    assert np.all(c <= k) and np.array_equal(indices_of_runs(s, c), idx)


@settings(max_examples=200, deadline=None)
@given(index_sets)
def test_bitmap_wire_roundtrip(idx):
    bm = PageBitmap.from_indices(5000, idx)
    assert np.array_equal(bm.indices(), idx)
    back = PageBitmap.from_bytes(bm.to_bytes())
    assert back == bm
    assert len(bm.to_bytes()) <= 17 + (5000 + 7) // 8


@settings(max_examples=100, deadline=None)
@given(index_sets, st.lists(st.integers(0, 4999), max_size=5))
def test_order_near_faults_is_a_permutation(idx, faults):
    out = order_near_faults(idx, faults)
    assert np.array_equal(np.sort(out), idx)

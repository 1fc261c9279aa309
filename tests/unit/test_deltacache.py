import numpy as np

from livemig.codec.deltacache import DeltaCache


def test_assign_reuses_slots_and_bounds_capacity():
    c = DeltaCache(100, 4 * 4096)
    s1 = c.assign(np.array([1, 2, 3]))
    assert sorted(s1.tolist()) == [0, 1, 2]
    assert np.array_equal(c.assign(np.array([2])), s1[1:2])
    s2 = c.assign(np.arange(10, 20))  # more than fits: the last 4 get slots
    assert (s2[:6] == -1).all() and sorted(s2[6:].tolist()) == [0, 1, 2, 3]
    assert len(c) == 4 and set(c.page_of.tolist()) == {16, 17, 18, 19}
    assert (c.slot_of[[1, 2, 3]] == -1).all()


def test_clock_gives_referenced_pages_a_second_chance():
    c = DeltaCache(100, 4 * 4096)
    c.assign(np.array([1, 2, 3, 4]))
    c.ref[:] = False
    c.assign(np.array([2]))          # page 2 referenced again
    c.assign(np.array([50, 51]))     # evicts two unreferenced pages, not page 2
    assert c.slot_of[2] >= 0
    assert len(c) == 4
    assert c.slot_of[[50, 51]].min() >= 0


def test_a_batch_never_evicts_its_own_pages():
    c = DeltaCache(100, 3 * 4096)
    c.assign(np.array([1, 2, 3]))
    s = c.assign(np.array([1, 2, 3, 7]))
    assert (s[:3] >= 0).all() and s[3] == -1  # no room for 7 without evicting 1-3


def test_drop_and_zero_capacity():
    c = DeltaCache(10, 2 * 4096)
    c.assign(np.array([4, 5]))
    c.drop(np.array([4, 9]))
    assert c.slot_of[4] == -1 and len(c) == 1
    empty = DeltaCache(10, 100)
    assert empty.nslots == 0 and (empty.assign(np.array([1])) == -1).all()

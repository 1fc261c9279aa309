"""lm_postcopy_invalidate: present pages made absent again (hybrid post-copy).

Reading an absent page from Python would block this thread on a fault while
it holds the GIL, so contents are checked only after placing pages back."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from livemig.errors import ConfigError
from livemig.native.memory import GuestMemory
from livemig.native.postcopy import PostcopyMemory, probe

PAGE = 4096
NPAGES = 256
PROBE = probe()
pytestmark = pytest.mark.skipif(not PROBE.missing, reason=f"userfaultfd MISSING: {PROBE.reason}")


def _filled(npages=NPAGES):
    mem = GuestMemory(npages * PAGE)
    mem.words[:, 0] = np.arange(npages, dtype=np.uint64) + 1    # every page non-zero
    return mem


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, NPAGES - 1), max_size=NPAGES), st.booleans(), st.booleans())
def test_invalidated_pages_fault_and_the_rest_keep_their_contents(pages, per_run, as_mask):
    mem = _filled()
    pm = PostcopyMemory(mem, np.ones(NPAGES, dtype=bool))
    try:
        chosen = np.unique(np.array(pages, dtype=np.int64))
        arg = chosen
        if as_mask:
            arg = np.zeros(NPAGES, dtype=bool)
            arg[chosen] = True
        assert pm.invalidate(arg, per_run_madvise=per_run) == chosen.size
        expect = np.ones(NPAGES, dtype=bool)
        expect[chosen] = False
        assert pm.missing == chosen.size
        assert np.array_equal(pm.present_mask(), expect)
        assert pm.stats["pages_invalidated"] == chosen.size
        # Invalidating again changes nothing: those pages are absent already.
        assert pm.invalidate(chosen, per_run_madvise=per_run) == 0
        kept = np.flatnonzero(expect)
        assert np.array_equal(mem.words[kept, 0], kept.astype(np.uint64) + 1)
        # Placing them back really places them (they were holes, not EEXIST).
        fresh = np.full((1, PAGE // 8), 0xABCD, dtype=np.uint64)
        for p in chosen.tolist():
            assert pm.place(p, fresh) == 1
        assert pm.stats["eexist_pages"] == 0
        assert np.all(mem.words[chosen, 0] == 0xABCD)
        assert pm.missing == 0
    finally:
        pm.close(abandon=True)
        mem.close()


def test_batched_and_per_run_discards_agree_on_a_large_scattered_set():
    mem = _filled(4096)
    pms = []
    try:
        idx = np.sort(np.random.default_rng(3).choice(4096, 1500, replace=False))
        pm = PostcopyMemory(mem, np.ones(4096, dtype=bool))
        pms.append(pm)
        assert pm.invalidate(idx) == idx.size
        batched = pm.present_mask()
        calls_batched = pm.stats["discard_calls"]
        pm.close(abandon=True)
        mem.words[:, 0] = 1
        pm = PostcopyMemory(mem, np.ones(4096, dtype=bool))
        pms.append(pm)
        assert pm.invalidate(idx, per_run_madvise=True) == idx.size
        assert np.array_equal(pm.present_mask(), batched)
        # One call per run without batching; batching needs far fewer.
        assert pm.stats["discard_calls"] >= calls_batched
    finally:
        for pm in pms:
            pm.close(abandon=True)
        mem.close()


def test_indices_outside_memory_are_refused():
    mem = _filled()
    pm = PostcopyMemory(mem, np.ones(NPAGES, dtype=bool))
    try:
        with pytest.raises(ConfigError):
            pm.invalidate(np.array([NPAGES], dtype=np.uint64))
        with pytest.raises(ConfigError):
            pm.invalidate(np.zeros(NPAGES + 1, dtype=bool))
        assert pm.missing == 0
    finally:
        pm.close(abandon=True)
        mem.close()

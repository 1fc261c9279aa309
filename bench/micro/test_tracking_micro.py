"""Dirty tracker: one collect-and-re-arm over 64 MiB, per backend and dirty count."""
import numpy as np
import pytest

from livemig.native.tracking import PREFERENCE, open_tracker, probe_backend


def _usable(name):
    st = probe_backend(name)
    return pytest.param(name, marks=pytest.mark.skipif(not st.available, reason=st.reason))


@pytest.mark.parametrize("backend", [_usable(n) for n in PREFERENCE])
@pytest.mark.parametrize("ndirty", [0, 1000, 8000])
def test_collect(benchmark, memory, rng, backend, ndirty):
    """Write ``ndirty`` random pages (untimed), then time one collect()."""
    memory.words[:] = 1  # populate: first-touch faults are not what we measure
    pages = np.sort(rng.choice(memory.npages, ndirty, replace=False))
    with open_tracker(memory, backend) as trk:
        trk.start()
        trk.collect()

        def setup():
            memory.words[pages, 0] += 1

        got = benchmark.pedantic(trk.collect, setup=setup, rounds=30, iterations=1)
        assert len(got) == ndirty
        trk.stop()

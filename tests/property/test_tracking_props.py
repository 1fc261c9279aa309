"""Properties of every usable dirty tracker, driven by hypothesis."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig import native

from livemig.analysis import probe
from livemig.native.memory import GuestMemory
from livemig.native.tracking import open_tracker

ffi, lib = native.ffi, native.lib
NPAGES = 2048  # 8 MiB

BACKENDS = [
    pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}"))
    for name, ok, reason in probe.backends_to_test()
]


@pytest.fixture(scope="module", params=BACKENDS)
def armed(request):
    m = GuestMemory(NPAGES * native.PAGE_SIZE)
    t = open_tracker(m, request.param)
    t.start()
    yield m, t
    t.close()
    m.close()


def poke(m, pages, value):
    pages = np.asarray(pages, dtype=np.uint64)
    native.check(lib.lm_region_poke_pages(m.handle, ffi.from_buffer("uint64_t[]", pages),
                                          len(pages), value), "poke")


write_sets = st.lists(st.integers(0, NPAGES - 1), max_size=300)
# runs as well as scattered pages: contiguous writes merge into one scan entry
runs = st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 40)), max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(st.tuples(write_sets, runs), min_size=1, max_size=4))
def test_collected_set_equals_written_set(armed, rounds):
    m, t = armed
    t.collect()  # drain whatever an earlier example left
    for k, (pages, spans) in enumerate(rounds):
        written = set(pages)
        for first, n in spans:
            written.update(range(first, min(first + n, NPAGES)))
        order = np.random.default_rng(k).permutation(sorted(written)) if written else []
        poke(m, order, value=k + 1)
        got = t.collect()
        assert list(got) == sorted(written)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.sets(st.integers(0, NPAGES - 1), min_size=1, max_size=400),
       vec_len=st.integers(1, 9))
def test_scan_vector_length_never_changes_the_answer(pages, vec_len):
    if not probe.backends_to_test()[0][1]:
        pytest.skip(probe.backends_to_test()[0][2])
    with GuestMemory(NPAGES * native.PAGE_SIZE) as m, open_tracker(m, "uffd-async") as t:
        t.set_scan_vec_len(vec_len)
        t.start()
        poke(m, sorted(pages), value=9)
        assert list(t.collect()) == sorted(pages)

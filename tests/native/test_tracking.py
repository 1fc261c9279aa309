"""Dirty trackers: the same suite over every backend usable on this host."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import livemig

from livemig import native

from livemig.analysis import probe

from livemig.native import tracking
from livemig.errors import BackendUnavailable, ConfigError, LivemigError, TrackerStateError
from livemig.native.memory import GuestMemory
from livemig.native.tracking import open_tracker
from support.waiting import PATIENCE_S, wait_for

ffi, lib = native.ffi, native.lib
# Subprocesses import livemig from wherever this test run did (an installed
# package in CI, src/ in a development checkout).
SRC = os.path.dirname(os.path.dirname(os.path.abspath(livemig.__file__)))

BACKENDS = [
    pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}"))
    for name, ok, reason in probe.backends_to_test()
]


def poke(memory, pages, value=0xA5A5):
    pages = np.ascontiguousarray(pages, dtype=np.uint64)
    n = lib.lm_region_poke_pages(memory.handle, ffi.from_buffer("uint64_t[]", pages), len(pages), value)
    return native.check(n, "poke")


@pytest.fixture
def memory():
    m = GuestMemory("16MiB")
    yield m
    m.close()


@pytest.mark.parametrize("memfd", [False, True], ids=["anon", "memfd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_collect_reports_exactly_the_written_pages(backend, memfd):
    with GuestMemory("16MiB", memfd=memfd) as m, open_tracker(m, backend) as t:
        m.words[:8, 0] = 1            # populated before start: must be armed too
        t.start()
        assert t.collect().size == 0  # nothing written since start
        pages = np.unique(np.random.default_rng(7).integers(0, m.npages, 700)).astype(np.uint64)
        poke(m, pages)
        got = t.collect()
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, pages)
        assert t.collect().size == 0  # re-armed, nothing new
        _ = m.bytes[::4096].sum()     # reads are not writes
        assert t.collect().size == 0
        assert t.stats["pages_reported"] == len(pages)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounds_report_each_write_in_its_own_round(backend, memory):
    rng = np.random.default_rng(11)
    with open_tracker(memory, backend) as t:
        t.start()
        for round_no in range(6):
            pages = np.unique(rng.integers(0, memory.npages, 300)).astype(np.uint64)
            poke(memory, pages, value=round_no)
            np.testing.assert_array_equal(t.collect(), pages)
        assert t.stats["collects"] == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_leaves_memory_writable_and_silent(backend, memory):
    with open_tracker(memory, backend) as t:
        t.start()
        poke(memory, [1, 2])
        faults = t.stats["faults"]
        t.stop()
        poke(memory, np.arange(memory.npages))
        assert t.stats["faults"] == faults
        t.start()                      # a stopped tracker can be armed again
        poke(memory, [5])
        np.testing.assert_array_equal(t.collect(), [5])


def _written(memory, writers):
    """The pages the native writers have stored to so far (readable while they run)."""
    written = np.zeros(memory.npages, dtype=bool)
    for w in writers:
        bm = np.zeros((memory.npages + 63) // 64, dtype=np.uint64)
        native.check(lib.lm_writer_bitmap(w, ffi.from_buffer("uint64_t[]", bm), len(bm)), "bitmap")
        written |= np.unpackbits(bm.view(np.uint8), bitorder="little")[: memory.npages].astype(bool)
    return written


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_writers_shadow_copy_matches_memory(backend):
    """Writers keep storing from native threads while we collect in a loop and
    copy only the reported pages; at the end the copy equals memory."""
    with GuestMemory("32MiB") as m, open_tracker(m, backend) as t:
        shadow = np.zeros_like(m.pages)
        t.start()
        writers = []
        for seed in (1, 2):
            w = ffi.new("lm_writer **")
            native.check(lib.lm_writer_start(m.handle, 0, m.npages, seed, 0, w), "writer")
            writers.append(w[0])
        reported = np.zeros(m.npages, dtype=bool)
        rounds = 0

        def collect_round():
            """One collect while the writers run; done after twenty rounds that
            overlapped more than a thousand of their writes."""
            nonlocal rounds
            idx = t.collect()
            assert np.all(np.diff(idx.astype(np.int64)) > 0), "not strictly ascending"
            shadow[idx] = m.pages[idx]
            reported[idx] = True
            rounds += 1
            return rounds > 20 and _written(m, writers).sum() > 1000

        try:
            wait_for("the writers to write 1000 pages across 20 collect rounds", collect_round,
                     interval_s=0)
        finally:
            writes = [lib.lm_writer_stop(w) for w in writers]
        idx = t.collect()
        shadow[idx] = m.pages[idx]
        reported[idx] = True
        written = _written(m, writers)
        for w in writers:
            lib.lm_writer_destroy(w)
        assert sum(writes) > 1000 and rounds > 20
        assert not (written & ~reported).any(), "a written page was never reported"
        mismatch = np.flatnonzero((shadow != m.pages).any(axis=1))
        assert mismatch.size == 0, f"pages {mismatch[:10]} differ from the shadow copy"


@pytest.mark.parametrize("vec_len", [1, 3, 64, 1024])
def test_pagemap_scan_short_vector_reports_each_page_once(vec_len):
    if not probe.backends_to_test()[0][1]:
        pytest.skip(probe.backends_to_test()[0][2])
    with GuestMemory("256MiB") as m, open_tracker(m, "uffd-async") as t:
        t.set_scan_vec_len(vec_len)
        t.start()
        # isolated pages: every run is one page, so each fills one vector entry
        pages = np.arange(5, m.npages, 3, dtype=np.uint64)[:20000]
        poke(m, pages)
        got = t.collect()
        assert np.all(np.diff(got.astype(np.int64)) > 0), "not strictly ascending"
        np.testing.assert_array_equal(got, pages)
        assert t.stats["scan_ioctls"] >= len(pages) // vec_len
        # exactly vec_len runs: a full vector followed by an empty one
        poke(m, pages[:vec_len])
        np.testing.assert_array_equal(t.collect(), pages[:vec_len])


def test_mprotect_survives_the_map_count_ceiling():
    """42k isolated dirty pages need ~84k VMAs, past vm.max_map_count: the
    tracker degrades to conservative blocks, loses nothing and says so."""
    max_maps = probe._read_sysctl("vm.max_map_count") or 65530
    nwrite = max_maps // 2 + 10000
    with GuestMemory(nwrite * 2 * 4096 + (4 << 20)) as m, open_tracker(m, "mprotect") as t:
        t.start()
        pages = np.arange(0, 2 * nwrite, 2, dtype=np.uint64)
        poke(m, pages, value=3)
        got = t.collect()
        assert np.isin(pages, got).all()
        st = t.stats
        assert st["degraded_pages"] > 0 and st["degraded_collects"] == 1
        # the next round: re-protection after degradation still tracks writes
        poke(m, pages[::7] + 1, value=4)
        got = t.collect()
        assert np.isin(pages[::7] + 1, got).all()
        assert (m.words[pages, 0] == (pages ^ np.uint64(3))).all()
        m.discard(0, m.npages)  # give the memory back promptly


def test_bad_backend_name_is_a_config_error(memory):
    with pytest.raises(ConfigError, match="unknown dirty-tracking backend 'bogus'"):
        open_tracker(memory, "bogus")


def test_unusable_backend_by_name_raises_with_reason_and_hint(memory, monkeypatch):
    monkeypatch.setattr(tracking, "_native_probe",
                        lambda kind: (-1, "userfaultfd refused (Operation not permitted)")
                        if kind != lib.LM_TRACK_MPROTECT else (0, ""))
    with pytest.raises(BackendUnavailable) as ei:
        open_tracker(memory, "uffd-async")
    assert ei.value.name == "uffd-async" and "refused" in ei.value.reason
    assert "vm.unprivileged_userfaultfd=1" in ei.value.hint
    with open_tracker(memory) as t:
        assert t.name == "mprotect"
        assert "passed over uffd-async: userfaultfd refused" in t.choice_reason


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged uid")
def test_unprivileged_user_gets_backend_unavailable_from_the_kernel():
    """A real refusal: as uid 65534 with vm.unprivileged_userfaultfd=0 and a
    root-only /dev/userfaultfd the kernel says no, and mprotect is chosen."""
    if probe._read_sysctl("vm.unprivileged_userfaultfd") != 0:
        pytest.skip("vm.unprivileged_userfaultfd=1: unprivileged userfaultfd is allowed here")
    code = (
        "import os\n"
        "from livemig.native.memory import GuestMemory\n"
        "from livemig.native.tracking import open_tracker\n"
        "from livemig.errors import BackendUnavailable\n"
        "os.setgid(65534); os.setuid(65534)  # after the imports: the venv may be root-only\n"
        "m = GuestMemory('4MiB')\n"
        "try:\n    open_tracker(m, 'uffd-wp')\n"
        "except BackendUnavailable as e:\n    print('REFUSED', e.reason, '|', e.hint)\n"
        "t = open_tracker(m); print('AUTO', t.name); t.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                       capture_output=True, text=True, timeout=PATIENCE_S)
    assert "REFUSED" in r.stdout, r.stderr
    assert "vm.unprivileged_userfaultfd=1" in r.stdout
    assert "AUTO mprotect" in r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_errors(backend, memory):
    t = open_tracker(memory, backend)
    with pytest.raises(TrackerStateError, match="before start"):
        t.collect()
    with pytest.raises(TrackerStateError, match="before start"):
        t.stop()
    t.start()
    with pytest.raises(TrackerStateError, match="already started"):
        t.start()
    with pytest.raises(LivemigError, match="still in use"):
        memory.close()               # the tracker holds the region
    t.close()                        # closing while armed disarms
    poke(memory, [0, 1])             # and leaves memory writable
    with pytest.raises(TrackerStateError, match="closed"):
        t.collect()
    t.close()                        # idempotent


def test_native_collect_guards(memory):
    out = ffi.new("lm_tracker **")
    native.check(lib.lm_tracker_create(lib.LM_TRACK_MPROTECT, memory.handle, out), "create")
    t = ffi.gc(out[0], lib.lm_tracker_destroy)
    buf = np.empty(memory.npages, dtype=np.uint64)
    assert lib.lm_tracker_collect(t, ffi.from_buffer("uint64_t[]", buf), memory.npages) == -22
    assert lib.lm_tracker_start(t) == 0
    assert lib.lm_tracker_start(t) == -16                       # EBUSY
    assert lib.lm_tracker_collect(t, ffi.from_buffer("uint64_t[]", buf), 10) == -28  # ENOSPC
    assert lib.lm_tracker_set_scan_vec(t, 4) == -95             # uffd-async only
    assert lib.lm_tracker_create(99, memory.handle, out) == -22
    assert lib.lm_region_poke_pages(memory.handle, ffi.new("uint64_t[]", [memory.npages]), 1, 0) == -34


_CRASH = """
import ctypes, faulthandler, sys
{enable}
from livemig.native.memory import GuestMemory
from livemig.native.tracking import open_tracker
m = GuestMemory('4MiB')
t = open_tracker(m, 'mprotect'); t.start()
m.words[3, 0] = 7                      # a tracked fault is handled
assert list(t.collect()) == [3]
print('TRACKED-OK', flush=True)
ctypes.string_at(8)                    # a fault outside: must still crash
print('SWALLOWED', flush=True)
"""


@pytest.mark.parametrize("faulthandler", [False, True], ids=["default", "faulthandler"])
def test_sigsegv_outside_tracked_regions_still_crashes(faulthandler):
    code = _CRASH.format(enable="faulthandler.enable()" if faulthandler else "")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                       capture_output=True, text=True, timeout=PATIENCE_S)
    assert "TRACKED-OK" in r.stdout, r.stderr
    assert "SWALLOWED" not in r.stdout
    assert r.returncode == -signal.SIGSEGV
    if faulthandler:
        assert "Segmentation fault" in r.stderr  # the chained handler ran

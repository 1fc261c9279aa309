"""Post-copy primitives: userfaultfd MISSING registration, fault reading and
page placement, driven by native toucher threads (a Python thread must never
fault on a missing page: it would block holding the GIL)."""
import asyncio
import errno
import os
import select
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from livemig.errors import (BackendUnavailable, ConfigError, LivemigError, NativeError,
                            Unsupported)
from livemig.lab.faultbench import LocalFaultServer, Toucher
from livemig.native.memory import GuestMemory
from livemig.native.postcopy import BACKEND_NAME, PostcopyMemory, probe
from support.waiting import PATIENCE_S, wait_for, wait_for_async

PAGE = 4096
PROBE = probe()
pytestmark = pytest.mark.skipif(not PROBE.missing, reason=f"userfaultfd MISSING: {PROBE.reason}")
needs_move = pytest.mark.skipif(not PROBE.move, reason=f"UFFDIO_MOVE: {PROBE.reason}")


def _source(npages, seed=7):
    return np.random.default_rng(seed).integers(0, 2**63, size=(npages, PAGE // 8), dtype=np.uint64)


@pytest.fixture
def guest():
    mem = GuestMemory(1 << 20)  # 256 pages
    pms = []

    def register(present=None, **kw):
        pm = PostcopyMemory(mem, present, **kw)
        pms.append(pm)
        return pm

    yield mem, register
    for pm in pms:
        pm.close(abandon=True)
    mem.close()


def _wait_readable(pm, timeout_s=PATIENCE_S):
    p = select.poll()
    p.register(pm.fileno(), select.POLLIN)
    assert p.poll(int(timeout_s * 1000)), "no fault arrived"


def _serve_until(pm, source, touchers):
    """Serve faults from a Python loop until every toucher is done."""
    def served():
        for page in pm.read_faults():
            pm.place(int(page), source[page])
        return all(t.done == t.pages.size for t in touchers)

    wait_for("the touchers to finish", served, interval_s=0)
    for t in touchers:
        t.join(PATIENCE_S)


def _blocked_in_userfault() -> int:
    """Threads of this process asleep in the kernel's userfault handler, each
    with its fault queued on a userfaultfd."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/wchan") as f:
                n += f.read() == "handle_userfault"
        except OSError:
            pass
    return n


def test_probe_reports_missing_and_why_not_move():
    assert PROBE.missing
    assert PROBE.move or "MOVE" in PROBE.reason


def test_faulting_thread_gets_source_contents(guest):
    mem, register = guest
    source = _source(mem.npages)
    pm = register()
    pages = np.random.default_rng(1).permutation(mem.npages)[:100]
    t = Toucher(mem, pages, offset_bytes=8 * 17)
    _serve_until(pm, source, [t])
    assert np.array_equal(t.values, source[pages, 17])
    assert np.array_equal(mem.words[pages], source[pages])
    st_ = pm.stats
    assert st_["faults_read"] == 100 and st_["pages_copied"] == 100
    assert pm.missing == mem.npages - 100


def test_zero_page_path(guest):
    mem, register = guest
    mem.words[:] = 0xFFFF  # stale contents: discarded at registration
    pm = register()
    t = Toucher(mem, [3, 4])
    _wait_readable(pm)
    assert pm.place_zero(3, 2) == 2
    t.join(PATIENCE_S)
    assert t.values.tolist() == [0, 0]
    assert not mem.pages[3:5].any()
    assert pm.stats["pages_zeroed"] == 2 and pm.missing == mem.npages - 2


@needs_move
def test_move_path_takes_source_pages(guest):
    mem, register = guest
    source = _source(64)
    with GuestMemory(64 * PAGE, hugepages=False) as donor:
        donor.words[:] = source
        pm = register()
        t = Toucher(mem, [10, 20])
        _wait_readable(pm)
        assert pm.place_move(0, donor.bytes, 64) == 64
        t.join(PATIENCE_S)
        assert t.values.tolist() == [source[10, 0], source[20, 0]]
        assert np.array_equal(mem.words[:64], source)
        assert not donor.bytes.any()  # the pages were taken, not copied
        assert pm.stats["pages_moved"] == 64


@needs_move
def test_move_of_a_source_hole_zero_fills(guest):
    mem, register = guest
    with GuestMemory(4 * PAGE, hugepages=False) as donor:
        donor.words[:] = 5
        donor.discard(1, 1)  # a hole in the middle of the source run
        pm = register()
        assert pm.place_move(8, donor.bytes, 4) == 4
        assert mem.words[8, 0] == 5 and not mem.pages[9].any() and mem.words[10, 0] == 5
        assert pm.stats["move_src_holes"] == 1


@needs_move
def test_move_of_shared_source_pages_falls_back_to_copy(guest):
    mem, register = guest
    with GuestMemory(4 * PAGE, hugepages=False) as donor:
        donor.words[:] = 3
        r, w = os.pipe()
        pid = os.fork()  # the child shares the donor's pages copy-on-write
        if pid == 0:
            os.read(r, 1)
            os._exit(0)
        try:
            pm = register()
            assert pm.place_move(0, donor.bytes, 4) == 4
        finally:
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
        assert (mem.words[:4] == 3).all()
        stats = pm.stats  # shared pages cannot be remapped (EBUSY): copied instead
        assert stats["move_busy_copies"] == 4 and stats["pages_copied"] == 4
        assert stats["pages_moved"] == 0
        assert (donor.words == 3).all()  # still there: copied, not taken


def test_move_rejects_misaligned_source(guest):
    mem, register = guest
    pm = register()
    buf = bytearray(3 * PAGE)
    with pytest.raises((ConfigError, Unsupported)):
        pm.place_move(0, memoryview(buf)[1:1 + PAGE], 1)


def test_double_placement_is_harmless_and_counted(guest):
    mem, register = guest
    source = _source(4)
    pm = register()
    assert pm.place(2, source[0]) == 1
    assert pm.place(2, source[1]) == 0  # already there: not overwritten
    assert pm.place_zero(2) == 0
    assert np.array_equal(mem.words[2], source[0])
    assert pm.stats["eexist_pages"] == 2
    assert pm.missing == mem.npages - 1


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_batch_over_partly_present_run(data):
    npages = 128
    pre = data.draw(st.sets(st.integers(0, npages - 1), max_size=40))
    first = data.draw(st.integers(0, npages - 1))
    count = data.draw(st.integers(1, npages - first))
    source = _source(npages, seed=len(pre))
    with GuestMemory(npages * PAGE) as mem:
        pm = PostcopyMemory(mem)
        try:
            for p in sorted(pre):
                pm.place_zero(p)
            placed = pm.place(first, source[first:first + count], count)
            inside = {p for p in pre if first <= p < first + count}
            assert placed == count - len(inside)
            assert pm.stats["eexist_pages"] == len(inside)
            expect = np.zeros(npages, dtype=bool)
            expect[list(pre)] = True
            expect[first:first + count] = True
            assert np.array_equal(pm.present_mask(), expect)
            assert pm.missing == npages - int(expect.sum())
            fresh = [p for p in range(first, first + count) if p not in inside]
            assert np.array_equal(mem.words[fresh], source[fresh])
        finally:
            pm.close(abandon=True)


def test_mark_present_keeps_precopied_pages_and_discards_the_rest(guest):
    mem, register = guest
    mem.words[:] = np.arange(mem.npages, dtype=np.uint64)[:, None]
    present = np.zeros(mem.npages, dtype=bool)
    present[::3] = True
    pm = register(present)
    assert pm.missing == mem.npages - int(present.sum())
    assert np.array_equal(pm.present_mask(), present)
    words = pm.present_bitmap()
    assert words.dtype == np.uint64 and words.size == mem.npages // 64
    assert np.array_equal(mem.words[::3, 0], np.arange(0, mem.npages, 3))  # no fault, kept
    t = Toucher(mem, [1])
    _wait_readable(pm)
    assert pm.read_faults().tolist() == [1]  # discarded, so it faults
    pm.place_zero(1)
    t.join(PATIENCE_S)
    assert t.values[0] == 0


def test_present_as_bitmap_words(guest):
    mem, register = guest
    words = np.zeros(mem.npages // 64, dtype=np.uint64)
    words[1] = 0b1011
    pm = register(words)
    assert pm.missing == mem.npages - 3
    assert np.flatnonzero(pm.present_mask()).tolist() == [64, 65, 67]
    with pytest.raises(ConfigError):
        PostcopyMemory(mem, np.zeros(7, dtype=np.int32))


def test_faults_are_deduplicated_and_placed_pages_not_reported(guest):
    mem, register = guest
    pm = register()
    a, b = Toucher(mem, [5]), Toucher(mem, [5])
    wait_for("both touchers to fault on page 5", lambda: _blocked_in_userfault() == 2)
    assert pm.read_faults().tolist() == [5]
    assert pm.stats["faults_read"] == 2
    c = Toucher(mem, [6])
    _wait_readable(pm)
    pm.place_zero(5, 2)  # 6 arrives before its fault is read
    # Waking a waiter also drops its unread message (userfaultfd_wake_function
    # unlinks it), so a page placed in time is never reported.
    assert pm.read_faults().size == 0
    assert pm.stats["faults_read"] == 2
    for t in (a, b, c):
        t.join(PATIENCE_S)
    assert pm.read_faults().size == 0


def _run(loop_name, coro):
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    with asyncio.Runner() as runner:
        return runner.run(coro)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_concurrent_faults_served_by_event_loop(guest, loop_name):
    mem, register = guest
    source = _source(mem.npages)
    pm = register()
    order = np.random.default_rng(3).permutation(mem.npages)
    halves = [order[: mem.npages // 2], order[mem.npages // 2:]]

    async def main():
        loop = asyncio.get_running_loop()
        batches = []

        def on_faults():
            pages = pm.read_faults()
            batches.append(pages.size)
            for page in pages:
                pm.place(int(page), source[page])

        loop.add_reader(pm.fileno(), on_faults)
        try:
            touchers = [Toucher(mem, h, offset_bytes=8, cpu=i % os.cpu_count()) for i, h in
                        enumerate(halves)]
            await wait_for_async("the loop to serve every fault",
                                 lambda: all(t.done == t.pages.size for t in touchers))
        finally:
            loop.remove_reader(pm.fileno())
        for t in touchers:
            t.join(PATIENCE_S)
        return touchers, batches

    touchers, batches = _run(loop_name, main())
    for t, h in zip(touchers, halves):
        assert np.array_equal(t.values, source[h, 1])
    assert pm.missing == 0
    assert sum(batches) == mem.npages
    assert np.array_equal(mem.words, source)
    pm.close()


def test_local_fault_server_serves_everything(guest):
    mem, register = guest
    source = _source(mem.npages)
    pm = register()
    with LocalFaultServer(pm, source) as server:
        t = Toucher(mem, np.arange(mem.npages))
        t.join(PATIENCE_S)
        with pytest.raises(LivemigError, match="native server"):
            pm.close(abandon=True)  # the server thread still polls the fd
    assert server.stop() == 0  # already stopped
    assert np.array_equal(t.values, source[:, 0]) and pm.missing == 0


def test_close_refused_while_missing_then_fine(guest):
    mem, register = guest
    pm = register()
    with pytest.raises(NativeError, match="still missing"):
        pm.close()
    pm.place_zero(0, mem.npages)
    pm.close()
    assert pm.closed
    mem.words[0, 0] = 9  # plain memory again: no fault
    with pytest.raises(Exception):
        pm.read_faults()


def test_abandon_wakes_blocked_threads(guest):
    mem, register = guest
    pm = register()
    t = Toucher(mem, [12])
    _wait_readable(pm)
    with pytest.raises(TimeoutError):
        t.join(0.05)
    pm.close(abandon=True)
    t.join(PATIENCE_S)
    assert t.values[0] == 0


def test_region_in_use_cannot_be_freed(guest):
    mem, register = guest
    pm = register()
    with pytest.raises(LivemigError, match="in use"):
        mem.close()
    pm.place_zero(0, mem.npages)
    pm.close()
    t = Toucher(mem, [0])  # a running toucher holds the region too
    with pytest.raises(LivemigError, match="in use"):
        mem.close()
    t.join(PATIENCE_S)


def test_required_feature_refused_is_backend_unavailable(guest):
    mem, register = guest
    with pytest.raises(BackendUnavailable) as ei:
        register(required_features=1 << 63)
    assert ei.value.name == BACKEND_NAME and "feature" in ei.value.reason


def test_no_leaked_fds():
    def nfds():
        return len(os.listdir("/proc/self/fd"))

    before = nfds()
    for _ in range(20):
        with GuestMemory(64 * PAGE) as mem:
            with PostcopyMemory(mem) as pm:
                pm.place_zero(0, 64)
            probe()
    assert nfds() == before


_DROP_PRIVS = textwrap.dedent("""
    import ctypes, os, struct, sys
    from livemig.native.memory import GuestMemory
    from livemig.native.postcopy import PostcopyMemory, probe
    from livemig.errors import BackendUnavailable
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.argv[1] == "seccomp":
        # Classic BPF: on x86-64, fail userfaultfd(2) (nr 323) with EPERM.
        def ins(code, jt, jf, k):
            return struct.pack("HBBI", code, jt, jf, k)
        prog = b"".join([
            ins(0x20, 0, 0, 4), ins(0x15, 1, 0, 0xC000003E), ins(0x06, 0, 0, 0x7FFF0000),
            ins(0x20, 0, 0, 0), ins(0x15, 0, 1, 323), ins(0x06, 0, 0, 0x00050001),
            ins(0x06, 0, 0, 0x7FFF0000)])
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
        fbuf = ctypes.create_string_buffer(fprog)
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0  # SECCOMP_MODE_FILTER
    os.setgid(65534); os.setuid(65534)                    # lose /dev/userfaultfd
    mem = GuestMemory(16 * 4096)
    try:
        pm = PostcopyMemory(mem)
    except BackendUnavailable as e:
        print("UNAVAILABLE", e.name, "|", e.reason)
    else:
        print("OPEN user_mode_only=%s" % pm.user_mode_only, probe().user_mode_only)
        pm.close(abandon=True)
""")


def _unprivileged(mode):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges in a child")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _DROP_PRIVS, mode], capture_output=True,
                         text=True, timeout=PATIENCE_S, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_unavailable_userfaultfd_raises_backend_unavailable():
    line = _unprivileged("seccomp")
    assert line.startswith("UNAVAILABLE " + BACKEND_NAME), line
    assert "EPERM" in line


def test_unprivileged_falls_back_to_user_mode_only():
    if open("/proc/sys/vm/unprivileged_userfaultfd").read().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd=1: the plain syscall works unprivileged")
    assert _unprivileged("plain") == "OPEN user_mode_only=True True"


def test_ranges_are_checked(guest):
    mem, register = guest
    pm = register()
    with pytest.raises(ConfigError):
        pm.place(mem.npages - 1, bytes(2 * PAGE), 2)
    with pytest.raises(ConfigError):
        pm.place(0, bytes(PAGE), 2)  # too little data
    with pytest.raises(ConfigError):
        pm.place_zero(-1)
    from livemig.native import lib
    assert lib.lm_postcopy_zero(pm.handle, mem.npages, 1) == -errno.ERANGE
    assert pm.missing == mem.npages


def test_bitmap_of_a_size_not_multiple_of_64():
    with GuestMemory(100 * PAGE) as mem:
        words = np.full(2, np.iinfo(np.uint64).max, dtype=np.uint64)  # bits past page 99 too
        with PostcopyMemory(mem, words) as pm:
            assert pm.missing == 0
            assert pm.present_mask().all() and pm.present_mask().size == 100
            assert int(pm.present_bitmap()[1]) == (1 << 36) - 1

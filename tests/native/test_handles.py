"""Native objects dropped without close() are freed by the garbage collector,
once, and never before the objects that use them (livemig.native.handles)."""
import gc
import os

import numpy as np
import pytest

from livemig.analysis import probe
from livemig.native import ffi
from livemig.native.handles import NativeHandle
from livemig.native.memory import GuestMemory
from livemig.native.tracking import open_tracker
from livemig.vm import asm
from livemig.vm.vcpu import VCpu

SPIN = """
    li64 r1, 65536
loop:
    addi r2, r2, 1
    st   r2, [r1]
    jmp  loop
"""


def _memfd_mappings() -> int:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return sum("memfd:livemig-guest" in line for line in f)


def _fds_to(target: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:   # the fd listing itself, closed meanwhile
            pass
    return n


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _uffd_backend() -> str:
    for name, ok, _ in probe.backends_to_test():
        if ok and name.startswith("uffd"):
            return name
    pytest.skip("no userfaultfd tracker here")


def test_dropped_memory_unmaps_its_region():
    before = _memfd_mappings()
    m = GuestMemory("4MiB", memfd=True, hugepages=False)
    m.bytes[:4096] = 1
    assert _memfd_mappings() == before + 1
    del m
    gc.collect()
    assert _memfd_mappings() == before


def test_dropped_armed_tracker_closes_its_userfaultfd():
    backend = _uffd_backend()
    with GuestMemory("4MiB", hugepages=False) as m:
        before = _fds_to("anon_inode:[userfaultfd]")
        t = open_tracker(m, backend)
        t.start()
        assert _fds_to("anon_inode:[userfaultfd]") == before + 1
        m.detach(t)   # the memory records its users; let the tracker be the only reference
        del t
        gc.collect()
        assert _fds_to("anon_inode:[userfaultfd]") == before


def test_memory_and_running_vcpu_dropped_together_stop_the_thread_first():
    """GuestMemory and VCpu refer to each other (a cycle): the collector may
    finalize either first, yet the vCPU thread must stop before the unmap."""
    before_maps, before_threads = _memfd_mappings(), _threads()
    m = GuestMemory("1MiB", memfd=True, hugepages=False)
    code = asm.assemble(SPIN)
    m.bytes[:len(code)] = np.frombuffer(code, dtype=np.uint8)
    v = VCpu(m, 0)
    v.resume()
    assert _threads() == before_threads + 1
    del m, v
    gc.collect()
    assert _memfd_mappings() == before_maps
    assert _threads() == before_threads


def test_close_then_drop_frees_once():
    m = GuestMemory("1MiB", hugepages=False)
    t = open_tracker(m, "mprotect")
    t.close()
    t.close()
    m.close()
    m.close()
    del m, t
    gc.collect()


def _recording_handle(log, name, parent=None):
    raw = ffi.new("int *")
    handle = NativeHandle(ffi.cast("void *", raw), lambda _p: log.append(name), parent=parent)
    return handle, raw


@pytest.mark.parametrize("order", ["parent first", "user first"])
def test_a_parent_is_destroyed_after_its_last_user(order):
    log = []
    parent, keep_p = _recording_handle(log, "parent")
    user, keep_u = _recording_handle(log, "user", parent)
    first, second = (parent, user) if order == "parent first" else (user, parent)
    first.release()
    assert log == ([] if order == "parent first" else ["user"])
    second.release()
    assert log == ["user", "parent"]
    parent.release()
    assert log == ["user", "parent"]


def test_forget_drops_without_destroying():
    log = []
    parent, keep_p = _recording_handle(log, "parent")
    user, keep_u = _recording_handle(log, "user", parent)
    parent.release()
    user.forget()
    assert log == ["parent"]

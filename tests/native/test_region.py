import errno

import pytest

from livemig import native
from livemig.errors import NativeError


def _create(length, flags=0):
    out = native.ffi.new("lm_region **")
    native.check(native.lib.lm_region_create(length, flags, out), "lm_region_create")
    return native.ffi.gc(out[0], native.lib.lm_region_destroy)


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_region_is_2mib_aligned_and_zeroed(flags):
    r = _create(8 << 20, flags)
    base = int(native.ffi.cast("uintptr_t", native.lib.lm_region_base(r)))
    assert base % (2 << 20) == 0
    assert native.lib.lm_region_npages(r) == (8 << 20) // 4096
    buf = native.ffi.buffer(native.lib.lm_region_base(r), 8 << 20)
    assert buf[0:4096] == bytes(4096)
    buf[4096:4100] = b"abcd"
    assert buf[4096:4100] == b"abcd"
    native.check(native.lib.lm_region_discard(r, 1, 1), "discard")
    assert buf[4096:4100] == bytes(4)


@pytest.mark.parametrize("length", [0, 100, 4097])
def test_region_rejects_bad_sizes(length):
    out = native.ffi.new("lm_region **")
    with pytest.raises(NativeError) as ei:
        native.check(native.lib.lm_region_create(length, 0, out), "lm_region_create")
    assert ei.value.errno == errno.EINVAL


def test_region_discard_out_of_range():
    r = _create(1 << 20)
    assert native.lib.lm_region_discard(r, 255, 2) == -errno.ERANGE


def test_guest_memory_views_are_zero_copy():
    from livemig.native.memory import GuestMemory
    from livemig.errors import ConfigError

    with GuestMemory("4MiB") as mem:
        assert mem.npages == 1024
        mem.pages[3, :4] = [1, 2, 3, 4]
        assert mem.bytes[3 * 4096 + 2] == 3
        assert mem.words.shape == (1024, 512)
        assert mem.base_address % (2 << 20) == 0
    assert mem.closed
    with pytest.raises(ConfigError):
        GuestMemory("3000")
    with pytest.raises(ConfigError):
        GuestMemory("lots")


def test_populate_keeps_contents_and_range_checks():
    from livemig.native.memory import GuestMemory

    with GuestMemory("4MiB") as mem:
        mem.pages[7, :3] = [9, 8, 7]
        mem.populate()
        assert list(mem.pages[7, :3]) == [9, 8, 7]
        assert not mem.pages[8].any()
        assert native.lib.lm_region_populate(mem.handle, 1000, 100) == -errno.ERANGE


def test_stale_compiled_module_is_refused_with_a_clear_message():
    """A compiled module whose ABI version differs from the Python side's
    (csrc/ changed, extension not rebuilt) must not be used."""
    import subprocess
    import sys

    code = """
import sys, types
fake = types.ModuleType("livemig._native")
class Lib:
    LM_PAGE_SIZE = 4096
    @staticmethod
    def lm_abi_version():
        return 999
fake.lib, fake.ffi = Lib(), object()
sys.modules["livemig._native"] = fake
try:
    import livemig.native
except ImportError as exc:
    print("REFUSED:", exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "REFUSED:" in out.stdout
    assert "ABI version 999" in out.stdout and "rebuild" in out.stdout

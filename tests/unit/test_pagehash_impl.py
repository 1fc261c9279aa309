"""The AVX-512 page hash gives exactly the scalar definition's values.

Both implementations run in this one process (livemig.native.pagehash calls
each by name): page hashes and all sixteen block hashes agree on random
pages, the zero page, pages with one changed word in each block, and
buffers not aligned to 8 or 64 bytes. A Python transcription of the
definition pins the scalar values themselves (a wire change would show
here first). The AVX-512 cases skip on a CPU without it.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from livemig.native import PAGE_SIZE, pagehash

AVX = pagehash.available("avx512")
needs_avx = pytest.mark.skipif(not AVX, reason="this CPU has no AVX-512 F/DQ/VL")
M = (1 << 64) - 1
K1, K2, K3, K4 = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xBF58476D1CE4E5B9,
                  0x94D049BB133111EB)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def _mix(h):
    h ^= h >> 30
    h = h * K3 & M
    h ^= h >> 27
    h = h * K4 & M
    return h ^ (h >> 31)


def reference(page: bytes) -> tuple[int, list[int]]:
    """The definition of csrc/codec/lm_pagehash.h, in Python."""
    words = np.frombuffer(page, dtype="<u8").tolist()
    blocks = []
    for b in range(16):
        a = [(K1 + b) & M, K2, K3, K4]
        for i in range(8):
            for lane in range(4):
                w = words[b * 32 + i * 4 + lane]
                a[lane] = _rotl(a[lane] ^ (w * K2 & M), 29) * K1 & M
        blocks.append(_mix((a[0] + _rotl(a[1], 17) + _rotl(a[2], 31) + _rotl(a[3], 47)) & M))
    acc = K3
    for h in blocks:
        acc = _rotl(acc ^ (h * K2 & M), 31) * K1 & M
    return _mix((acc + PAGE_SIZE) & M), blocks


def _pages(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n * PAGE_SIZE, dtype=np.uint8)


def test_scalar_is_the_definition():
    pages = _pages(4, 1)
    for page in [bytes(PAGE_SIZE), *(pages[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes()
                                     for i in range(4))]:
        h, blocks = pagehash.hash_page("scalar", page)
        ref_h, ref_blocks = reference(page)
        assert h == ref_h and blocks.tolist() == ref_blocks


@needs_avx
def test_avx512_equals_scalar_on_random_pages():
    buf = _pages(2048, 2)
    assert np.array_equal(pagehash.hash_pages("avx512", buf), pagehash.hash_pages("scalar", buf))
    for i in range(0, 2048, 97):
        page = buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        hv, bv = pagehash.hash_page("avx512", page)
        hs, bs = pagehash.hash_page("scalar", page)
        assert hv == hs and np.array_equal(bv, bs)


@needs_avx
def test_avx512_equals_scalar_on_zero_and_extreme_pages():
    for fill in (0x00, 0xFF, 0x80, 0x01):
        page = bytes([fill]) * PAGE_SIZE
        hv, bv = pagehash.hash_page("avx512", page)
        hs, bs = pagehash.hash_page("scalar", page)
        assert hv == hs and np.array_equal(bv, bs)
    assert pagehash.hash_page("avx512", bytes(PAGE_SIZE))[0] == reference(bytes(PAGE_SIZE))[0]


@needs_avx
def test_one_changed_word_in_each_block_changes_that_block_alike():
    rng = np.random.default_rng(3)
    base = _pages(1, 4)
    h0, b0 = pagehash.hash_page("scalar", base)
    for block in range(16):
        for word in (0, 3, 17, 31):   # lanes 0..3, first and last steps
            page = base.copy().view(np.uint64)
            page[block * 32 + word] ^= np.uint64(rng.integers(1, 1 << 63))
            hv, bv = pagehash.hash_page("avx512", page)
            hs, bs = pagehash.hash_page("scalar", page)
            assert hv == hs and np.array_equal(bv, bs)
            assert hs != h0
            changed = np.flatnonzero(bs != b0).tolist()
            assert changed == [block]


@needs_avx
@pytest.mark.parametrize("offset", [1, 3, 8, 13, 32, 63])
def test_unaligned_buffers(offset):
    raw = _pages(65, 5)
    buf = raw[offset:offset + 64 * PAGE_SIZE]
    assert buf.ctypes.data % 64 == (raw.ctypes.data + offset) % 64
    assert np.array_equal(pagehash.hash_pages("avx512", buf), pagehash.hash_pages("scalar", buf))
    hv, bv = pagehash.hash_page("avx512", buf[:PAGE_SIZE])
    hs, bs = pagehash.hash_page("scalar", buf[:PAGE_SIZE])
    assert hv == hs and np.array_equal(bv, bs)


def test_the_loaded_choice_and_the_environment_switch():
    forced = os.environ.get(pagehash.ENV_VAR) == "scalar"
    assert pagehash.implementation() == ("avx512" if AVX and not forced else "scalar")
    code = "from livemig.native import pagehash; print(pagehash.implementation())"
    env = dict(os.environ, **{pagehash.ENV_VAR: "scalar"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "scalar"
    env.pop(pagehash.ENV_VAR)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == ("avx512" if AVX else "scalar")


def test_every_native_hash_matches_the_definition():
    """lm_pages_hash (the codec's entry, through the chosen implementation)
    agrees with the named scalar implementation."""
    from livemig.native import ffi, lib

    buf = _pages(32, 6)
    out = np.zeros(32, dtype=np.uint64)
    rc = lib.lm_pages_hash(ffi.cast("uint8_t *", buf.ctypes.data), 32, ffi.NULL, 32,
                           ffi.cast("uint64_t *", out.ctypes.data))
    assert rc >= 0
    assert np.array_equal(out, pagehash.hash_pages("scalar", buf))


def test_hash_page_rejects_a_wrong_size():
    with pytest.raises(ValueError, match="4096"):
        pagehash.hash_page("scalar", bytes(100))

import numpy as np
import pytest

from livemig.codec import kernels as k
from livemig.errors import NativeError


def _pages(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), dtype=np.uint8)


def test_zero_scan_finds_exactly_the_zero_pages():
    p = _pages(8)
    p[[1, 4]] = 0
    p[6] = 0
    p[6, 4095] = 1  # non-zero only in its last byte
    assert np.flatnonzero(k.zero_scan(p)).tolist() == [1, 4]
    assert k.zero_scan(p, [4, 6, 1]).tolist() == [True, False, True]


def test_index_out_of_range_is_an_error():
    with pytest.raises(NativeError):
        k.zero_scan(_pages(2), [2])
    with pytest.raises(NativeError):
        k.hash_pages(_pages(2), [-1])


def test_hash_depends_on_every_byte_and_only_on_content():
    p = _pages(2)
    p[1] = p[0]
    h = k.hash_pages(p)
    assert h[0] == h[1]
    base = int(h[0])
    seen = {base}
    for pos in range(0, 4096, 97):
        q = p[:1].copy()
        q[0, pos] ^= 1
        seen.add(int(k.hash_pages(q)[0]))
    assert len(seen) == 1 + len(range(0, 4096, 97))
    assert k.ZERO_PAGE_HASH == int(k.hash_pages(np.zeros((1, 4096), np.uint8))[0])


def _py_apply(page, delta):
    """Reference decoder of the delta record format, written independently."""
    out = bytearray(page)
    pos = at = 0

    def uleb():
        nonlocal pos
        v = shift = 0
        while True:
            b = delta[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v
    while pos < len(delta):
        at += uleb()
        n = uleb()
        for i in range(n):
            out[at + i] ^= delta[pos + i]
        at += n
        pos += n
    return bytes(out)


@pytest.mark.parametrize("edits", [0, 1, 5, 40])
def test_delta_roundtrip_and_reference_format(edits):
    rng = np.random.default_rng(edits)
    old = _pages(3, seed=1)
    new = old.copy()
    for row in range(3):
        for pos in rng.integers(0, 4096, edits):
            new[row, pos] ^= rng.integers(1, 256)
    slab = old.copy()
    data, lens = k.delta_encode(new, np.arange(3), slab, np.arange(3), 4000)
    assert (slab == new).all()  # the cache now holds the snapshot
    assert (lens >= 0).all()
    if edits == 0:
        assert lens.tolist() == [0, 0, 0]
    off = 0
    for row in range(3):
        d = data[off:off + lens[row]]
        assert _py_apply(old[row].tobytes(), d) == new[row].tobytes()
        off += lens[row]
    staging = old.copy()
    assert k.delta_apply(staging, data, lens)
    assert (staging == new).all()


def test_delta_too_big_appends_nothing():
    old, new = _pages(2, 1), _pages(2, 2)
    slab = old.copy()
    data, lens = k.delta_encode(new, [0, 1], slab, [0, 1], 100)
    assert lens.tolist() == [k.DELTA_TOO_BIG] * 2 and data == b""
    assert (slab == new).all()


@pytest.mark.parametrize("bad", [b"\x80", b"\x00\x05ab", b"\xff\x7f\x01a", b"\x00\x80\x80\x80\x01"])
def test_delta_apply_rejects_malformed(bad):
    staging = _pages(1)
    assert not k.delta_apply(staging, bad, np.array([len(bad)]))


# -- block fingerprints -------------------------------------------------------

from livemig.codec.blockdelta import (BLOCK_BYTES, FULL_MASK, Fingerprints, HeldBlocks,  # noqa: E402
                                gather_blocks)



def test_fingerprint_gives_the_page_hash_and_the_changed_blocks():
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (6, 4096), dtype=np.uint8)
    fp = Fingerprints(6)
    masks, hashes = fp.update(pages, None, np.arange(6))
    assert np.array_equal(hashes, k.hash_pages(pages))
    assert np.all(masks == FULL_MASK)            # nothing valid yet: every block counts
    fp.valid[:] = True
    pages[2, 5 * BLOCK_BYTES + 1] ^= 1
    pages[4, 0] ^= 1
    pages[4, 4095] ^= 1
    masks, _ = fp.update(pages, None, np.arange(6))
    assert masks.tolist() == [0, 0, 1 << 5, 0, 1 | 1 << 15, 0]
    masks, _ = fp.update(pages, None, np.arange(6))
    assert not masks.any()                       # the new fingerprint was stored


def test_gather_then_apply_blocks_patches_only_the_named_blocks():
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, (3, 4096), dtype=np.uint8)
    dst = src.copy()
    src[0, 0:BLOCK_BYTES] ^= 0xFF
    src[2, 3 * BLOCK_BYTES] ^= 1
    masks = np.array([1, 0, 1 << 3], dtype=np.uint16)
    out = np.empty(2 * BLOCK_BYTES, dtype=np.uint8)
    gather_blocks(src, np.arange(3), masks, np.array([0, BLOCK_BYTES, BLOCK_BYTES]), out)
    landed = HeldBlocks(3).apply(dst, np.arange(3), masks, out.tobytes())
    assert np.array_equal(src, dst)
    assert np.array_equal(landed, k.hash_pages(dst))


def test_malformed_blocks_write_nothing_and_bad_rows_are_refused():
    dst = np.zeros((2, 4096), dtype=np.uint8)
    masks = np.array([3, 0], dtype=np.uint16)
    held = HeldBlocks(2)
    assert held.apply(dst, np.arange(2), masks, b"\xff" * BLOCK_BYTES) is None   # needs 2 blocks
    assert held.apply(dst, np.array([0, 2]), masks, b"\xff" * 2 * BLOCK_BYTES) is None
    assert not dst.any()
    with pytest.raises(NativeError):
        gather_blocks(dst, np.array([5]), np.array([1], np.uint16), np.array([0]),
                      np.empty(BLOCK_BYTES, np.uint8))
    with pytest.raises(NativeError):                 # no room for the block
        gather_blocks(dst, np.array([0]), np.array([3], np.uint16), np.array([0]),
                      np.empty(BLOCK_BYTES, np.uint8))


def test_receiver_rehashes_only_written_blocks_and_agrees_with_a_full_hash():
    rng = np.random.default_rng(5)
    mem = np.zeros((8, 4096), dtype=np.uint8)
    held = HeldBlocks(8)
    src = rng.integers(0, 256, (4, 4096), dtype=np.uint8)
    landed = held.place(mem, np.array([1, 3, 5, 7]), src)
    assert np.array_equal(landed, k.hash_pages(mem, np.array([1, 3, 5, 7])))
    held.set_zero(np.array([0]))
    blocks = rng.integers(0, 256, 3 * BLOCK_BYTES, dtype=np.uint8).tobytes()
    masks = np.array([1 << 2, 1 << 15, 1], dtype=np.uint16)
    # page 6 was never placed: its row is rebuilt from memory in full
    got = held.apply(mem, np.array([3, 0, 6]), masks, blocks)
    assert np.array_equal(got, k.hash_pages(mem, np.array([3, 0, 6])))
    assert held.apply(mem, np.array([3]), np.array([3], np.uint16), blocks) is None

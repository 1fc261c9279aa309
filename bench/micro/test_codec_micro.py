"""Page codec: encode and decode of 4 MiB of pages per encoding; page digests."""
import numpy as np
import pytest

from livemig.codec.encoder import BatchDecoder, BatchEncoder
from livemig.config import CodecConfig
from livemig.codec.digest import memory_digest_full, memory_page_hashes
from livemig.native.memory import GuestMemory
from livemig.codec.kernels import hash_pages, zero_scan

NPAGES = 1024   # 4 MiB per round
TEXT = np.frombuffer((b"migration of guest memory, page by page; " * 120)[:4096], np.uint8)


def _fill(pages, kind, rng):
    if kind == "zero":
        pages[:] = 0
    elif kind == "raw":
        pages[:] = rng.integers(0, 256, pages.shape, dtype=np.uint8)
    elif kind == "lz4":
        pages[:] = TEXT
        pages[:, :8] = rng.integers(0, 256, (len(pages), 8), dtype=np.uint8)
    elif kind == "dup":
        distinct = rng.integers(0, 256, (8, 4096), dtype=np.uint8)
        pages[:] = distinct[rng.integers(0, 8, len(pages))]


ENCODINGS = {"zero": ("zero",), "raw": (), "lz4": ("lz4",), "dup": ("dup",),
             "delta": ("delta",)}


@pytest.fixture(params=sorted(ENCODINGS))
def coded(request, memory, rng):
    """(encoder, decoder, page indices, encoding) with a source whose pages suit it."""
    kind = request.param
    idx = np.arange(NPAGES, dtype=np.uint64)
    with GuestMemory(memory.length_bytes) as dst:
        cfg = CodecConfig(encodings=ENCODINGS[kind])
        _fill(memory.pages[:NPAGES], "raw" if kind == "delta" else kind, rng)
        enc, dec = BatchEncoder(memory, cfg), BatchDecoder(dst)
        if kind == "delta":
            # bulk round, then a round of re-dirtied pages (their snapshots become
            # delta bases), then the 8-byte writes whose encoding is measured
            for word in (3, 5):
                for b in enc.encode(idx, 1 << 20):
                    dec.apply(b.tobytes())
                memory.words[:NPAGES, word] += 1
        elif kind == "dup":
            for b in enc.encode(idx, 1 << 20, frozen=True):
                dec.apply(b.tobytes())
        yield enc, dec, idx, kind


def _encode(enc, idx, frozen):
    return list(enc.encode(idx, 1 << 20, frozen=frozen))


def test_encode(benchmark, coded):
    """Encode 1024 pages into 1 MiB batches."""
    enc, _, idx, kind = coded
    batches = benchmark(_encode, enc, idx, kind == "dup")
    used = {k for b in batches for k, v in b.pages_by_encoding.items() if v}
    assert kind in used


def test_decode(benchmark, coded):
    """Apply the batches of 1024 encoded pages to destination memory."""
    enc, dec, idx, kind = coded
    payloads = [b.tobytes() for b in _encode(enc, idx, kind == "dup")]

    def apply_all():
        for p in payloads:
            dec.apply(p)
    benchmark(apply_all)


def test_hash_pages(benchmark, memory, rng):
    """Native 64-bit hash of every page of 64 MiB."""
    _fill(memory.pages, "raw", rng)
    out = benchmark(hash_pages, memory.pages)
    assert len(out) == memory.npages


def test_zero_scan(benchmark, memory):
    """Native zero-page scan of 64 MiB."""
    memory.pages[::4, 0] = 1     # every fourth page is not zero
    assert benchmark(zero_scan, memory.pages).sum() == memory.npages - memory.npages // 4


def test_digest_full(benchmark, memory, rng):
    """xxh3-128 of all 64 MiB (verify='full' at switchover)."""
    _fill(memory.pages, "raw", rng)
    assert len(benchmark(memory_digest_full, memory)) == 16


def test_digest_of_page_hashes(benchmark, memory, rng):
    """Per-page hash table of 64 MiB and its digest (verify='sent')."""
    _fill(memory.pages, "raw", rng)
    assert len(benchmark(lambda: memory_page_hashes(memory).digest())) == 16

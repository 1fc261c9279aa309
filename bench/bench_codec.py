"""Page codec throughput and byte ratios per workload-like memory pattern.

Encodes a guest-memory image of each pattern into 1 MiB batches, applies the
batches to a second region, and reports encode/decode throughput (guest bytes
per second), wire bytes / guest bytes, and the pages per encoding. Also times
the native page kernels against calling xxhash per page from Python.

    python bench/bench_codec.py --quick     # 64 MiB per pattern (about a minute)
    python bench/bench_codec.py             # 1 GiB per pattern

Writes bench/results/codec[-quick].json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import xxhash

from livemig.codec.encoder import BatchDecoder, BatchEncoder
from livemig.config import CodecConfig
from livemig.native.memory import GuestMemory
from livemig.codec.kernels import hash_pages, zero_scan

PAGE = 4096
TEXT = np.frombuffer((b"migration of guest memory, page by page; " * 120)[:PAGE], np.uint8)


def fill(pages: np.ndarray, pattern: str, rng) -> None:
    n = pages.shape[0]
    if pattern == "random":
        pages[:] = rng.integers(0, 256, pages.shape, dtype=np.uint8)
    elif pattern == "zero":
        pages[::64] = rng.integers(0, 256, (len(pages[::64]), PAGE), dtype=np.uint8)
    elif pattern == "text":
        pages[:] = TEXT
        pages[:, :8] = rng.integers(0, 256, (n, 8), dtype=np.uint8)  # distinct pages
    elif pattern == "dup":
        distinct = rng.integers(0, 256, (64, PAGE), dtype=np.uint8)
        pages[:] = distinct[rng.integers(0, 64, n)]
    elif pattern == "mixed":
        kind = rng.integers(0, 4, n)
        pages[kind == 1] = TEXT
        pages[kind == 2] = rng.integers(0, 256, (int((kind == 2).sum()), PAGE), dtype=np.uint8)
        pages[kind == 3] = rng.integers(0, 256, (int((kind == 3).sum()), PAGE), dtype=np.uint8)
    else:
        raise ValueError(pattern)


def transfer(enc, dec, idx, *, frozen=False, batch_bytes=1 << 20):
    t0 = time.perf_counter()
    batches = list(enc.encode(idx, batch_bytes, frozen=frozen))
    t_enc = time.perf_counter() - t0
    payloads = [b.tobytes() for b in batches]
    t0 = time.perf_counter()
    for p in payloads:
        dec.apply(p)
    t_dec = time.perf_counter() - t0
    counts = {}
    for b in batches:
        for k, v in b.pages_by_encoding.items():
            counts[k] = counts.get(k, 0) + v
    return t_enc, t_dec, sum(b.nbytes for b in batches), counts


def bench_pattern(pattern: str, size: int, rng, config: CodecConfig, *, frozen: bool) -> dict:
    with GuestMemory(size) as src, GuestMemory(size) as dst:
        fill(src.pages, pattern, rng)
        enc, dec = BatchEncoder(src, config), BatchDecoder(dst)
        idx = np.arange(src.npages)
        t_enc, t_dec, nbytes, counts = transfer(enc, dec, idx, frozen=frozen)
        assert np.array_equal(src.bytes, dst.bytes)
        assert enc.sent_hashes.digest() == dec.hashes.digest()
        return {"pattern": pattern, "frozen": frozen, "bytes": size,
                "encode_MBps": size / t_enc / 1e6, "decode_MBps": size / t_dec / 1e6,
                "wire_ratio": nbytes / size, "pages": counts}


def bench_delta(size: int, rng, config: CodecConfig) -> dict:
    """Re-dirtied pages with a few 8-byte writes each (a counter-bumping guest)."""
    with GuestMemory(size) as src, GuestMemory(size) as dst:
        fill(src.pages, "random", rng)
        enc, dec = BatchEncoder(src, config), BatchDecoder(dst)
        hot = np.sort(rng.choice(src.npages, min(src.npages, config.delta_cache_bytes // PAGE),
                                 replace=False))
        transfer(enc, dec, np.arange(src.npages))  # bulk round
        src.words[hot, 3] += 1
        transfer(enc, dec, hot)                     # snapshots enter the cache
        for word in (17, 300):
            src.words[hot, word] += 1
        t_enc, t_dec, nbytes, counts = transfer(enc, dec, hot)
        assert np.array_equal(src.bytes, dst.bytes)
        moved = hot.size * PAGE
        return {"pattern": "delta-8B-writes", "frozen": False, "bytes": moved,
                "encode_MBps": moved / t_enc / 1e6, "decode_MBps": moved / t_dec / 1e6,
                "wire_ratio": nbytes / moved, "pages": counts}


def bench_kernels(size: int, rng) -> dict:
    with GuestMemory(size) as m:
        m.pages[:] = rng.integers(0, 256, m.pages.shape, dtype=np.uint8)
        out = {}
        t0 = time.perf_counter()
        hash_pages(m.pages)
        out["c_page_hash_GBps"] = size / (time.perf_counter() - t0) / 1e9
        n = min(m.npages, 16384)
        t0 = time.perf_counter()
        for i in range(n):
            xxhash.xxh3_64_intdigest(m.pages[i])
        dt = time.perf_counter() - t0
        out["py_xxh3_per_page_us"] = dt / n * 1e6
        out["py_xxh3_per_page_GBps"] = n * PAGE / dt / 1e9
        t0 = time.perf_counter()
        for i in range(n):
            xxhash.xxh3_128_digest(m.pages[i])
        out["py_xxh3_128_per_page_us"] = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        zero_scan(m.pages)
        out["zero_scan_nonzero_GBps"] = size / (time.perf_counter() - t0) / 1e9
        m.pages[:] = 0
        t0 = time.perf_counter()
        zero_scan(m.pages)
        out["zero_scan_zero_GBps"] = size / (time.perf_counter() - t0) / 1e9
        hashes = hash_pages(m.pages)
        t0 = time.perf_counter()
        xxhash.xxh3_128_digest(hashes)
        out["digest_of_hash_array_ms"] = (time.perf_counter() - t0) * 1e3
        out["digest_of_hash_array_bytes"] = hashes.nbytes
        t0 = time.perf_counter()
        xxhash.xxh3_128_digest(m.bytes)
        out["full_digest_ms"] = (time.perf_counter() - t0) * 1e3
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB per pattern instead of 1 GiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    size = (64 << 20) if args.quick else (1 << 30)
    rng = np.random.default_rng(42)
    config = CodecConfig(delta_cache_bytes=min(64 << 20, size // 4))
    results = []
    for pattern in ("random", "zero", "text", "dup", "mixed"):
        for frozen in (False, True):
            results.append(bench_pattern(pattern, size, rng, config, frozen=frozen))
    results.append(bench_delta(size, rng, config))
    kernels = bench_kernels(size, rng)
    report = {"size_bytes": size, "quick": args.quick, "machine": platform.machine(),
              "cpus": os.cpu_count(), "batch_bytes": 1 << 20, "patterns": results,
              "kernels": kernels}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "codec-quick.json" if args.quick else "codec.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'pattern':18} {'frozen':6} {'enc MB/s':>9} {'dec MB/s':>9} {'wire/mem':>9}  pages")
    for r in results:
        pages = " ".join(f"{k}={v}" for k, v in r["pages"].items() if v)
        print(f"{r['pattern']:18} {str(r['frozen']):6} {r['encode_MBps']:9.0f} "
              f"{r['decode_MBps']:9.0f} {r['wire_ratio']:9.4f}  {pages}")
    for k, v in kernels.items():
        print(f"{k:32} {v:10.3f}")
    print("wrote", out)


if __name__ == "__main__":
    main()

"""What dirty tracking costs, per backend, measured through livemig's Python API.

For one guest region (1 GiB; 512 MiB with --quick) and every usable backend:
  arm_ms             start() on a fully populated region (wall, from Python)
  first_write_us     per store to a clean, armed page: N random pages poked from C
  untracked_write_us the same pokes with the tracker stopped
  collect_20k_ms     collect() + re-arm with 20 000 random dirty pages (from Python)
  collect_100k_ms    the same with 100 000
  collect_idle_ms    collect() with nothing dirty
  writes_per_s       a native writer thread, untracked vs tracked (collect every 10 ms)
plus the full-compare baseline (compare the region with a shadow copy page by
page, which is what a tracker-less pre-copy would have to do each round).
Medians of the repeats. Results: bench/results/tracking.json and a markdown
table on stdout.

    python bench/bench_tracking.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from livemig import native

from livemig.analysis import probe
from livemig.native.memory import GuestMemory
from livemig.native.tracking import open_tracker

ffi, lib = native.ffi, native.lib
HERE = os.path.dirname(os.path.abspath(__file__))

#: Reference points from C on this kind of machine (docs: DESIGN.md), uffd-async.
REFERENCE_UFFD_ASYNC = {"first_write_us": 1.1, "collect_100k_ms": 5.3,
                        "collect_20k_ms": 1.4, "collect_idle_ms": 0.3}


def poke(m: GuestMemory, pages: np.ndarray, value: int) -> float:
    """Store one word into each listed page from C; seconds taken."""
    ptr = ffi.from_buffer("uint64_t[]", pages)
    t0 = time.perf_counter()
    native.check(lib.lm_region_poke_pages(m.handle, ptr, len(pages), value), "poke")
    return time.perf_counter() - t0


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def writer_rate(m: GuestMemory, seconds: float, tracker=None) -> float:
    """Stores per second of one native writer thread over the whole region;
    with a tracker, collect every 10 ms so the writer keeps meeting clean pages."""
    w = ffi.new("lm_writer **")
    native.check(lib.lm_writer_start(m.handle, 0, m.npages, 12345, 0, w), "writer")
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.01)
            if tracker is not None:
                tracker.collect()
    finally:
        writes = lib.lm_writer_stop(w[0])
        elapsed = time.perf_counter() - t0
        lib.lm_writer_destroy(w[0])
    return writes / elapsed


def bench_backend(name: str, m: GuestMemory, repeats: int, nfirst: int, rng) -> dict:
    res: dict[str, list[float]] = {k: [] for k in (
        "arm_ms", "first_write_us", "untracked_write_us", "collect_20k_ms",
        "collect_100k_ms", "collect_idle_ms")}
    degraded = 0
    with open_tracker(m, name) as t:
        for rep in range(repeats):
            res["arm_ms"].append(timed_ms(t.start))
            t.collect()
            pages = rng.choice(m.npages, size=nfirst, replace=False).astype(np.uint64)
            res["first_write_us"].append(poke(m, pages, rep) / nfirst * 1e6)
            t.collect()
            res["collect_idle_ms"].append(timed_ms(t.collect))
            for ndirty, key in ((20_000, "collect_20k_ms"), (100_000, "collect_100k_ms")):
                pages = rng.choice(m.npages, size=ndirty, replace=False).astype(np.uint64)
                poke(m, pages, rep)
                got = []
                res[key].append(timed_ms(lambda: got.append(t.collect())))
                assert np.isin(pages, got[0]).all(), f"{name} lost writes"
            t.stop()
            pages = rng.choice(m.npages, size=nfirst, replace=False).astype(np.uint64)
            res["untracked_write_us"].append(poke(m, pages, rep) / nfirst * 1e6)
        t.start()
        rate_tracked = writer_rate(m, 0.3, t)
        t.stop()
        st = t.stats
        degraded = st["degraded_pages"]
    rate_untracked = writer_rate(m, 0.3)
    out = {k: statistics.median(v) for k, v in res.items()}
    out.update(writes_per_s_tracked=rate_tracked, writes_per_s_untracked=rate_untracked,
               degraded_pages=degraded, coarse_protects=st["coarse_protects"],
               c_last_collect_ms=st["last_collect_ns"] / 1e6, repeats=repeats)
    return out


def full_compare_ms(m: GuestMemory, repeats: int) -> float:
    """Find changed pages by comparing against a shadow copy, 64 MiB at a time."""
    shadow = m.words.copy()
    chunk = (64 << 20) // native.PAGE_SIZE
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        changed = 0
        for s in range(0, m.npages, chunk):
            changed += int(np.count_nonzero((m.words[s:s + chunk] != shadow[s:s + chunk]).any(axis=1)))
        times.append((time.perf_counter() - t0) * 1e3)
        assert changed == 0
    del shadow
    return statistics.median(times)


def table(results: dict) -> str:
    cols = [("arm_ms", "arm ms"), ("first_write_us", "1st write µs"),
            ("untracked_write_us", "untracked µs"), ("collect_idle_ms", "idle ms"),
            ("collect_20k_ms", "20k ms"), ("collect_100k_ms", "100k ms"),
            ("writes_per_s_tracked", "tracked Mw/s"), ("writes_per_s_untracked", "untracked Mw/s"),
            ("degraded_pages", "degraded pages")]
    lines = ["| backend | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, r in results["backends"].items():
        cells = []
        for key, _ in cols:
            v = r[key]
            if key.startswith("writes_per_s"):
                cells.append(f"{v / 1e6:.2f}")
            elif key == "degraded_pages":
                cells.append(str(int(v)))
            else:
                cells.append(f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"full compare against a shadow copy: {results['full_compare_ms']:.1f} ms "
                 f"for {results['region_mib']} MiB "
                 f"({results['full_compare_ms'] * 1024 / results['region_mib']:.1f} ms/GiB)")
    ua = results["backends"].get("uffd-async")
    if ua:
        lines.append("uffd-async vs the C reference (ratio, target <= 1.5): " + ", ".join(
            f"{k} {ua[k] / ref:.2f}x" for k, ref in REFERENCE_UFFD_ASYNC.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB, 3 repeats")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tracking.json"))
    args = ap.parse_args(argv)
    size_mib, repeats, nfirst = (512, 3, 20_000) if args.quick else (1024, 7, 50_000)
    rng = np.random.default_rng(2024)
    results = {"region_mib": size_mib, "quick": args.quick, "kernel": platform.release(),
               "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "reference_uffd_async_c": REFERENCE_UFFD_ASYNC, "backends": {}, "skipped": {}}
    with GuestMemory(size_mib << 20) as m:
        m.words[:, 0] = 1  # populate every page: a guest's memory is resident
        for name, ok, reason in probe.backends_to_test():
            if not ok:
                results["skipped"][name] = reason
                continue
            results["backends"][name] = bench_backend(name, m, repeats, nfirst, rng)
        results["full_compare_ms"] = full_compare_ms(m, repeats)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

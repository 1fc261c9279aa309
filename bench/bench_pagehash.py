"""The page hash: how fast is each implementation of one definition?

Question (issue 12): the 64-bit page hash (csrc/codec/lm_pagehash.h) is the
largest compute of the native streams on both peers. Its AVX-512 form
(csrc/codec/lm_pagehash_avx512.c) gives the same values; how many GiB/s does
each implementation hash, and what is the ratio, measured in one run?

Method. One process, both implementations called by name
(livemig.native.pagehash.hash_pages: one C call per buffer, page hashes
only out). Two buffers of random bytes: 256 MiB (far beyond the caches:
each page comes from memory, as a guest page the source reads for the first
time) and 1 MiB hashed 256 times (cache-resident: as a page the stream
thread has just copied or checksummed). In each repetition every
(buffer, implementation) pair runs once, interleaved, so load from other
jobs on the shared machine touches both; medians of ``--repeat``. The
values are checked equal before timing.

Usage: python bench/bench_pagehash.py [--repeat 5] [--out bench/results/pagehash.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from livemig.native import pagehash  # noqa: E402
import report  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BUFFERS = {"256 MiB (from memory)": (256 * MiB, 1), "1 MiB x 256 (cached)": (1 * MiB, 256)}


def time_once(impl: str, buf: np.ndarray, times: int) -> float:
    """GiB/s hashing ``buf`` ``times`` times with ``impl``."""
    t0 = time.perf_counter()
    for _ in range(times):
        pagehash.hash_pages(impl, buf)
    return buf.nbytes * times / GiB / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pagehash.json"))
    args = ap.parse_args()
    impls = [n for n in pagehash.IMPLEMENTATIONS if pagehash.available(n)]
    rng = np.random.default_rng(1)
    bufs = {name: np.frombuffer(rng.bytes(size), np.uint8) for name, (size, _) in BUFFERS.items()}
    for buf in bufs.values():
        ref = pagehash.hash_pages("scalar", buf)
        for impl in impls:
            assert np.array_equal(pagehash.hash_pages(impl, buf), ref), impl
    load_before = os.getloadavg()
    runs = []
    for rep in range(args.repeat):
        for name, (_, times) in BUFFERS.items():
            for impl in impls:
                gib_s = time_once(impl, bufs[name], times)
                runs.append({"rep": rep, "buffer": name, "impl": impl, "gib_s": gib_s})
                print(f"rep {rep}: {name} {impl} {gib_s:.2f} GiB/s", flush=True)
    summary = []
    for name in BUFFERS:
        med = {impl: statistics.median(r["gib_s"] for r in runs
                                       if r["buffer"] == name and r["impl"] == impl)
               for impl in impls}
        summary.append({"buffer": name, "gib_s": med,
                        "avx512_vs_scalar": (med["avx512"] / med["scalar"]
                                             if "avx512" in med else None)})
    result = {
        "question": "page hash GiB/s per implementation (same values), random pages, "
                    "medians, ratio in one run",
        "repeat": args.repeat, "implementations": impls,
        "in_use": pagehash.implementation(),
        "machine": report.machine(load_before), "runs": runs, "summary": summary,
    }
    lines = ["| buffer | " + " | ".join(f"{i} GiB/s" for i in impls) + " | avx512 / scalar |",
             "|---|" + "---:|" * (len(impls) + 1)]
    for s in summary:
        ratio = "-" if s["avx512_vs_scalar"] is None else f"{s['avx512_vs_scalar']:.2f}×"
        lines.append(f"| {s['buffer']} | " + " | ".join(f"{s['gib_s'][i]:.2f}" for i in impls)
                     + f" | {ratio} |")
    report.write(args.out, result, "\n".join(lines))
    print(f"load average before {load_before}, after {result['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()

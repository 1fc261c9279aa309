"""Dirty-page traces: how big a recording is, and how faithfully it replays.

    python bench/bench_traces.py [--memory 1GiB] [--seconds 5] [--repeats 3]
                                 [--json bench/results/traces.json]

For each workload and rate: a VM of --memory with 2 vCPUs runs paced; its
dirty pages are recorded for --seconds at 0.1 s intervals (the file's bytes
per second of recording are reported); then the trace is replayed as the
``trace:FILE`` workload in a VM big enough for an exact mapping, and the
replayed VM's dirty rate is measured by the same tracker method over the same
window. The ratio replayed / recorded (pages per interval) is the fidelity;
medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from livemig.analysis.dirtyrate import measure_dirty_rate, record_trace
from livemig.units import PAGE_SIZE, parse_size
from livemig.vm import trace
from livemig.vm.machine import VM

CASES = (("uniform", "16MiB/s"), ("uniform", "64MiB/s"), ("hotset", "64MiB/s"))
INTERVAL_S = 0.1


def one(workload: str, rate: str, memory: int, seconds: float, path: str) -> dict:
    with VM(memory, 2, workload, dirty_rate=rate, seed=7) as vm:
        vm.start()
        rec = record_trace(vm, path, seconds, interval_s=INTERVAL_S)
    t = trace.load(path)
    replay_memory = t.memory_bytes + (2 * trace.trace_area_npages(t) + 8) * PAGE_SIZE
    with VM(replay_memory, 2, f"trace:{path}", seed=7) as vm:
        vm.start()
        rep = measure_dirty_rate(vm, seconds, interval_s=INTERVAL_S)
    replayed_bps = rep.interval_pages * PAGE_SIZE / rep.window_s
    return {"workload": workload, "rate": rate,
            "recorded_bps": rec["dirty_rate_bps"], "replayed_bps": replayed_bps,
            "ratio": replayed_bps / rec["dirty_rate_bps"],
            "file_bytes_per_s": rec["file_bytes"] / seconds,
            "bytes_per_dirty_page": (rec["file_bytes"] - trace.HEADER_BYTES)
            / max(1, rec["dirty_pages"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    memory = parse_size(args.memory)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload, rate in CASES:
            runs = [one(workload, rate, memory, args.seconds, os.path.join(tmp, "t.lmtrace"))
                    for _ in range(args.repeats)]
            row = {k: runs[0][k] for k in ("workload", "rate")}
            for k in ("recorded_bps", "replayed_bps", "ratio", "file_bytes_per_s",
                      "bytes_per_dirty_page"):
                row[k] = statistics.median(r[k] for r in runs)
            row["runs"] = runs
            rows.append(row)
    print(f"| workload | rate | recorded MiB/s | replayed MiB/s | replayed / recorded "
          f"| file KiB per s | bytes per dirty page |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['rate']} | {r['recorded_bps'] / 2**20:.1f} "
              f"| {r['replayed_bps'] / 2**20:.1f} | {r['ratio']:.2f} "
              f"| {r['file_bytes_per_s'] / 1024:.1f} | {r['bytes_per_dirty_page']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": args.memory, "seconds": args.seconds,
                       "repeats": args.repeats, "interval_s": INTERVAL_S, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

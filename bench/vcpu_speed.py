"""How fast is the toy vCPU? Instructions/s per workload, and pause latency.

    python bench/vcpu_speed.py [--seconds 0.5] [--json out.json]

Each workload runs unpaced on one vCPU in 64 MiB for the given time; the
result is retired instructions per second and page writes (TICKs) per
second, then the pause latency (pause() call to parked) over 200 tries.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from livemig.vm.machine import VM


def rates(name: str, seconds: float) -> dict:
    with VM("64MiB", 1, name, seed=1) as vm:
        vm.start()
        time.sleep(0.05)
        s0, t0 = vm.stats(), time.monotonic()
        time.sleep(seconds)
        s1, t1 = vm.stats(), time.monotonic()
        vm.pause()
    dt = t1 - t0
    return {"workload": name,
            "instructions_per_s": (s1["steps"] - s0["steps"]) / dt,
            "ticks_per_s": (s1["ticks"] - s0["ticks"]) / dt,
            "stores_per_s": (s1["stores"] - s0["stores"]) / dt}


def pause_latency(tries: int = 200) -> dict:
    with VM("16MiB", 1, "uniform") as vm:
        lat = []
        for _ in range(tries):
            vm.resume()
            time.sleep(0.001)
            t0 = time.perf_counter()
            vm.pause()
            lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"pause_p50_us": statistics.median(lat) * 1e6,
            "pause_p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
            "pause_max_us": lat[-1] * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = {"workloads": [rates(w, args.seconds)
                             for w in ("idle", "uniform", "hotset", "sweep", "memtest")],
               **pause_latency()}
    for r in results["workloads"]:
        print(f"{r['workload']:>8}: {r['instructions_per_s'] / 1e6:7.1f} M instr/s, "
              f"{r['ticks_per_s'] / 1e6:6.2f} M ticks/s")
    print(f"pause: p50 {results['pause_p50_us']:.0f} us, p99 {results['pause_p99_us']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

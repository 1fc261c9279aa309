"""``livemig vm run``: a VM running here under dirty tracking.

The simplest useful thing livemig does without a peer: start a VM with a
workload, arm a dirty tracker on its memory, and every interval collect the
pages written since the last collect. It reports the dirty rate the tracker
sees (pages/s and MiB/s, against the workload's target), how long each
collect-and-re-arm took, and how fast the guest executes — the numbers that
decide whether a migration of this VM can converge.
"""
from __future__ import annotations

import json
import sys
import time

from ..native import PAGE_SIZE
from ..native.tracking import open_tracker
from ..units import format_rate, parse_optional_rate, parse_size
from .machine import VM


def run_tracked(*, memory, vcpus, workload, dirty_rate, seconds, tracker="auto",
                interval_s=1.0, as_json=False, seed=0, out=sys.stdout) -> int:
    rate = parse_optional_rate(dirty_rate, what="--dirty-rate")
    samples = []
    with VM(memory=parse_size(memory, what="--memory"), vcpus=vcpus, workload=workload,
            dirty_rate=rate, seed=seed) as vm, open_tracker(vm.memory, tracker) as trk:
        if not as_json:
            print(f"VM: {workload}, {vm.memory.length_bytes >> 20} MiB, {vm.nvcpus} vCPUs, target "
                  f"{format_rate(rate) if rate else 'unpaced'}; tracker {trk.name} "
                  f"({trk.choice_reason})", file=out)
            print(f"{'t (s)':>6} {'dirty pages/s':>14} {'dirty MiB/s':>12} {'collect ms':>11} "
                  f"{'Minstr/s':>9} {'distinct pages':>15}", file=out)
        trk.start()
        vm.start()
        t0 = last = time.monotonic()
        steps_last = sum(vm.steps())
        while True:
            time.sleep(max(0.0, min(interval_s, t0 + seconds - time.monotonic())))
            c0 = time.perf_counter()
            pages = trk.collect()
            collect_ms = (time.perf_counter() - c0) * 1e3
            now = time.monotonic()
            steps = sum(vm.steps())
            dt = now - last
            sample = {"t_s": round(now - t0, 3), "dirty_pages": int(len(pages)),
                      "dirty_pages_per_s": len(pages) / dt,
                      "dirty_bytes_per_s": len(pages) * PAGE_SIZE / dt,
                      "collect_ms": collect_ms, "instructions_per_s": (steps - steps_last) / dt}
            samples.append(sample)
            if not as_json:
                print(f"{sample['t_s']:6.1f} {sample['dirty_pages_per_s']:14,.0f} "
                      f"{sample['dirty_bytes_per_s'] / (1 << 20):12.1f} {collect_ms:11.2f} "
                      f"{sample['instructions_per_s'] / 1e6:9.1f} {len(pages):15,}", file=out)
            last, steps_last = now, steps
            if now - t0 >= seconds:
                break
        vm.pause()
        vm.check_guest()
        stats = trk.stats
    mean = (sum(s["dirty_bytes_per_s"] for s in samples) / len(samples)) if samples else 0.0
    summary = {"workload": workload, "memory_bytes": parse_size(memory), "vcpus": vcpus,
               "tracker": trk.name, "tracker_reason": trk.choice_reason,
               "target_dirty_bytes_per_s": rate, "mean_dirty_bytes_per_s": mean,
               "samples": samples, "tracker_stats": stats}
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(f"mean dirty rate {format_rate(mean)}"
              + (f" (target {format_rate(rate)})" if rate else "")
              + "; the guest checked itself and found no corruption", file=out)
    return 0

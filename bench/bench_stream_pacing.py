"""Does a capped migration on the native streams move at its cap?

Question (issue 12): with ``--max-bandwidth`` a migration now runs on the
native streams, paced by one token bucket in C shared by its stream threads.
What rate does it reach, against the cap, with 1, 2 and 4 streams?

Method. An idle 2-vCPU guest whose memory is random bytes (every page RAW),
migrated over loopback to a MigrationServer in the same process (uvloop).
The rate is the page-batch bytes of the pre-copy rounds over the rounds'
duration (the migration's own clock, set-up and switchover excluded).
Medians of ``--repeat`` runs; the kinds of run are interleaved.

Usage: python bench/bench_stream_pacing.py [--memory 128MiB] [--repeat 3]
       [--out bench/results/stream_pacing.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

import numpy as np

from livemig.aio.loop import run
from livemig.config import MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.native import PAGE_SIZE
from livemig.units import parse_size
from livemig.vm.machine import VM

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CAPS_MIBS = (32, 128, 512)
STREAMS = (1, 2, 4)


async def migrate_once(memory_bytes: int, cap_bps: float, streams: int, seed: int) -> dict:
    vm = VM(memory_bytes, 2, "idle", seed=seed)
    try:
        start = vm.layout.data_first_page(0) * PAGE_SIZE
        noise = np.random.default_rng(seed).bytes(memory_bytes - start)
        vm.memory.bytes[start:] = np.frombuffer(noise, np.uint8)
        vm.start()
        async with MigrationServer("127.0.0.1", 0) as server:
            stats = await migrate(vm, "127.0.0.1", server.port, name="paced",
                                  config=MigrationConfig(streams=streams,
                                                         max_bandwidth_bps=cap_bps))
            _, moved = await server.completed.get()
            moved.close()
    finally:
        vm.close()
    seconds = sum(r.duration_s for r in stats.rounds)
    nbytes = sum(r.bytes_sent for r in stats.rounds)
    return {"data_path": stats.data_path, "rate_bps": nbytes / seconds, "bytes": nbytes,
            "seconds": seconds, "ratio": nbytes / seconds / cap_bps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="128MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stream_pacing.json"))
    args = ap.parse_args()
    memory_bytes = parse_size(args.memory)
    runs: dict[str, list] = {}
    for i in range(args.repeat):
        for cap in CAPS_MIBS:
            for n in STREAMS:
                r = run(migrate_once(memory_bytes, cap * MiB, n, seed=i + 1), kind="uvloop")
                runs.setdefault(f"{cap}MiB/s x{n}", []).append(r)
                print(cap, n, i, r["data_path"], f"{r['rate_bps'] / MiB:.1f} MiB/s",
                      f"ratio {r['ratio']:.3f}", flush=True)
    summary = {k: {"rate_mibs_median": statistics.median(r["rate_bps"] for r in v) / MiB,
                   "ratio_median": statistics.median(r["ratio"] for r in v),
                   "ratio_max": max(r["ratio"] for r in v),
                   "data_path": v[0]["data_path"]} for k, v in runs.items()}
    Path(args.out).write_text(json.dumps({"memory_bytes": memory_bytes, "runs": runs,
                                          "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Several migrations leaving one daemon at once: each one's downtime against its limit.

Starts two daemon processes on loopback, starts ``N`` VMs on the first, asks
for all their migrations at once and records each one's measured and
expected downtime, and the warning a breach carries. Writes
bench/results/concurrent_migrations.json.

    python bench/bench_concurrent_migrations.py [--counts 2 4] [--memory 64MiB]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from livemig.lab.daemonproc import free_port, stop, wait_ready
from livemig.service.control import ControlClient

OUT = Path(__file__).parent / "results" / "concurrent_migrations.json"


def daemon(tmp: Path, label: str):
    port, control, log = free_port(), str(tmp / f"{label}.sock"), str(tmp / f"{label}.log")
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "daemon", "--listen",
                             f"127.0.0.1:{port}", "--control", control],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=600)
    wait_ready(client, proc, log)
    return proc, client, f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--memory", default="64MiB")
    ap.add_argument("--dirty-rate", default="8MiB/s")
    ap.add_argument("--downtime-ms", type=float, default=300.0)
    args = ap.parse_args()
    results = []
    for count in args.counts:
        tmp = Path(tempfile.mkdtemp())
        (sp, src, _), (dp, dst, dst_address) = daemon(tmp, "src"), daemon(tmp, "dst")
        try:
            names = [f"vm{i}" for i in range(count)]
            for i, name in enumerate(names):
                src.call("vm.start", name=name, memory=args.memory, vcpus=1,
                         workload="uniform", dirty_rate=args.dirty_rate, seed=i)
            recs = [src.call("migrate", name=name, to=dst_address,
                             downtime_ms=args.downtime_ms) for name in names]
            for rec in recs:
                final = src.call("migration.wait", id=rec["id"], timeout_s=300)
                stats = final.get("stats") or {}
                results.append({"concurrent": count, "vm": final["vm"],
                                "status": final["status"],
                                "downtime_ms": stats.get("downtime_ms"),
                                "expected_downtime_ms": stats.get("expected_downtime_ms"),
                                "limit_ms": args.downtime_ms,
                                "total_time_ms": stats.get("total_time_ms"),
                                "warning": final.get("warning")})
                print(results[-1])
        finally:
            stop(src, sp)
            stop(dst, dp)
    OUT.write_text(json.dumps({"host_cpus": os.cpu_count(), "memory": args.memory,
                               "dirty_rate": args.dirty_rate, "link": "loopback",
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The fleet's costs: the etcd transaction at the commit point, a drain against
the same moves one at a time, and the planner over a generated fleet.

1. **Commit point**: the destination's ownership step (the VM's key read
   at the offer, then at the commit point the compare-and-set transaction;
   fleet/member.py ``commit_gate``)
   against a 1-member etcd on loopback, timed alone: this is the time the
   guest stays paused longer than without a fleet. Median and p99 over
   ``--commits`` handovers, per repeat.
2. **Drain**: three daemons in a fleet; ``--vms`` VMs on the first are
   migrated one at a time to the second (the sum of single migrations), then
   moved back and drained with ``livemig fleet drain`` (``--per-host-limit``
   at a time, to both others). Drain time as the draining host reports it.
3. **Simulator**: ``fleet simulate`` over ``--hosts`` hosts and ``--fleet-vms``
   VMs (drain of the 10 most loaded hosts, and a balance): CPU seconds.

Medians of ``--repeats`` repeats. Writes bench/results/fleet.json.

    python bench/bench_fleet.py [--repeats 3] [--vms 3] [--memory 32MiB]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from livemig.fleet import keys  # noqa: E402
from livemig.fleet.member import FleetMember  # noqa: E402
from livemig.fleet.simulate import simulate  # noqa: E402
from livemig.lab.daemonproc import free_port, stop, wait_ready  # noqa: E402
from livemig.service.control import ControlClient  # noqa: E402
from support.etcd import etcd_cluster  # noqa: E402

OUT = Path(__file__).parent / "results" / "fleet.json"


class _Host:
    """The little of a daemon a FleetMember reads."""

    def __init__(self, advertised: str):
        self.advertised, self.vms = advertised, {}


async def commit_point(url: str, n: int) -> dict:
    member = FleetMember(_Host("127.0.0.1:1"), url, ttl_s=60)
    await member.join()
    try:
        times_ms = []
        for i in range(n):
            name = f"bench-{i}"
            await member.client.put(keys.vm_key(name), keys.owner_record("127.0.0.1:2", 1))
            gate = member.commit_gate(name, "127.0.0.1:2")    # at the offer: the key read
            await asyncio.sleep(0.005)                         # ... rounds of pages ...
            t0 = time.perf_counter()
            await gate()                                       # the commit point
            times_ms.append((time.perf_counter() - t0) * 1e3)
            await member.client.delete(keys.vm_key(name))
        times_ms.sort()
        return {"median_ms": statistics.median(times_ms),
                "p99_ms": times_ms[int(0.99 * (len(times_ms) - 1))], "n": n}
    finally:
        await member.close()


def _daemon(tmp: Path, label: str, url: str):
    port, control, log = free_port(), str(tmp / f"{label}.sock"), str(tmp / f"{label}.log")
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "daemon", "--listen",
                             f"127.0.0.1:{port}", "--control", control, "--state-dir",
                             str(tmp / label), "--fleet", url, "--fleet-ttl", "3"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=600)
    wait_ready(client, proc, log)
    return proc, client, f"127.0.0.1:{port}"


def drain_vs_single(tmp: Path, url: str, *, nvms: int, memory: str, limit: int,
                    run: int) -> dict:
    ds = [_daemon(tmp, label, url) for label in ("a", "b", "c")]
    (_, a, a_addr), (_, b, b_addr) = ds[0], ds[1]
    try:
        names = [f"r{run}-vm{i}" for i in range(nvms)]
        for i, name in enumerate(names):
            a.call("vm.start", name=name, memory=memory, vcpus=1, workload="memtest",
                   dirty_rate="8MiB/s", seed=i)
        single_s = []
        for name in names:
            t0 = time.perf_counter()
            rec = a.call("migrate", name=name, to=b_addr, wait=True)
            single_s.append(time.perf_counter() - t0)
            assert rec["status"] == "completed", rec
        for name in names:
            assert b.call("migrate", name=name, to=a_addr, wait=True)["status"] == "completed"
        deadline = time.monotonic() + 60
        while True:     # a's record lists every VM before the drain reads it
            out = subprocess.run([sys.executable, "-m", "livemig", "fleet", "hosts", "--fleet",
                                  url, "--json"], capture_output=True, text=True, check=True)
            host = next(h for h in json.loads(out.stdout)["hosts"] if h["addr"] == a_addr)
            if set(names) <= set(host.get("vms", {})) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "livemig", "fleet", "drain", a_addr,
                              "--fleet", url, "--per-host-limit", str(limit), "--json"],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)["result"]
        assert result["left"] == [], result
        return {"vms": nvms, "memory": memory, "per_host_limit": limit,
                "sum_single_s": sum(single_s), "single_s": single_s,
                "drain_s": result["time_s"]}
    finally:
        for proc, client, _ in ds:
            stop(client, proc)


def planner_cpu(nhosts: int, nvms: int) -> dict:
    return {"drain": simulate(nhosts=nhosts, nvms=nvms, action="drain"),
            "balance": simulate(nhosts=nhosts, nvms=nvms, action="balance")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--vms", type=int, default=3)
    ap.add_argument("--memory", default="32MiB")
    ap.add_argument("--per-host-limit", type=int, default=2)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--fleet-vms", type=int, default=20000)
    ap.add_argument("--etcd-dir", default=None,
                    help="where etcd keeps its data (e.g. /dev/shm: no disk fsync in the way)")
    ap.add_argument("--commit-only", action="store_true",
                    help="measure the commit point only (results to fleet_commit.json)")
    args = ap.parse_args()
    if args.commit_only:
        with tempfile.TemporaryDirectory(dir=args.etcd_dir) as d, \
                etcd_cluster(Path(d), 1) as etcd:
            runs = [asyncio.run(commit_point(etcd.url, args.commits))
                    for _ in range(args.repeats)]
        summary = {"commit_median_ms": statistics.median(r["median_ms"] for r in runs),
                   "commit_p99_ms": statistics.median(r["p99_ms"] for r in runs),
                   "etcd_dir": args.etcd_dir or tempfile.gettempdir()}
        out = OUT.with_name("fleet_commit.json")
        out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs},
                                  indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return
    runs = {"commit": [], "drain": [], "simulate": []}
    with tempfile.TemporaryDirectory(dir=args.etcd_dir) as d, \
            etcd_cluster(Path(d), 1) as etcd:
        for r in range(args.repeats):
            runs["commit"].append(asyncio.run(commit_point(etcd.url, args.commits)))
            tmp = Path(d) / f"run{r}"
            tmp.mkdir()
            runs["drain"].append(drain_vs_single(tmp, etcd.url, nvms=args.vms,
                                                 memory=args.memory, limit=args.per_host_limit,
                                                 run=r))
            runs["simulate"].append(planner_cpu(args.hosts, args.fleet_vms))
    med = statistics.median
    summary = {
        "commit_median_ms": med(r["median_ms"] for r in runs["commit"]),
        "commit_p99_ms": med(r["p99_ms"] for r in runs["commit"]),
        "drain_s": med(r["drain_s"] for r in runs["drain"]),
        "sum_single_s": med(r["sum_single_s"] for r in runs["drain"]),
        "drain_over_single": med(r["drain_s"] / r["sum_single_s"] for r in runs["drain"]),
        "simulate_drain_cpu_s": med(r["drain"]["planner_cpu_s"] for r in runs["simulate"]),
        "simulate_balance_cpu_s": med(r["balance"]["planner_cpu_s"] for r in runs["simulate"]),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs},
                              indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

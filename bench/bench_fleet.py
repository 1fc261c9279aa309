"""The fleet's costs: the etcd transaction at the commit point, a drain against
the same moves one at a time, and the planner over a generated fleet.

1. **Commit point**: the destination's ownership step (the VM's key read
   before the offer is accepted, then at the commit point one transaction:
   owner := here, epoch + 1; fleet/member.py ``CommitGate``)
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

``--commit-only --etcd-dirs /tmp /dev/shm`` measures only the commit point
(its transaction, with the blocking-socket fast path and through
the event loop alone, interleaved), against one etcd per data directory in
the same run (disk against tmpfs),
and adds from each etcd's ``/metrics`` its WAL fsyncs during the measure
(count, mean) and, as the floor of the client's path, the same transaction
sent from a blocking socket (no asyncio, no client); then, end to end, the
downtime of migrations between two fleet daemons against two without a fleet
(``--moves`` per repeat, on the first directory's etcd):
bench/results/fleet_commit.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from livemig.fleet import keys  # noqa: E402
from livemig.fleet.etcd import cmp_absent, cmp_mod_revision, op_get, op_put  # noqa: E402
from livemig.fleet.member import FleetMember  # noqa: E402
from livemig.fleet.simulate import simulate  # noqa: E402
from livemig.lab.daemonproc import free_port, stop, wait_ready  # noqa: E402
from livemig.service.control import ControlClient  # noqa: E402
from support.etcd import etcd_cluster  # noqa: E402
from support.fleet import DaemonStub  # noqa: E402

OUT = Path(__file__).parent / "results" / "fleet.json"


async def commit_point(url: str, n: int, fast: bool = True) -> dict:
    """The whole commit point as the guest's pause sees it: its transaction
    (owner := here, epoch + 1). ``fast``: first from a blocking socket
    (fleet/blockingtxn.py), else through the event loop only."""
    member = FleetMember(DaemonStub("127.0.0.1:1"), url, ttl_s=60, fast_commit=fast)
    await member.join()
    try:
        times_ms = []
        for i in range(n):
            name = f"bench-{i}"
            await member.client.put(keys.vm_key(name), keys.owner_record("127.0.0.1:2", 1))
            gate = member.commit_gate(name, "127.0.0.1:2")
            await gate.admit()                                 # at the offer: the key read
            await asyncio.sleep(0.005)                         # ... rounds of pages ...
            t0 = time.perf_counter()
            await gate()                                       # the commit point
            times_ms.append((time.perf_counter() - t0) * 1e3)
            await member.client.delete(keys.vm_key(name))
        times_ms.sort()
        return {"median_ms": statistics.median(times_ms),
                "p99_ms": times_ms[int(0.99 * (len(times_ms) - 1))], "n": n, "fast": fast}
    finally:
        await member.close()


def _metric(endpoint: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def wal_fsync(endpoint: str) -> tuple[float, float]:
    """(count, seconds) of etcd's WAL fsyncs so far."""
    return (_metric(endpoint, "etcd_disk_wal_fsync_duration_seconds_count"),
            _metric(endpoint, "etcd_disk_wal_fsync_duration_seconds_sum"))


def raw_txn(endpoint: str, n: int) -> dict:
    """The commit point's transaction (a revision compare, a put, the
    failure reads), each after a 5 ms idle gap as in ``commit_point``, from
    a blocking socket: what etcd and the loopback cost without our client."""
    host, port = endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key, times_ms = keys.vm_key("raw"), []

    def exchange(body: bytes) -> dict:
        sock.sendall(b"POST /v3/kv/txn HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
        return json.loads(rest)
    try:
        revision = 0
        for i in range(n):
            compare = [cmp_absent(key) if not revision else cmp_mod_revision(key, revision),
                       cmp_absent(keys.drain_key("127.0.0.1:1"))]
            body = json.dumps({"compare": compare, "success": [
                op_put(key, keys.owner_record("127.0.0.1:1", i))],
                "failure": [op_get(key)]}).encode()
            time.sleep(0.005)
            t0 = time.perf_counter()
            answer = exchange(body)
            times_ms.append((time.perf_counter() - t0) * 1e3)
            revision = int(answer["header"]["revision"])
        return {"median_ms": statistics.median(times_ms), "n": n}
    finally:
        sock.close()


def commit_only(args) -> None:
    """The commit point against one etcd per data directory, in one run."""
    results = {}
    for etcd_dir in args.etcd_dirs:
        with tempfile.TemporaryDirectory(dir=etcd_dir) as d, etcd_cluster(Path(d), 1) as etcd:
            before = wal_fsync(etcd.endpoints[0])
            runs, loop_runs = [], []
            for _ in range(args.repeats):     # interleaved: the same machine load for both
                runs.append(asyncio.run(commit_point(etcd.url, args.commits, fast=True)))
                loop_runs.append(asyncio.run(commit_point(etcd.url, args.commits, fast=False)))
            after = wal_fsync(etcd.endpoints[0])
            raw = [raw_txn(etcd.endpoints[0], args.commits) for _ in range(args.repeats)]
        fsyncs, fsync_s = after[0] - before[0], after[1] - before[1]
        results[etcd_dir] = {
            "commit_median_ms": statistics.median(r["median_ms"] for r in runs),
            "commit_p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "loop_only_median_ms": statistics.median(r["median_ms"] for r in loop_runs),
            "loop_only_p99_ms": statistics.median(r["p99_ms"] for r in loop_runs),
            "raw_txn_median_ms": statistics.median(r["median_ms"] for r in raw),
            # four writes per handover here (the bench's put, commit, resume, delete)
            "wal_fsyncs": fsyncs, "wal_fsync_mean_ms": 1e3 * fsync_s / max(fsyncs, 1),
            "runs": runs, "loop_runs": loop_runs, "raw_runs": raw}
        print(etcd_dir, json.dumps({k: v for k, v in results[etcd_dir].items()
                                    if not k.endswith("runs")}), flush=True)
    end_to_end = None
    if args.moves:
        with tempfile.TemporaryDirectory(dir=args.etcd_dirs[0]) as d, \
                etcd_cluster(Path(d), 1) as etcd:
            end_to_end = downtime_fleet_vs_plain(Path(d), etcd.url, moves=args.moves,
                                                 repeats=args.repeats)
        print("end to end", json.dumps({k: v for k, v in end_to_end.items() if k != "runs"}),
              flush=True)
    out = OUT.with_name("fleet_commit.json")
    out.write_text(json.dumps({"args": vars(args), "load_1m": os.getloadavg()[0],
                               "by_etcd_dir": results, "end_to_end": end_to_end},
                              indent=1) + "\n")
    print(f"wrote {out}")


def _daemon(tmp: Path, label: str, url: str | None):
    """A daemon joined to the fleet at ``url`` (None: no fleet)."""
    port, control, log = free_port(), str(tmp / f"{label}.sock"), str(tmp / f"{label}.log")
    fleet = ["--fleet", url, "--fleet-ttl", "3"] if url else []
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "daemon", "--listen",
                             f"127.0.0.1:{port}", "--control", control, "--state-dir",
                             str(tmp / label), *fleet],
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


def downtime_fleet_vs_plain(tmp: Path, url: str, *, moves: int, repeats: int) -> dict:
    """End to end: one VM moved back and forth between two fleet daemons, and
    one between two daemons without a fleet, in turn (the same machine load);
    each migration's downtime as its source reports it (``stats.downtime_ms``).
    Medians per repeat, then the median of those."""
    pairs = {kind: [_daemon(tmp, f"{kind}-{x}", url if kind == "fleet" else None)
                    for x in ("a", "b")] for kind in ("fleet", "plain")}
    try:
        for kind, ((_, a, _), _) in pairs.items():
            a.call("vm.start", name=f"dt-{kind}", memory="16MiB", vcpus=1,
                   workload="memtest", dirty_rate="1MiB/s", seed=1)
        runs = {"fleet": [], "plain": []}
        for _ in range(repeats):
            got = {"fleet": [], "plain": []}
            for i in range(moves):
                for kind, ((_, a, a_addr), (_, b, b_addr)) in pairs.items():
                    frm, to = (a, b_addr) if i % 2 == 0 else (b, a_addr)
                    rec = frm.call("migrate", name=f"dt-{kind}", to=to, wait=True)
                    assert rec["status"] == "completed", rec
                    got[kind].append(rec["stats"]["downtime_ms"])
            for kind in runs:
                runs[kind].append({"median_ms": statistics.median(got[kind]),
                                   "downtime_ms": got[kind]})
        med = statistics.median
        return {"fleet_median_ms": med(r["median_ms"] for r in runs["fleet"]),
                "plain_median_ms": med(r["median_ms"] for r in runs["plain"]),
                "added_ms": med(f["median_ms"] - p["median_ms"]
                                for f, p in zip(runs["fleet"], runs["plain"])),
                "moves_per_repeat": moves, "runs": runs}
    finally:
        for pair in pairs.values():
            for proc, client, _ in pair:
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
    ap.add_argument("--etcd-dirs", nargs="+", default=["/tmp", "/dev/shm"],
                    help="with --commit-only: one etcd per data directory, in turn")
    ap.add_argument("--moves", type=int, default=10,
                    help="with --commit-only: migrations per repeat for the end-to-end "
                         "downtime, fleet against no fleet (0: skip)")
    args = ap.parse_args()
    if args.commit_only:
        commit_only(args)
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

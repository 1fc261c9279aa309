"""Pre-copy migrations: time, downtime, rounds, bytes, encodings, memory.

Questions
1. sweep: for a 2-vCPU ``uniform`` guest (``idle`` at 0 MiB/s) whose data
   pages hold random bytes (as in the QEMU reference: 1 GiB of random data), at
   several dirty rates and link caps (``max_bandwidth_bps``; none = loopback
   speed): total time, downtime, rounds, bytes sent / memory, converged.
   Target: p50 downtime <= 50 ms wherever the dirty rate is below half the link.
   A run that has not converged after ``--max-total-s`` gives up (plain
   pre-copy, no auto-converge): that point is reported as not converged.
2. encodings: per workload (its own memory contents, not pre-filled), the
   effect of switching off one encoding at a time (zero, dup, delta, lz4 via
   CodecConfig) on bytes sent and total time.
3. memory: peak RSS (VmHWM) and sampled VmRSS of the source and destination
   processes during one migration. Target: guest memory + 10 % + 64 MiB each.

Method. Every migration has its own source process (spawned: builds the VM,
fills it, starts the guest, waits ``--warmup-s``, migrates, reports the
stats) and goes to a destination ``livemig daemon`` process on loopback, so
the two sides never share an interpreter. The arrived VM is stopped through
the daemon's control socket before the next run. Downtime is the source's
measurement (pause to ``Resumed``, one round trip included). Medians over
``--repeat`` runs. ``--quick``: 256 MiB, fewer points (the mode that runs in
CI); the default is 1 GiB.

Usage: python bench/bench_migration.py [--quick] [--part sweep,encodings,memory]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MiB = 1 << 20
FILL_CHUNK_BYTES = 1 * MiB   # small: the fill must not raise the peak RSS measured
ENCODINGS = ("zero", "dup", "delta", "block", "lz4")   # switched off one at a time
ALL_ENCODINGS = ENCODINGS + ("raw",)


# -- the source side, in its own process --------------------------------------------------
def _source_main(job: dict, result_q) -> None:
    import numpy as np

    from livemig.aio.loop import run
    from livemig.config import MigrationConfig
    from livemig.errors import MigrationError
    from livemig.native import PAGE_SIZE
    from livemig.engine.source.session import migrate
    from livemig.vm.machine import VM

    vm = VM(job["memory_bytes"], 2, job["workload"], dirty_rate=job["dirty_rate_bps"] or None,
            seed=job["seed"])
    try:
        if job["fill"]:
            rng = np.random.default_rng(job["seed"])
            start = vm.layout.data_first_page(0) * PAGE_SIZE
            for off in range(start, vm.memory.length_bytes, FILL_CHUNK_BYTES):
                end = min(off + FILL_CHUNK_BYTES, vm.memory.length_bytes)
                vm.memory.bytes[off:end] = np.frombuffer(rng.bytes(end - off), np.uint8)
        config = MigrationConfig.from_dict(job["config"])   # the dict form: downtime_ms
        vm.start()
        result_q.put({"event": "started", "pid": os.getpid()})
        time.sleep(job["warmup_s"])
        rss_before_kib = _status_kib(os.getpid(), "VmRSS")

        async def go():
            try:
                stats = await migrate(vm, "127.0.0.1", job["port"], config=config,
                                      name=job["name"])
            except MigrationError as exc:
                stats = exc.stats
            return stats.to_dict()
        stats = run(go(), kind=job["loop"])
        result_q.put({"event": "done", "stats": stats, "rss_before_kib": rss_before_kib,
                      "hwm_kib": _status_kib(os.getpid(), "VmHWM")})
    except BaseException as exc:  # report, never hang the parent
        result_q.put({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        vm.close()


# -- memory sampling ---------------------------------------------------------------------------
def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples VmRSS of some processes every ``interval_s``; keeps the maximum."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.pids: dict[str, int] = {}
        self.max_rss_kib: dict[str, int] = {}
        self.hwm_kib: dict[str, int] = {}
        self.before_kib: dict[str, int] = {}
        self._halt = threading.Event()

    def watch(self, label: str, pid: int) -> None:
        self.pids[label] = pid

    def run(self) -> None:
        while not self._halt.is_set():
            for label, pid in list(self.pids.items()):
                rss = _status_kib(pid, "VmRSS")
                hwm = _status_kib(pid, "VmHWM")
                if rss is not None:
                    self.max_rss_kib[label] = max(self.max_rss_kib.get(label, 0), rss)
                if hwm is not None:
                    self.hwm_kib[label] = max(self.hwm_kib.get(label, 0), hwm)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the destination daemon --------------------------------------------------------------------
@contextlib.contextmanager
def destination_daemon(tmpdir: str, loop: str):
    from livemig.errors import ControlError
    from livemig.service.control import ControlClient

    control = os.path.join(tmpdir, f"dst-{time.monotonic_ns()}.sock")
    import livemig
    env = {**os.environ, "PYTHONPATH": str(Path(livemig.__file__).resolve().parents[1])}
    log = open(os.path.join(tmpdir, "dst.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "daemon", "--listen",
                             "127.0.0.1:0", "--control", control, "--loop", loop],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=120)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                info = client.call("ping")
                break
            except ControlError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("destination daemon did not start") from None
                time.sleep(0.05)
        yield proc, client, int(info["listen"].rsplit(":", 1)[1])
    finally:
        with contextlib.suppress(ControlError):
            client.call("shutdown", force=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def migrate_once(job: dict, client, sampler: RssSampler | None = None) -> dict:
    """One migration from a fresh source process; the arrived VM is stopped."""
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    proc = ctx.Process(target=_source_main, args=(job, result_q))
    proc.start()
    try:
        msg = result_q.get(timeout=300)
        if msg["event"] == "error":
            raise RuntimeError(msg["error"])
        if sampler is not None:
            sampler.watch("source", msg["pid"])
        msg = result_q.get(timeout=600)
        if msg["event"] == "error":
            raise RuntimeError(msg["error"])
        if sampler is not None:
            sampler.hwm_kib["source"] = max(sampler.hwm_kib.get("source", 0),
                                            msg["hwm_kib"] or 0)
            sampler.before_kib["source"] = msg["rss_before_kib"]
    finally:
        proc.join(timeout=60)
    with contextlib.suppress(Exception):
        client.call("vm.stop", name=job["name"])
    return msg["stats"]


def _measured_dirty_mib_s(stats: dict) -> float | None:
    """Median dirty rate the tracker saw over the rounds after the first (the
    guest's pace is a target; on a busy machine it may fall short of it)."""
    rates = [r["dirty_rate_pps"] for r in stats.get("rounds", [])[1:] if r.get("dirty_rate_pps")]
    return statistics.median(rates) * 4096 / MiB if rates else None


def summarize(stats: dict) -> dict:
    return {"status": stats["status"], "converged": stats["converged"],
            "dirty_mib_s_measured": _measured_dirty_mib_s(stats),
            "total_time_ms": stats["total_time_ms"], "downtime_ms": stats["downtime_ms"],
            "rounds": stats["nrounds"], "bytes_sent": stats["bytes_sent"],
            "sent_per_memory": stats["bytes_sent"] / stats["memory_bytes"],
            "throttle_pct": stats["throttle_pct"], "tracker": stats["tracker"],
            "bytes_by_encoding": stats["bytes_by_encoding"],
            "pages_by_encoding": stats["pages_by_encoding"],
            "error": stats["error"],
            "last_decision": (stats["decisions"] or [{}])[-1].get("reason")}


def median_of(runs: list[dict]) -> dict:
    def med(key):
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None
    return {"total_time_ms": med("total_time_ms"), "downtime_ms": med("downtime_ms"),
            "rounds": med("rounds"), "bytes_sent": med("bytes_sent"),
            "sent_per_memory": med("sent_per_memory"),
            "dirty_mib_s_measured": med("dirty_mib_s_measured"),
            "converged": sum(r["converged"] for r in runs), "runs": len(runs)}


# -- the parts ---------------------------------------------------------------------------------
def part_sweep(args, client, port) -> list[dict]:
    rows = []
    for link in args.links:
        for rate in args.rates:
            runs = []
            for rep in range(args.repeat):
                cfg = {"downtime_ms": args.downtime_ms, "max_total_s": args.max_total_s}
                if link:
                    cfg["max_bandwidth_bps"] = link / 8
                # 0 MiB/s is a guest that writes nothing (an unpaced uniform
                # guest would dirty memory as fast as it can)
                job = {"memory_bytes": args.memory_bytes,
                       "workload": args.workload if rate else "idle",
                       "dirty_rate_bps": rate * MiB or None, "seed": rep, "fill": True,
                       "config": cfg, "warmup_s": args.warmup_s, "port": port,
                       "name": f"sweep-{link}-{rate}-{rep}", "loop": args.loop}
                runs.append(summarize(migrate_once(job, client)))
            row = {"dirty_rate_mib_s": rate, "link_bits_s": link or None,
                   "median": median_of(runs), "runs": runs}
            rows.append(row)
            _progress("sweep", row)
    return rows


def part_encodings(args, client, port) -> list[dict]:
    rows = []
    variants = [("all", ())] + [(f"no {e}", (e,)) for e in ENCODINGS]
    for workload in args.workloads:
        rate = None if workload == "idle" else args.enc_rate * MiB
        for label, off in variants:
            runs = []
            for rep in range(args.enc_repeat):
                codec = {"encodings": [e for e in ALL_ENCODINGS if e not in off]}
                job = {"memory_bytes": args.memory_bytes, "workload": workload,
                       "dirty_rate_bps": rate, "seed": rep, "fill": False,
                       "config": {"downtime_ms": args.downtime_ms, "codec": codec,
                                  "max_total_s": args.max_total_s},
                       "warmup_s": args.enc_warmup_s, "port": port,
                       "name": f"enc-{workload}-{len(rows)}-{rep}", "loop": args.loop}
                runs.append(summarize(migrate_once(job, client)))
            row = {"workload": workload, "dirty_rate_mib_s": args.enc_rate if rate else 0,
                   "codec": label, "median": median_of(runs), "runs": runs}
            rows.append(row)
            _progress("encodings", row)
    return rows


def part_memory(args, tmpdir) -> dict:
    sampler = RssSampler()
    with destination_daemon(tmpdir, args.loop) as (dproc, client, port):
        sampler.watch("destination", dproc.pid)
        baseline_kib = _status_kib(dproc.pid, "VmRSS")
        sampler.start()
        job = {"memory_bytes": args.memory_bytes, "workload": "uniform",
               "dirty_rate_bps": 64 * MiB, "seed": 0, "fill": True,
               "config": {"downtime_ms": args.downtime_ms}, "warmup_s": args.warmup_s,
               "port": port, "name": "memory", "loop": args.loop}
        # keep the arrived VM until the sampler saw the daemon at rest with it
        stats = migrate_once(dict(job, name="memory"), _NoStop(client), sampler)
        time.sleep(0.2)
        dest_hwm = _status_kib(dproc.pid, "VmHWM")
        client.call("vm.stop", name="memory")
        sampler.stop()
    target_kib = int(args.memory_bytes * 1.10 / 1024) + 64 * 1024
    res = {"memory_bytes": args.memory_bytes, "target_kib": target_kib,
           "destination_idle_rss_kib": baseline_kib,
           "source_rss_before_migration_kib": sampler.before_kib.get("source"),
           "source_peak_kib": sampler.hwm_kib.get("source"),
           "source_max_sampled_rss_kib": sampler.max_rss_kib.get("source"),
           "destination_peak_kib": max(dest_hwm or 0, sampler.hwm_kib.get("destination", 0)),
           "destination_max_sampled_rss_kib": sampler.max_rss_kib.get("destination"),
           "migration": summarize(stats)}
    res["source_within_target"] = (res["source_peak_kib"] or 0) <= target_kib
    res["destination_within_target"] = res["destination_peak_kib"] <= target_kib
    _progress("memory", res)
    return res


class _NoStop:
    """A control client whose vm.stop is deferred (the memory part stops it itself)."""

    def __init__(self, client):
        self.client = client

    def call(self, cmd, **args):
        if cmd == "vm.stop":
            return None
        return self.client.call(cmd, **args)


def _progress(part: str, row: dict) -> None:
    print(f"[{part}] " + json.dumps({k: v for k, v in row.items() if k != "runs"},
                                    default=str), file=sys.stderr, flush=True)


# -- report ------------------------------------------------------------------------------------
def _fmt_link(bits) -> str:
    if not bits:
        return "unlimited"
    return f"{bits / 1e9:g} Gbit/s"


def markdown(result: dict) -> str:
    mem = result["memory_bytes"] >> 20
    out = [f"# Pre-copy migrations ({'quick' if result['quick'] else 'full'}: {mem} MiB, "
           f"2 vCPUs, loop {result['loop']})", "",
           f"Downtime limit {result['downtime_ms']:g} ms; medians of {result['repeat']} runs. "
           "Downtime = source pause to `Resumed` (one loopback round trip included).", ""]
    if result.get("sweep"):
        out += [f"## {result.get('workload', 'uniform')} guest, random-filled memory: "
                "dirty rate x link", "",
                "| link | dirty MiB/s | measured | converged | total ms | downtime ms | rounds | "
                "sent / memory | target met |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in result["sweep"]:
            m = row["median"]
            link_bytes = (row["link_bits_s"] or 0) / 8
            applies = (row["link_bits_s"] is None or
                       row["dirty_rate_mib_s"] * MiB < link_bytes / 2)
            met = ("-" if not applies else
                   "yes" if m["downtime_ms"] is not None and m["downtime_ms"] <= 50
                   and m["converged"] == m["runs"] else "NO")
            out.append(f"| {_fmt_link(row['link_bits_s'])} | {row['dirty_rate_mib_s']} | "
                       f"{_num(m.get('dirty_mib_s_measured'), 0)} | "
                       f"{m['converged']}/{m['runs']} | {_num(m['total_time_ms'], 0)} | "
                       f"{_num(m['downtime_ms'], 1)} | {_num(m['rounds'], 0)} | "
                       f"{_num(m['sent_per_memory'], 2)} | {met} |")
        out.append("")
    if result.get("encodings"):
        out += ["## Encodings: one switched off at a time (workload's own memory)", "",
                "| workload | dirty MiB/s | codec | converged | total ms | downtime ms | "
                "rounds | MiB sent | vs all |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        base = {}
        for row in result["encodings"]:
            m = row["median"]
            if row["codec"] == "all":
                base[row["workload"]] = m["bytes_sent"] or 1
            ratio = (m["bytes_sent"] or 0) / base.get(row["workload"], 1)
            out.append(f"| {row['workload']} | {row['dirty_rate_mib_s']} | {row['codec']} | "
                       f"{m['converged']}/{m['runs']} | {_num(m['total_time_ms'], 0)} | "
                       f"{_num(m['downtime_ms'], 1)} | {_num(m['rounds'], 0)} | "
                       f"{_num((m['bytes_sent'] or 0) / MiB, 1)} | {ratio:.2f}x |")
        out.append("")
    if result.get("memory"):
        r = result["memory"]
        out += ["## Peak memory during one migration (VmHWM)", "",
                "| side | peak MiB | max sampled RSS MiB | target MiB | within |",
                "|---|---:|---:|---:|---|"]
        for side in ("source", "destination"):
            out.append(f"| {side} | {_num((r[f'{side}_peak_kib'] or 0) / 1024, 0)} | "
                       f"{_num((r[f'{side}_max_sampled_rss_kib'] or 0) / 1024, 0)} | "
                       f"{r['target_kib'] // 1024} | "
                       f"{'yes' if r[f'{side}_within_target'] else 'NO'} |")
        out.append("")
    return "\n".join(out)


def _num(x, digits):
    return "-" if x is None else f"{x:,.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB and fewer points")
    p.add_argument("--part", default="sweep,encodings,memory")
    p.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    p.add_argument("--downtime-ms", type=float, default=50.0)
    p.add_argument("--max-total-s", type=float, help="pre-copy time budget per migration "
                   "(default 15 quick, 60 full)")
    p.add_argument("--out", help="JSON path (default bench/results/migration[-quick].json)")
    p.add_argument("--rates", help="only these dirty rates, MiB/s, comma-separated")
    p.add_argument("--links", help="only these link caps, bits/s, comma-separated (0 = none)")
    p.add_argument("--workload", default="uniform",
                   help="sweep workload: uniform (one word a page, the target's) or rewrite "
                        "(whole pages)")
    args = p.parse_args()
    only_rates, only_links = args.rates, args.links
    if args.quick:
        args.memory_bytes, args.repeat, args.enc_repeat = 256 * MiB, 3, 1
        args.rates, args.links = [0, 64, 256], [0, 1_000_000_000]
        args.workloads = ["uniform", "hotset", "memtest"]
    else:
        args.memory_bytes, args.repeat, args.enc_repeat = 1024 * MiB, 3, 3
        args.rates, args.links = [0, 64, 256, 1024], [0, 10_000_000_000, 1_000_000_000]
        args.workloads = ["idle", "uniform", "hotset", "sweep", "memtest"]
    if only_rates:
        args.rates = [int(r) for r in only_rates.split(",")]
    if only_links:
        args.links = [int(float(x)) for x in only_links.split(",")]
    args.enc_rate, args.warmup_s, args.enc_warmup_s = 64, 0.5, 1.0
    args.max_total_s = args.max_total_s or (15.0 if args.quick else 60.0)
    parts = set(args.part.split(","))
    from livemig.aio.loop import resolve_kind
    args.loop = resolve_kind(args.loop)
    result = {"quick": args.quick, "workload": args.workload,
              "memory_bytes": args.memory_bytes, "loop": args.loop,
              "max_total_s": args.max_total_s,
              "downtime_ms": args.downtime_ms, "repeat": args.repeat,
              "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                          "python": platform.python_version()},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        if parts & {"sweep", "encodings"}:
            with destination_daemon(tmp, args.loop) as (_, client, port):
                if "sweep" in parts:
                    result["sweep"] = part_sweep(args, client, port)
                if "encodings" in parts:
                    result["encodings"] = part_encodings(args, client, port)
        if "memory" in parts:
            result["memory"] = part_memory(args, tmp)
    stem = "migration-quick" if args.quick else "migration"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{stem}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()

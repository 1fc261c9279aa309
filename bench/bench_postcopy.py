"""Post-copy and hybrid migration through the real engine, next to the floors.

Questions, each answered in the same run:

  1. fault-service latency of the engine (fault read -> page placed, measured
     by the destination's FaultService) for a guest faulting on random pages
     while the rest is pushed, next to the floors of bench_postcopy_floor
     (local UFFDIO_COPY; fault -> event loop -> TCP page server -> COPY);
  2. downtime (source pause -> Resumed) of post-copy and hybrid;
  3. total time and guest progress (instructions/s during post-copy vs
     before the migration) at dirty rates below, at and above the link
     bandwidth, pre-copy / post-copy / hybrid side by side.

The source runs in its own (spawned) process with its VM, the destination
(MigrationServer and the arriving VM) in this one: two event loops and four
vCPU threads share the machine's CPUs. Where the fault handler runs relative
to the faulting vCPU is up to the scheduler: on this 2-CPU host the
destination's loop and its vCPUs share both CPUs with the source, so most
faults are served across CPUs (a cross-CPU wake-up costs tens of µs).

Guest memory is filled by letting the workload run unpaced before the
migration; LZ4 and BLOCK are switched off (the uniform workload changes one
word of a page per write: LZ4 shrinks its pages ~100x and BLOCK sends 258 of
4096 bytes, which would make the link cap meaningless; a guest rewriting
whole pages, the `rewrite` workload, gets nothing from either).

    python bench/bench_postcopy.py --quick     # 256 MiB guest, a few minutes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from livemig.config import CodecConfig, MigrationConfig  # noqa: E402
from livemig.engine.destination.server import Arrival, MigrationServer  # noqa: E402
from livemig.native.postcopy import probe  # noqa: E402
import report  # noqa: E402

MiB = 1 << 20
SEED = 5
VCPUS = 2


# ---- the source process ----------------------------------------------------------------

def _source_main(conn, port: int, memory: str, workload: str, dirty_rate_bps: float,
                 fill_s: float, cfg: dict, vcpus: int) -> None:
    from livemig.aio.loop import new_event_loop
    from livemig.errors import LivemigError
    from livemig.engine.source.session import migrate
    from livemig.vm.machine import VM

    vm = VM(memory, vcpus, workload, seed=SEED)
    result: dict = {}
    try:
        vm.start()
        time.sleep(fill_s)                      # fill memory at full speed
        vm.set_dirty_rate(dirty_rate_bps)
        s0, t0 = sum(vm.steps()), time.monotonic()
        time.sleep(0.3)
        result["steps_per_s_before"] = (sum(vm.steps()) - s0) / (time.monotonic() - t0)
        loop = new_event_loop("uvloop")
        try:
            stats = loop.run_until_complete(
                migrate(vm, "127.0.0.1", port, config=MigrationConfig.from_dict(cfg)))
            result["stats"] = stats.to_dict()
        except LivemigError as exc:
            result["error"] = str(exc)
            result["stats"] = exc.stats.to_dict() if getattr(exc, "stats", None) else None
        finally:
            loop.close()
    finally:
        vm.close()
        conn.send(result)
        conn.close()


# ---- one migration, destination here -----------------------------------------------------

async def _one(memory: str, workload: str, dirty_rate_bps: float, fill_s: float,
               cfg: MigrationConfig, vcpus: int = VCPUS) -> dict:
    marks: dict = {}

    def hook(name, peer, stats):
        arrival = Arrival(name, peer, stats)

        def on_status():
            if arrival.status == "postcopy-active" and "pc_start" not in marks:
                inc = next(iter(srv.sessions.values()), None)
                if inc is not None and inc.vm is not None:
                    marks["vm"] = inc.vm
                    marks["pc_start"] = (time.monotonic(), sum(inc.vm.steps()))

        def on_resumed(vm):
            if "pc_start" in marks:
                t0, s0 = marks["pc_start"]
                dt = time.monotonic() - t0
                marks["steps_per_s_postcopy"] = (sum(vm.steps()) - s0) / dt if dt > 0 else None

        arrival.on_status = on_status
        arrival.on_resumed = on_resumed
        return arrival

    ctx = multiprocessing.get_context("spawn")
    async with MigrationServer("127.0.0.1", 0, config=cfg, on_incoming=hook) as srv:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_source_main,
                           args=(child, srv.port, memory, workload, dirty_rate_bps, fill_s,
                                 cfg.to_dict(), vcpus))
        proc.start()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, parent.recv)
        await loop.run_in_executor(None, proc.join, 30)
        dst = None
        try:
            arrival, vm = await asyncio.wait_for(srv.completed.get(), 5)
            dst = arrival.stats.to_dict()
            vm.close()
        except asyncio.TimeoutError:
            pass
    result["dst"] = dst
    result["steps_per_s_postcopy"] = marks.get("steps_per_s_postcopy")
    return result


def _row(mode: str, rate_label: str, res: dict) -> dict:
    s = res.get("stats") or {}
    d = res.get("dst") or {}
    lat = (d.get("postcopy") or {}).get("fault_latency") or {}
    before = res.get("steps_per_s_before")
    during = res.get("steps_per_s_postcopy")
    return {
        "mode": mode, "dirty_rate": rate_label,
        "status": s.get("status") if not res.get("error") else "failed",
        "error": res.get("error"),
        "total_ms": s.get("total_time_ms"), "downtime_ms": s.get("downtime_ms"),
        "rounds": s.get("nrounds"), "bytes_sent": s.get("bytes_sent"),
        "postcopy_ms": (s.get("postcopy") or {}).get("duration_ms"),
        "pages_requested": (d.get("postcopy") or {}).get("pages_requested"),
        "pages_pushed": (d.get("postcopy") or {}).get("pages_pushed"),
        "fault_p50_us": lat.get("p50_us"), "fault_p99_us": lat.get("p99_us"),
        "fault_max_us": lat.get("max_us"), "faults": lat.get("count"),
        "steps_per_s_before": before, "steps_per_s_postcopy": during,
        "progress_ratio": (during / before) if before and during else None,
        "invalidation_rounds": (s.get("postcopy") or {}).get("invalidation_rounds"),
        "stop_invalidated_pages": (s.get("postcopy") or {}).get("stop_invalidated_pages"),
        "vcpu_blocked_ms": (d.get("postcopy") or {}).get("vcpu_blocked_ms"),
        "fault_path": (d.get("postcopy") or {}).get("fault_path"),
        "fault_path_reason": (d.get("postcopy") or {}).get("fault_path_reason"),
        "source_fault_path_reason": (s.get("postcopy") or {}).get("fault_path_reason"),
    }


def _median_run(runs: list[dict]) -> dict:
    """The run whose downtime is the median (failed runs last), with every
    run's downtime and status alongside."""
    ok = sorted((r for r in runs if r["downtime_ms"] is not None), key=lambda r: r["downtime_ms"])
    pick = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
    pick["runs"] = len(runs)
    pick["downtime_ms_runs"] = [r["downtime_ms"] for r in runs]
    pick["status_runs"] = [r["status"] for r in runs]
    return pick


# ---- floors -----------------------------------------------------------------------------------

def floors(quick: bool) -> dict:
    import bench_postcopy_floor as floor

    n = 1000 if quick else 10000
    server = floor.PageServer(n)
    try:
        return {"local_copy_same_cpu": floor.bench_local_copy(n, 0, 0),
                "local_copy_cross_cpu": floor.bench_local_copy(n, 0, 1 if os.cpu_count() > 1 else 0),
                "end_to_end_uvloop": floor.bench_end_to_end(server, n, "uvloop")}
    finally:
        server.stop()


# ---- report -----------------------------------------------------------------------------------

def _fmt(x, spec="{:.1f}"):
    return "" if x is None else spec.format(x)


def _table(results: dict) -> str:
    lines = [f"## Post-copy migration ({results['params']['memory']} guest, link "
             f"{results['params']['link_bps'] / MiB:.0f} MiB/s, kernel {platform.release()})", "",
             "Fault-service latency (fault read → page placed):", "",
             "| path | p50 µs | p99 µs | max µs | n |", "|---|---:|---:|---:|---:|"]
    for name, r in results["floors"].items():
        lines.append(f"| floor: {name} | {r['p50_us']} | {r['p99_us']} | {r['max_us']} | {r['n']} |")
    for r in results.get("placement", []):
        where = "scheduler" if r["urgent_cpu"] < 0 else f"CPU {r['urgent_cpu']}"
        lines.append(f"| engine, urgent threads on {where} | {_fmt(r['fault_p50_us'])} | "
                     f"{_fmt(r['fault_p99_us'])} | {_fmt(r['fault_max_us'])} | {r['faults']} |")
    lat = results["latency"]
    if lat is not None:
        lines.append(f"| engine: {lat['mode']} ({lat['workload']}) | {_fmt(lat['fault_p50_us'])} | "
                     f"{_fmt(lat['fault_p99_us'])} | {_fmt(lat['fault_max_us'])} | {lat['faults']} |")
    lines += ["", "Migrations (downtime = source pause → Resumed; progress = guest instructions/s "
              "during post-copy ÷ before; with --repeat, the median-downtime run of each row, "
              "every run's downtime in the JSON):", "",
              "| mode | dirty rate | status | total ms | downtime ms | rounds | post-copy ms | "
              "requested | pushed | fault p50 µs | fault p99 µs | vCPU blocked ms | progress |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["migrations"]:
        lines.append(
            f"| {r['mode']} | {r['dirty_rate']} | {r['status']} | {_fmt(r['total_ms'], '{:.0f}')} | "
            f"{_fmt(r['downtime_ms'], '{:.2f}')} | {r['rounds'] or ''} | "
            f"{_fmt(r['postcopy_ms'], '{:.0f}')} | {r['pages_requested'] or ''} | "
            f"{r['pages_pushed'] or ''} | {_fmt(r['fault_p50_us'])} | {_fmt(r['fault_p99_us'])} | "
            f"{_fmt(r.get('vcpu_blocked_ms'))} | {_fmt(r['progress_ratio'], '{:.2f}')} |")
    paths = {(r.get("fault_path"), r.get("fault_path_reason"), r.get("source_fault_path_reason"))
             for r in results["migrations"] if r.get("fault_path")}
    for path, dst_reason, src_reason in sorted(paths, key=str):
        lines += ["", f"Fault path: {path}. Destination: {dst_reason}. Source: {src_reason}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB guest instead of 1 GiB")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "postcopy.json"))
    ap.add_argument("--memory", help="guest size (default 1GiB, 256MiB with --quick)")
    ap.add_argument("--modes", default="precopy,postcopy,hybrid",
                    help="comma-separated modes to migrate (default all three)")
    ap.add_argument("--rates", default="0.5,1,2",
                    help="comma-separated dirty rates as multiples of the link (default 0.5,1,2)")
    ap.add_argument("--workload", default="uniform",
                    help="workload of the mode x rate migrations (default uniform)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="migrations per mode and rate; the row is the median-downtime run")
    ap.add_argument("--placement", action="store_true",
                    help="also measure fault service with the urgent threads pinned to each CPU")
    ap.add_argument("--no-floors", action="store_true",
                    help="skip the floor and fault-latency measurements (downtime only)")
    args = ap.parse_args(argv)
    found = probe()
    if not found.missing:
        print(f"userfaultfd MISSING unavailable: {found.reason}", file=sys.stderr)
        return 2
    memory = args.memory or ("256MiB" if args.quick else "1GiB")
    link_bps = (128 if args.quick else 256) * MiB
    fill_s = 1.0 if args.quick else 3.0
    raw = CodecConfig().without("lz4", "block")
    results: dict = {"params": {"memory": memory, "link_bps": link_bps, "quick": args.quick, "repeat": args.repeat,
                                "fill_s": fill_s, "codec": list(raw.encodings)}}
    results["floors"], results["latency"] = {}, None
    if not args.no_floors:
        results["floors"] = floors(args.quick)
        print(json.dumps(results["floors"]), flush=True)

        # 1. latency: a guest writing random pages, post-copy at once, push capped
        cfg = MigrationConfig(mode="postcopy", codec=raw, max_bandwidth_bps=link_bps)
        res = asyncio.run(_one("64MiB", "uniform", 32 * MiB, 0.3, cfg))
        lat = _row("postcopy", "32MiB/s", res)
        lat["workload"] = "uniform, 64 MiB"
        results["latency"] = lat
        print(json.dumps(lat), flush=True)

    if args.placement:
        # where the urgent threads run: pinned (both sides) to each CPU, or
        # left to the scheduler; the guest's vCPUs are never pinned
        results["placement"] = []
        for cpu in (-1,) + tuple(range(os.cpu_count() or 1)):
            for _ in range(args.repeat):
                cfg = MigrationConfig(mode="postcopy", codec=raw, max_bandwidth_bps=link_bps,
                                      urgent_cpu=cpu)
                row = _row("postcopy", "32MiB/s", asyncio.run(
                    _one("64MiB", "uniform", 32 * MiB, 0.3, cfg)))
                row["urgent_cpu"] = cpu
                results["placement"].append(row)
                print(json.dumps(row), flush=True)

    # 2-3. modes x dirty rates relative to the link
    results["migrations"] = []
    rates = [float(x) for x in args.rates.split(",")]
    for label, factor in ((f"{f:g}x link", f) for f in rates):
        for mode in args.modes.split(","):
            extra = {"hybrid_postcopy_after_rounds": 2} if mode == "hybrid" else {}
            cfg = MigrationConfig(mode=mode, codec=raw, max_bandwidth_bps=link_bps,
                                  max_downtime_ms=50.0, max_rounds=8, max_total_s=15.0, **extra)
            runs = [_row(mode, label, asyncio.run(_one(memory, args.workload,
                                                       factor * link_bps, fill_s, cfg)))
                    for _ in range(args.repeat)]
            row = _median_run(runs)
            results["migrations"].append(row)
            print(json.dumps(row), flush=True)

    report.write(args.out, results, _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

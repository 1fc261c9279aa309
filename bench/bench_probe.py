"""livemig plan's bandwidth probe against the migration it predicts.

Question (issue 12): on this machine, for an idle guest whose memory is
incompressible, how close is the rate ``livemig plan`` measures to the rate
a real migration on the native streams then achieves? The stream probe
(pages through the migration's own stream threads) against the old control
channel probe (ProbeData frames through the Python event loop). And, with
``--tls``, what a migration under mutual TLS achieves against the same
migration in the clear on the native streams (issue target: at least 0.5x),
both with its pages on the native streams (TLS 1.3 in the stream threads)
and on the Python path (``streams=0``: what TLS did before the streams
spoke it).

Method. The destination is a MigrationServer in its own process (a second
one with mutual TLS for ``--tls``). Each repetition is a fresh source
process that does what ``livemig plan`` then ``livemig migrate`` do on the
source daemon: it builds the guest (random bytes), starts it, runs the
stream probe with plan's defaults (1 s, 64 MiB), the stream probe with a
256 MiB budget and the control probe with plan's defaults, all while the
guest runs, then migrates it on the native streams (default stream count).
With ``--tls`` two more fresh processes each migrate a like guest under TLS
(native streams, then the Python path). ``--no-probes`` skips the probes
(the TLS question alone). Migration rate = guest memory / total migration time (set-up and
switchover included, as the predictor's total); round-0 rate = round 0's
page-batch bytes / its duration (the rounds' part alone). Ratios are probe
rate / migration rate, per repetition; medians are reported.

Usage: python bench/bench_probe.py [--memory 1GiB] [--repeat 3] [--tls]
       [--no-probes] [--out bench/results/probe.json]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

MiB = 1 << 20
FILL_CHUNK_BYTES = 16 * MiB


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _destination_main(port_q, done_q, pki) -> None:
    import asyncio

    from livemig.aio.loop import run
    from livemig.engine.destination.server import MigrationServer

    async def main():
        ssl = pki.server_context() if pki is not None else None
        async with MigrationServer("127.0.0.1", 0, ssl=ssl) as server:
            port_q.put(server.port)
            while True:
                arrival, vm = await server.completed.get()
                vm.close()
                done_q.put({"name": arrival.name, "data_path": arrival.stats.data_path})
                await asyncio.sleep(0)

    run(main(), kind="uvloop")


def _source_main(job: dict, result_q) -> None:
    try:
        result_q.put(_migrate(job))
    except BaseException as exc:  # report, never hang the parent
        result_q.put({"error": f"{type(exc).__name__}: {exc}"})


async def _probe(kind: str, budget: int, port: int) -> dict:
    from livemig.analysis.plan import probe_bandwidth, probe_link
    from livemig.config import MigrationConfig

    if kind == "probe-control":
        p = await probe_bandwidth("127.0.0.1", port, max_bytes=budget, max_time_s=1.0)
        return {"rate_mib_s": p.bytes_per_s / MiB, "kind": "control", "bytes": p.bytes,
                "duration_s": p.duration_s}
    est = await probe_link("127.0.0.1", port, config=MigrationConfig(), max_bytes=budget,
                           max_time_s=1.0)
    return {"rate_mib_s": est.bytes_per_s / MiB, "kind": est.kind, "bytes": est.bytes,
            "duration_s": est.duration_s, "fallback_reason": est.fallback_reason,
            "streams": est.streams}


def _migrate(job: dict) -> dict:
    from livemig.aio.loop import run
    from livemig.config import MigrationConfig
    from livemig.engine.source.session import migrate
    from livemig.native import PAGE_SIZE
    from livemig.vm.machine import VM

    vm = VM(job["memory_bytes"], 2, "idle", seed=job["seed"])
    try:
        rng = np.random.default_rng(job["seed"])
        start = vm.layout.data_first_page(0) * PAGE_SIZE
        for off in range(start, vm.memory.length_bytes, FILL_CHUNK_BYTES):
            end = min(off + FILL_CHUNK_BYTES, vm.memory.length_bytes)
            vm.memory.bytes[off:end] = np.frombuffer(rng.bytes(end - off), np.uint8)
        vm.start()
        time.sleep(0.2)
        pki = job["pki"]
        ssl = pki.client_context() if pki is not None else None

        async def go():
            probes = {}
            for kind, budget in job["probes"]:
                probes[_label(kind, budget)] = await _probe(kind, budget, job["port"])
            stats = await migrate(vm, "127.0.0.1", job["port"],
                                  config=MigrationConfig(**job.get("config", {})),
                                  name=job["name"], ssl=ssl,
                                  server_hostname="localhost" if ssl else None)
            return probes, stats

        probes, stats = run(go(), kind="uvloop")
        stats = stats.to_dict()
        r0 = stats["rounds"][0]
        return {"probes": probes, "rate_mib_s": job["memory_bytes"] / MiB / (stats["total_time_ms"] / 1e3),
                "round0_rate_mib_s": r0["bytes_sent"] / MiB / r0["duration_s"],
                "total_s": stats["total_time_ms"] / 1e3, "data_path": stats["data_path"],
                "source_cpu_s": stats.get("stream_cpu_s"),
                "rounds": stats["nrounds"], "downtime_ms": stats["downtime_ms"]}
    finally:
        vm.close()


def once(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    proc = ctx.Process(target=_source_main, args=(job, result_q))
    proc.start()
    try:
        out = result_q.get(timeout=600)
    finally:
        proc.join(timeout=60)
    if "error" in out:
        raise RuntimeError(f"{job['kind']}: {out['error']}")
    return out


PROBES = [("probe-streams", 64 * MiB), ("probe-streams", 256 * MiB), ("probe-control", 64 * MiB)]


def _label(kind: str, budget: int) -> str:
    return f"{kind.removeprefix('probe-')} probe, {budget // MiB} MiB budget"


TLS_RUNS = {"tls_migration": {}, "tls_python_migration": {"streams": 0}}
"""The migrations under mutual TLS: on the native streams, and on the Python path."""


def summarize(reps: list[dict], probes: list) -> dict:
    med = statistics.median
    out = {"migration_rate_mib_s": med(r["migration"]["rate_mib_s"] for r in reps),
           "migration_round0_rate_mib_s": med(r["migration"]["round0_rate_mib_s"] for r in reps),
           "probes": {}}
    for kind, budget in probes:
        label = _label(kind, budget)
        rows = [r["probes"][label] for r in reps]
        out["probes"][label] = {
            "rate_mib_s": med(p["rate_mib_s"] for p in rows),
            "ratio_to_migration": med(p["rate_mib_s"] / r["migration"]["rate_mib_s"]
                                      for p, r in zip(rows, reps)),
            "ratio_to_round0": med(p["rate_mib_s"] / r["migration"]["round0_rate_mib_s"]
                                   for p, r in zip(rows, reps)),
            "kinds": sorted({p["kind"] for p in rows}),
        }
    for key in TLS_RUNS:
        if all(key in r for r in reps):
            out[f"{key}_rate_mib_s"] = med(r[key]["rate_mib_s"] for r in reps)
            out[f"{key}_over_plain"] = med(r[key]["rate_mib_s"] / r["migration"]["rate_mib_s"]
                                           for r in reps)
            out[f"{key}_per_rep"] = [round(r[key]["rate_mib_s"] / r["migration"]["rate_mib_s"],
                                           2) for r in reps]
            out[f"{key}_data_paths"] = sorted({r[key]["data_path"] for r in reps})
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["| probe | rate (MiB/s) | probe / migration | probe / round 0 |", "|---|---|---|---|"]
    for label, p in s["probes"].items():
        lines.append(f"| {label} | {p['rate_mib_s']:.0f} | {p['ratio_to_migration']:.2f} | "
                     f"{p['ratio_to_round0']:.2f} |")
    lines.append(f"| migration, native streams (memory / total time) | "
                 f"{s['migration_rate_mib_s']:.0f} | 1 | |")
    lines.append(f"| migration, its round 0 | {s['migration_round0_rate_mib_s']:.0f} | | 1 |")
    for key, what in (("tls_migration", "migration under mutual TLS, native streams"),
                      ("tls_python_migration", "migration under mutual TLS, Python path")):
        if f"{key}_rate_mib_s" in s:
            lines.append(f"| {what} | {s[f'{key}_rate_mib_s']:.0f} | "
                         f"{s[f'{key}_over_plain']:.2f} of plain "
                         f"({' '.join(str(x) for x in s[f'{key}_per_rep'])}) | |")
    return "\n".join(lines)


def main() -> None:
    from livemig.aio.tls import make_test_pki
    from livemig.units import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="also migrate under mutual TLS")
    ap.add_argument("--no-probes", action="store_true", help="migrations only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "probe.json"))
    args = ap.parse_args()
    memory_bytes = parse_size(args.memory, what="--memory")

    ctx = mp.get_context("spawn")
    tmp = tempfile.TemporaryDirectory()
    dests, ports, done_qs = [], {}, {}
    for name, pki in [("plain", None)] + ([("tls", make_test_pki(tmp.name))] if args.tls else []):
        port_q, done_q = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_destination_main, args=(port_q, done_q, pki), daemon=True)
        proc.start()
        dests.append(proc)
        ports[name] = (port_q.get(timeout=60), pki)
        done_qs[name] = done_q
    load_before = os.getloadavg()
    probes = [] if args.no_probes else PROBES
    runs = [("migration", "plain", {})] + (
        [(key, "tls", config) for key, config in TLS_RUNS.items()] if args.tls else [])
    reps: list[dict] = []
    try:
        for rep in range(args.repeat):
            row: dict = {}
            for key, name, config in runs:
                port, pki = ports[name]
                m = once({"kind": "migrate", "port": port, "pki": pki, "seed": 7 + rep,
                          "memory_bytes": memory_bytes, "name": f"probe-{key}-{rep}",
                          "probes": probes if key == "migration" else [], "config": config})
                done_qs[name].get(timeout=60)
                if key == "migration":
                    row["probes"] = m.pop("probes")
                    for label, p in row["probes"].items():
                        print(f"rep {rep}: {label}: {p['rate_mib_s']:.0f} MiB/s ({p['kind']})",
                              flush=True)
                row[key] = m
                print(f"rep {rep}: {key} {m['rate_mib_s']:.0f} MiB/s "
                      f"(round 0 {m['round0_rate_mib_s']:.0f} MiB/s, {m['total_s']:.2f} s, "
                      f"{m['data_path']})", flush=True)
            reps.append(row)
    finally:
        for proc in dests:
            proc.terminate()
            proc.join(timeout=10)
        tmp.cleanup()
    result = {
        "question": f"{memory_bytes // MiB} MiB idle incompressible guest, loopback: plan's "
                    "probe rate against the native-streams migration's rate",
        "memory_bytes": memory_bytes, "repeat": args.repeat,
        "machine": report.machine(load_before),
        "reps": reps, "summary": summarize(reps, probes),
    }
    report.write(args.out, result, markdown(result))
    print(f"load average before {load_before}, after {result['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()

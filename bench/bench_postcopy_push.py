"""Post-copy's push on the native streams against the event loop's push.

Question: on an unlimited link, how long does a 1 GiB post-copy (and hybrid)
migration take, and how long is the stop, when the owed pages are pushed by
the native stream threads (``postcopy_push_streams=True``, the default) and
when by the source's event loop over its bulk channel (False)? The urgent
fault path is the native one in both.

Same harness as bench_postcopy.py (source in a spawned process, destination
here, both on loopback, no bandwidth cap); the guest (`uniform`, two vCPUs)
fills its memory unpaced, then writes at ``--rate`` during the migration and
keeps writing at the destination. LZ4 and BLOCK off. Each row is the median of
``--repeat`` runs by total time; every run's figures are in the JSON.

    python bench/bench_postcopy_push.py --repeat 3     # about 3 minutes
    python bench/bench_postcopy_push.py --modes postcopy --streams 1,2 --no-event-loop
                                                       # the push on 1 and on 2 streams
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_postcopy import MiB, _one, _row  # noqa: E402
from livemig.config import CodecConfig, MigrationConfig  # noqa: E402
from livemig.native.postcopy import probe  # noqa: E402
import report  # noqa: E402


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _table(results: dict) -> str:
    p = results["params"]
    lines = [f"## Post-copy push: native streams vs event loop ({p['memory']} guest, "
             f"unlimited loopback, guest writing {p['rate_mib_s']:g} MiB/s, "
             f"kernel {platform.release()})", "",
             f"Medians of {p['repeat']} runs (every run in the JSON).", "",
             "| mode | push | completed | total ms | downtime ms | post-copy ms | pushed | "
             "requested | fault p50 µs | fault p99 µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ok = sum(s == "completed" for s in r["status_runs"])
        f = (lambda k, spec="{:.0f}": "" if r[k] is None else spec.format(r[k]))
        path = "python (event loop)" if r["push_path"].startswith("python") else r["push_path"]
        lines.append(f"| {r['mode']} | {path} | {ok}/{len(r['status_runs'])} | "
                     f"{f('total_ms')} | {f('downtime_ms', '{:.2f}')} | {f('postcopy_ms')} | "
                     f"{f('pages_pushed')} | {f('pages_requested')} | "
                     f"{f('fault_p50_us', '{:.1f}')} | {f('fault_p99_us', '{:.1f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--rate", type=float, default=64.0, help="guest dirty rate, MiB/s")
    ap.add_argument("--modes", default="postcopy,hybrid")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fill-s", type=float, default=3.0)
    ap.add_argument("--streams", default="",
                    help="stream counts for the native push rows, e.g. 1,2 (default: the "
                         "configuration's default, from the CPUs)")
    ap.add_argument("--no-event-loop", action="store_true",
                    help="skip the rows that push from the event loop")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "postcopy_push.json"))
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",") if n] or [None]
    paths = [(True, n) for n in counts] + ([] if args.no_event_loop else [(False, None)])
    found = probe()
    if not found.missing:
        print(f"userfaultfd MISSING unavailable: {found.reason}", file=sys.stderr)
        return 2
    raw = CodecConfig().without("lz4", "block")
    results: dict = {"params": {"memory": args.memory, "rate_mib_s": args.rate,
                                "repeat": args.repeat, "fill_s": args.fill_s,
                                "codec": list(raw.encodings)}, "rows": []}
    for mode in args.modes.split(","):
        for native, nstreams in paths:
            extra = ({"hybrid_postcopy_after_rounds": 1, "max_downtime_ms": 0.001}
                     if mode == "hybrid" else {})
            if nstreams is not None:
                extra["streams"] = nstreams
            cfg = MigrationConfig(mode=mode, codec=raw, postcopy_push_streams=native, **extra)
            runs = []
            for _ in range(args.repeat):
                res = asyncio.run(_one(args.memory, "uniform", args.rate * MiB, args.fill_s, cfg))
                row = _row(mode, f"{args.rate:g}MiB/s", res)
                src_pc = (res.get("stats") or {}).get("postcopy") or {}
                dst_pc = (res.get("dst") or {}).get("postcopy") or {}
                row["push_path"] = src_pc.get("push_path")
                row["push_in_flight_max"] = src_pc.get("push_in_flight_max")
                row["timeline_ms"] = {"source": src_pc.get("timeline_ms"),
                                      "destination": dst_pc.get("timeline_ms")}
                row["postcopy_started_ms"] = src_pc.get("started_ms")
                row["stream_cpu_s"] = {"source": (res.get("stats") or {}).get("stream_cpu_s"),
                                       "destination": (res.get("dst") or {}).get("stream_cpu_s")}
                row["loadavg_1m"] = os.getloadavg()[0]
                runs.append(row)
                print(json.dumps({k: row[k] for k in ("mode", "push_path", "status", "total_ms",
                                                      "downtime_ms", "postcopy_ms",
                                                      "push_in_flight_max", "timeline_ms",
                                                      "stream_cpu_s", "loadavg_1m")}),
                      flush=True)
            summary = {"mode": mode,
                       "push_path": runs[0]["push_path"] or ("native" if native else "python"),
                       "status_runs": [r["status"] for r in runs], "runs": runs}
            for key in ("total_ms", "downtime_ms", "postcopy_ms", "pages_pushed",
                        "pages_requested", "fault_p50_us", "fault_p99_us"):
                summary[key] = _median(runs, key)
            results["rows"].append(summary)
    report.write(args.out, results, _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

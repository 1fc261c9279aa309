"""How long does the demo's pre-copy stop last? (issue 12, smallest stop)

Question: the demo's two pre-copy legs (a 256 MiB self-checking ``memtest``
guest at the demo's default dirty rate, two daemons on loopback) — what is
the downtime, and how many rounds and how long does each take, with the
policy of this checkout? ``--src DIR`` runs the demo from another checkout's
``src`` (built in place) instead, so a before/after pair is measured on the
same machine back to back; the kinds of run are interleaved within each
repetition so drift from other load touches both. Medians of ``--repeat``.

Usage: python bench/bench_demo_stop.py [--repeat 3] [--src OTHER/src ...]
       [--out bench/results/demo_stop.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(src: str) -> list[dict]:
    """The pre-copy legs of one ``livemig demo --json`` run from ``src``."""
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-m", "livemig", "demo", "--json"], env=env,
                         capture_output=True, text=True, timeout=900, check=True)
    demo = json.loads(out.stdout)
    return [{"leg": m["leg"], "downtime_ms": m["downtime_ms"], "rounds": m["rounds"],
             "total_ms": m["total_ms"], "verified": m["verified"]}
            for m in demo["migrations"] if m["mode"] == "precopy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", action="append", default=[],
                    help="another checkout's src directory to compare (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_stop.json"))
    args = ap.parse_args()
    kinds = {"this": str(ROOT / "src"), **{f"other:{s}": s for s in args.src}}
    runs: dict[str, list] = {k: [] for k in kinds}
    for i in range(args.repeat):
        for kind, src in kinds.items():
            legs = run_demo(src)
            runs[kind].append(legs)
            print(kind, i, [(l["leg"], round(l["downtime_ms"], 2), l["rounds"]) for l in legs],
                  flush=True)
    summary = {}
    for kind, reps in runs.items():
        summary[kind] = [{"leg": reps[0][k]["leg"],
                          "downtime_ms_median": statistics.median(r[k]["downtime_ms"] for r in reps),
                          "rounds": [r[k]["rounds"] for r in reps],
                          "total_ms_median": statistics.median(r[k]["total_ms"] for r in reps),
                          "all_verified": all(r[k]["verified"] for r in reps)}
                         for k in range(len(reps[0]))]
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

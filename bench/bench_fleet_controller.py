"""How long the fleet is without a balance controller after its leader is SIGKILLed.

Two candidate daemons (``--balance-controller``) join a 1-member etcd on
loopback with ``--fleet-ttl T``; once one leads, it is killed with SIGKILL
(no resignation: only its lease's expiry can end its term). The script polls
the leader key every 10 ms and records, from the kill:

* ``expiry_s``: until the key is gone (etcd expired the dead leader's lease);
* ``takeover_s``: until the other candidate has created it again (its watch
  on the key delivers the deletion, then one transaction);
* ``gap_s``: ``takeover_s - expiry_s``, what the election adds to the expiry
  (this script's 10 ms poll bounds its resolution).

A fresh pair per repeat; medians of ``--repeats`` per TTL. Writes
bench/results/fleet_controller.json.

    python bench/bench_fleet_controller.py [--ttls 3 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from livemig.fleet import keys  # noqa: E402
from livemig.fleet.etcd import EtcdClient  # noqa: E402
from support.daemons import DaemonProcess  # noqa: E402
from support.etcd import etcd_cluster  # noqa: E402

OUT = Path(__file__).parent / "results" / "fleet_controller.json"
POLL_S = 0.01


async def _leader(url: str):
    client = EtcdClient(url)
    try:
        return await client.get(keys.LEADER)
    finally:
        await client.close()


async def _watch_takeover(url: str, old_term: int, kill) -> dict:
    client = EtcdClient(url)
    try:
        t0 = time.monotonic()
        kill()
        expiry_s = None
        while True:
            kv = await client.get(keys.LEADER)
            now = time.monotonic() - t0
            if kv is None and expiry_s is None:
                expiry_s = now
            if kv is not None and kv.create_revision != old_term:
                return {"expiry_s": expiry_s if expiry_s is not None else now,
                        "takeover_s": now, "new_term": kv.create_revision}
            await asyncio.sleep(POLL_S)
    finally:
        await client.close()


def one(tmp: Path, url: str, ttl_s: int, i: int) -> dict:
    flags = ("--fleet", url, "--fleet-ttl", str(ttl_s), "--balance-controller")
    pair = [DaemonProcess(tmp, f"t{ttl_s}-{i}-{x}", "asyncio", *flags) for x in "ab"]
    try:
        while (kv := asyncio.run(_leader(url))) is None:
            time.sleep(0.05)
        addr = json.loads(kv.value)["addr"]
        victim = next(d for d in pair if d.address == addr)

        def kill():
            os.kill(victim.proc.pid, signal.SIGKILL)
        r = asyncio.run(_watch_takeover(url, kv.create_revision, kill))
        victim.proc.wait()
        return {**r, "old_term": kv.create_revision}
    finally:
        for d in pair:
            d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ttls", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {"ttls": {}, "repeats": args.repeats,
               "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start"}
    with tempfile.TemporaryDirectory() as tmp, etcd_cluster(Path(tmp), members=1) as etcd:
        for ttl in args.ttls:
            runs = [one(Path(tmp), etcd.url, ttl, i) for i in range(args.repeats)]
            results["ttls"][str(ttl)] = {
                "runs": runs,
                "median_expiry_s": statistics.median(r["expiry_s"] for r in runs),
                "median_takeover_s": statistics.median(r["takeover_s"] for r in runs),
                "median_gap_s": statistics.median(r["takeover_s"] - r["expiry_s"]
                                                  for r in runs)}
            print(f"TTL {ttl} s: takeover {[round(r['takeover_s'], 2) for r in runs]} s, "
                  f"median {results['ttls'][str(ttl)]['median_takeover_s']:.2f} s "
                  f"(lease expiry median {results['ttls'][str(ttl)]['median_expiry_s']:.2f} s, "
                  f"gap {results['ttls'][str(ttl)]['median_gap_s'] * 1e3:.0f} ms)",
                  flush=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

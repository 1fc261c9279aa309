"""Randomised single-fault trials: does any one fault lose, duplicate, corrupt or strand a VM?

Each trial migrates a fresh 16 MiB VM (pre-copy, post-copy or hybrid, chosen
at random) through a FrameProxy (tests/support/frameproxy.py) that injects one
fault — cut, black hole, stall or half-close, chosen at random — when a
randomly chosen frame passes: a handover message (Switchover, Verified,
Commit, Resumed, PostcopyComplete, Complete) or the n-th page batch, round
ack or invalidation of the pre-copy rounds. Both peers stay alive throughout.
Each trial is then classified:

  moved       the migration completed; only the destination runs the VM
  stayed      the migration failed; only the source runs the VM (resumed)
  in-doubt    the source kept its copy paused without learning the outcome
  lost        neither side runs the VM
  duplicated  both sides run it
  corrupted   the running copy differs from a twin that never moved

The promise is 0 in-doubt, lost, duplicated and corrupted. Results go to
bench/results/handover_soak.{json,md}.

    python bench/soak_handover.py --trials 200 [--seed 1] [--loop asyncio|uvloop]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from livemig.aio.loop import new_event_loop  # noqa: E402
from livemig.config import MigrationConfig  # noqa: E402
from livemig.engine.destination.server import MigrationServer  # noqa: E402
from livemig.engine.source.session import MigrationControl, migrate  # noqa: E402
from livemig.errors import HandoverInDoubt, MigrationError  # noqa: E402
from livemig.native import postcopy  # noqa: E402
from support.frameproxy import KINDS, Fault, FrameProxy  # noqa: E402
from support.oracle import Recipe, assert_matches_unmoved  # noqa: E402

LOCAL = "127.0.0.1"
CONFIG = dict(handshake_timeout_s=5, switchover_timeout_s=5, ack_timeout_s=2,
              postcopy_recovery_timeout_s=20)
MODES = {"precopy": {},
         "postcopy": {"mode": "postcopy"},
         "hybrid": {"mode": "hybrid", "hybrid_postcopy_after_rounds": 1, "max_downtime_ms": 0.001}}
# message -> direction it travels (up: source to destination)
HANDOVER = {"Switchover": "up", "Verified": "down", "Commit": "up", "Resumed": "down",
            "Complete": "up"}
POSTCOPY_ONLY = {"PostcopyComplete": "down", "PageInvalidate": "up"}
ROUNDS = {"PageBatch": ("up", 10), "RoundAck": ("down", 4)}   # direction, most occurrences
SESSION_END_S = 10.0
OUTCOMES = ("moved", "stayed", "in-doubt", "lost", "duplicated", "corrupted")


def pick_trial(rng: random.Random, modes: list[str]) -> tuple[str, Fault]:
    mode = rng.choice(modes)
    messages = dict(HANDOVER, **{m: d for m, (d, _) in ROUNDS.items()},
                    **(POSTCOPY_ONLY if mode != "precopy" else {}))
    message = rng.choice(sorted(messages))
    # a 16 MiB memtest guest moves in a handful of batches and rounds
    occurrence = rng.randint(1, ROUNDS[message][1]) if message in ROUNDS else 1
    kind = rng.choice(KINDS)
    return mode, Fault(kind, message, messages[message], occurrence=occurrence,
                       stall_s=rng.uniform(0.05, 1.0), half_close=rng.choice(["up", "down"]),
                       after_bytes=rng.choice([0, rng.randint(1, 1 << 20)]))


async def trial(mode: str, fault: Fault, seed: int) -> dict:
    recipe = Recipe("16MiB", 2, "memtest", seed=seed, dirty_rate="16MiB/s")
    cfg = MigrationConfig(**CONFIG, **MODES[mode])
    vm = recipe.build()
    vm.start()
    moved = None
    result = {"mode": mode, "fault": fault.kind, "message": fault.message,
              "direction": fault.direction, "occurrence": fault.occurrence}
    t0 = time.monotonic()
    try:
        await asyncio.sleep(0.05)
        async with MigrationServer(LOCAL, 0, config=cfg) as server, \
                FrameProxy(LOCAL, server.port, fault) as proxy:
            try:
                await migrate(vm, LOCAL, proxy.port, config=cfg, control=MigrationControl())
                said = "completed"
            except HandoverInDoubt as exc:
                said, result["error"] = "in-doubt", str(exc)
            except MigrationError as exc:
                said, result["error"] = "failed", str(exc)
            result["fired"] = proxy.fired.is_set()
            deadline = time.monotonic() + SESSION_END_S
            while server.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # a destination left on a black-holed connection before the switchover
            # never resumed anything; closing the server ends its wait
            result["destination_session_open"] = bool(server.sessions)
            if not server.completed.empty():
                moved = server.completed.get_nowait()[1]
        there, here = moved is not None and moved.running, vm.running
        if said == "in-doubt":
            outcome = "in-doubt"
        elif there and here:
            outcome = "duplicated"
        elif not (there or here):
            outcome = "lost"
        else:
            outcome = "moved" if there else "stayed"
            try:
                assert_matches_unmoved(moved if there else vm, recipe)
            except AssertionError as exc:
                outcome, result["error"] = "corrupted", str(exc)
        result.update(outcome=outcome, said=said, seconds=round(time.monotonic() - t0, 2))
        return result
    finally:
        vm.close()
        if moved is not None:
            moved.close()


def write_report(results: list[dict], path: str, args) -> None:
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    with open(path + ".json", "w") as f:
        json.dump({"trials": len(results), "seed": args.seed, "loop": args.loop,
                   "counts": counts, "results": results}, f, indent=1)
    rows = ["| mode | fault | at message | trials | " + " | ".join(OUTCOMES) + " |",
            "|---|---|---|---:|" + "---:|" * len(OUTCOMES)]
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["mode"], r["fault"], r["message"]), []).append(r)
    for key in sorted(groups):
        rs = groups[key]
        rows.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(rs)} | "
                    + " | ".join(str(sum(r["outcome"] == o for r in rs)) for o in OUTCOMES)
                    + " |")
    total = " | ".join(f"**{counts[o]}**" for o in OUTCOMES)
    rows.append(f"| **all** | | | **{len(results)}** | {total} |")
    fired = sum(r["fired"] for r in results)
    stuck = sum(r["destination_session_open"] for r in results)
    with open(path + ".md", "w") as f:
        f.write(f"# Handover soak: {len(results)} single-fault trials (seed {args.seed}, "
                f"{args.loop} loop)\n\n"
                f"The fault happened in {fired} trials (in the others the chosen frame never "
                "passed, e.g. a page batch beyond the last). In "
                f"{stuck} trials the destination's session was still waiting "
                f"{SESSION_END_S:g} s after the source had finished (a black hole before the "
                "switchover: it waits for pages without a timeout, holding memory but never "
                "the running VM).\n\n" + "\n".join(rows) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "handover_soak"))
    args = p.parse_args()
    modes = ["precopy"] + (["postcopy", "hybrid"] if postcopy.probe().missing else [])
    rng = random.Random(args.seed)
    loop = new_event_loop(args.loop)
    results = []
    for i in range(args.trials):
        mode, fault = pick_trial(rng, modes)
        r = loop.run_until_complete(trial(mode, fault, seed=i))
        results.append(r)
        print(f"{i + 1:4d} {mode:8} {fault.kind:10} {fault.message:16} #{fault.occurrence:<3} "
              f"{r['outcome']:10} {r['seconds']:6.2f} s", flush=True)
        write_report(results, args.out, args)
    bad = sum(r["outcome"] not in ("moved", "stayed") for r in results)
    print(f"{args.trials} trials: {bad} lost, duplicated, corrupted or in doubt")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes a link cut in round 0 costs, with and without resumable pre-copy.

An idle guest of ``--size-mib`` MiB of random bytes (incompressible) moves on
the Python page path and on the native bulk streams (``--streams``) through
the test suite's frame proxy, which resets every connection when the page
batch at 50 % (or 90 %) of round 0 goes by. With
resume (``precopy_resume_timeout_s`` 60) the source reconnects and goes on;
without it (0) the migration fails and is started again from scratch, as an
operator would. The figure is the bytes sent by all attempts together,
beyond the guest's memory (what a move without a cut sends), as a multiple of
guest memory; medians of ``--repeats``. Writes bench/results/resume.json.

    python bench/bench_resume.py [--size-mib 1024] [--repeats 3] [--streams 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.frameproxy import Fault, FrameProxy  # noqa: E402

from livemig.config import MigrationConfig  # noqa: E402
from livemig.engine.destination.server import MigrationServer  # noqa: E402
from livemig.engine.source.session import migrate  # noqa: E402
from livemig.errors import MigrationError  # noqa: E402
from support.oracle import Recipe  # noqa: E402

OUT = HERE / "results" / "resume.json"
LOCAL = "127.0.0.1"
BATCH_BYTES = 1 << 20


def path_config(streams: int, **overrides) -> MigrationConfig:
    """The Python page path (``streams`` 0) or ``streams`` native bulk streams."""
    return MigrationConfig(streams=streams, batch_bytes=BATCH_BYTES, **overrides)


async def count_batches(size_mib: int, streams: int) -> int:
    """Page batches of a move without a cut (round 0 is nearly all of them on
    an idle guest): the proxy counts them, its fault never fires."""
    vm = Recipe(f"{size_mib}MiB", 1, "idle", seed=5, fill_seed=5).build()
    config = path_config(streams)
    try:
        vm.start()
        async with MigrationServer(LOCAL, 0, config=config) as server, \
                FrameProxy(LOCAL, server.port, Fault("cut", "PageBatch", "up",
                                                     occurrence=1 << 40)) as proxy:
            await migrate(vm, LOCAL, proxy.port, config=config)
            _, moved = await server.completed.get()
            moved.close()
            return proxy.seen
    finally:
        vm.close()


async def one_run(size_mib: int, streams: int, batches: int, cut_fraction: float,
                  resume: bool) -> dict:
    recipe = Recipe(f"{size_mib}MiB", 1, "idle", seed=5, fill_seed=5)
    vm = recipe.build()
    memory_bytes = vm.memory.length_bytes
    fault = Fault("cut", "PageBatch", "up", occurrence=max(1, int(batches * cut_fraction)))
    config = path_config(streams, precopy_resume_timeout_s=60.0 if resume else 0.0)
    attempts, sent_bytes = 0, 0
    try:
        vm.start()
        async with MigrationServer(LOCAL, 0, config=config) as server, \
                FrameProxy(LOCAL, server.port, fault) as proxy:
            while True:
                attempts += 1
                try:
                    stats = await migrate(vm, LOCAL, proxy.port, config=config)
                except MigrationError as exc:
                    sent_bytes += exc.stats.bytes_sent if exc.stats else 0
                    if attempts >= 3:
                        raise
                    continue
                sent_bytes += stats.bytes_sent
                resumes, data_path = stats.precopy_resumes, stats.data_path
                break
            _, moved = await server.completed.get()
            moved.close()
            assert proxy.fired.is_set()
    finally:
        vm.close()
    return {"size_mib": size_mib, "data_path": data_path, "cut_at": cut_fraction,
            "resume": resume, "attempts": attempts, "resumes": resumes, "bytes_sent": sent_bytes,
            "extra_over_memory": (sent_bytes - memory_bytes) / memory_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=2,
                    help="native bulk streams of the native rows (the Python rows use 0)")
    args = ap.parse_args()
    rows = []
    for streams in (0, args.streams):
        batches = asyncio.run(count_batches(args.size_mib, streams))
        for cut in (0.5, 0.9):
            for resume in (False, True):
                rows.append(measure(args, streams, batches, cut, resume))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"host_cpus": os.cpu_count(), "results": rows}, indent=2) + "\n")


def measure(args, streams: int, batches: int, cut: float, resume: bool) -> dict:
    runs = [asyncio.run(one_run(args.size_mib, streams, batches, cut, resume))
            for _ in range(args.repeats)]
    row = {"streams": streams, "data_path": runs[0]["data_path"], "cut_at": cut,
           "resume": resume, "size_mib": args.size_mib, "batches_uncut": batches,
           "attempts": runs[0]["attempts"], "resumes": runs[0]["resumes"],
           "extra_over_memory_median": statistics.median(r["extra_over_memory"] for r in runs),
           "runs": runs}
    print(f"{row['data_path']}: cut at {cut:.0%} resume={resume}: attempts {row['attempts']}, "
          f"resumes {row['resumes']}, extra bytes {row['extra_over_memory_median']:.3f}x memory",
          flush=True)
    return row


if __name__ == "__main__":
    main()

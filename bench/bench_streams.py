"""Native bulk streams: how close does a pre-copy migration get to the link?

Question (issue 12): a 1 GiB idle guest whose memory is incompressible, over
loopback, unlimited: what is the migration rate (memory size / total time)
against raw loopback TCP measured in the same run, with 1, 2 and 4 native
streams, and with the Python path (streams=0) for reference? And what does
each side spend in CPU seconds per GiB, against raw TCP's?

Method. The destination is a MigrationServer in its own process; the source
VM lives in a fresh process per migration (its memory filled with random
bytes, so ZERO pages and compression do not help). Raw TCP is Python
``sendall``/``recv_into`` of 4 MiB slices between two processes
(bench_transport.run_raw: syscall-bound, what C would do). The kinds of run
are interleaved within each repetition so drift from other load on the
machine touches all of them; medians of ``--repeat`` runs are reported.

CPU per GiB: on the source, the event loop's thread (``time.thread_time``)
plus the stream threads' own CPU clocks (``stats.stream_cpu_s``) — the
guest's vCPU threads are not migration work; on the destination, the whole
process's CPU time from the offer to the arrival (its guest is paused until
then), which includes pre-faulting guest memory. Raw TCP: each side's
process CPU. First touch: pre-faulting as much fresh memory alone (the
kernel zeroing each page before the destination overwrites it), in a fresh
process: a floor under the destination's CPU and, on a machine with few
CPUs, a ceiling on the rate, which raw TCP's receiver (one reused buffer)
never meets.

With ``--fill sparse`` the guest's pages hold a few set words each (as the
toy workloads write them): compressible memory, where LZ4 on the streams
pays; the rows then also say how many pages went LZ4.

With ``--first-touch uffd,prefault,auto`` the same, for how the destination
first writes fresh guest memory (LIVEMIG_FIRST_TOUCH=prefault: pre-faulted;
uffd: UFFDIO_COPY; auto, the default: chosen at each offer from the measured
cost of fresh memory, native/firsttouch.py); each destination reports what
it did (``dest_first_touch``).

With ``--pagehash scalar,avx512`` every stream count runs once per page hash
implementation (both peers the same one: LIVEMIG_PAGEHASH=scalar in both
processes' environment, or the CPU's choice), interleaved in each
repetition (the order swapped in odd ones); each process reports the
implementation it really ran.

Usage: python bench/bench_streams.py [--quick] [--repeat 3] [--fill random|sparse]
       [--python-path] [--pagehash scalar,avx512] [--out bench/results/streams.json]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transport import run_raw  # noqa: E402
import report  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
FILL_CHUNK_BYTES = 16 * MiB


# A variant of the runs and the environment its processes get (None: unset).
VARIANT_ENV = {"scalar": ("LIVEMIG_PAGEHASH", "scalar"), "avx512": ("LIVEMIG_PAGEHASH", None),
               "prefault": ("LIVEMIG_FIRST_TOUCH", "prefault"),
               "uffd": ("LIVEMIG_FIRST_TOUCH", "uffd"),
               "auto": ("LIVEMIG_FIRST_TOUCH", None)}


def _label(variant: str | None) -> str:
    if variant is None:
        return ""
    return (" hash=" if VARIANT_ENV[variant][0] == "LIVEMIG_PAGEHASH" else " first-touch=") \
        + variant


@contextlib.contextmanager
def _pagehash_env(impl: str | None):
    """Spawned children inherit the environment: the variable of ``impl``
    (VARIANT_ENV: LIVEMIG_PAGEHASH=scalar for the scalar page hash,
    LIVEMIG_FIRST_TOUCH=prefault or uffd for how destination memory is first
    written; unset for the default) while they start (None: as is)."""
    if impl is None:
        yield
        return
    var, value = VARIANT_ENV[impl]
    saved = os.environ.get(var)
    if value is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# -- the destination, in its own process ------------------------------------------------
def _destination_main(port_q, result_q) -> None:
    import asyncio

    from livemig.aio.loop import run
    from livemig.engine.destination.server import Arrival, MigrationServer
    from livemig.native import pagehash

    async def main():
        cpu_at_offer: dict[str, float] = {}

        def hook(name, peer, stats):
            cpu_at_offer[name] = _process_cpu_s()
            return Arrival(name, peer, stats)

        async with MigrationServer("127.0.0.1", 0, on_incoming=hook) as server:
            port_q.put(server.port)
            while True:
                arrival, vm = await server.completed.get()
                cpu_s = _process_cpu_s() - cpu_at_offer.pop(arrival.name)
                vm.close()
                result_q.put({"name": arrival.name, "cpu_s": cpu_s,
                              "pagehash": pagehash.implementation(),
                              "data_path": arrival.stats.data_path,
                              "first_touch": arrival.stats.first_touch,
                              "stream_cpu_s": arrival.stats.stream_cpu_s})
                await asyncio.sleep(0)

    run(main(), kind="uvloop")


# -- the source, a fresh process per migration --------------------------------------------
def _source_main(job: dict, result_q) -> None:
    from livemig.aio.loop import run
    from livemig.config import MigrationConfig
    from livemig.engine.source.session import migrate
    from livemig.native import PAGE_SIZE, pagehash
    from livemig.vm.machine import VM

    vm = VM(job["memory_bytes"], 2, "idle", seed=job["seed"])
    try:
        rng = np.random.default_rng(job["seed"])
        start = vm.layout.data_first_page(0) * PAGE_SIZE
        for off in range(start, vm.memory.length_bytes, FILL_CHUNK_BYTES):
            end = min(off + FILL_CHUNK_BYTES, vm.memory.length_bytes)
            if job["fill"] == "sparse":   # one set word in each 512 bytes
                words = vm.memory.bytes[off:end].view(np.uint64)
                words[::64] = rng.integers(1, 1 << 16, size=words[::64].shape, dtype=np.uint64)
            else:
                vm.memory.bytes[off:end] = np.frombuffer(rng.bytes(end - off), np.uint8)
        vm.start()
        time.sleep(0.2)
        config = MigrationConfig(streams=job["streams"])
        if not job["lz4"]:
            config = dataclasses.replace(config, codec=config.codec.without("lz4"))

        async def go():
            t0, cpu0 = time.perf_counter(), time.thread_time()
            stats = await migrate(vm, "127.0.0.1", job["port"], config=config, name=job["name"])
            return stats, time.perf_counter() - t0, time.thread_time() - cpu0

        stats, wall_s, loop_cpu_s = run(go(), kind="uvloop")
        result_q.put({"stats": stats.to_dict(), "wall_s": wall_s,
                      "pagehash": pagehash.implementation(),
                      "cpu_s": loop_cpu_s + stats.stream_cpu_s})
    except BaseException as exc:  # report, never hang the parent
        result_q.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        vm.close()


def migrate_once(streams: int, port: int, dest_q, memory_bytes: int, name: str,
                 fill: str, lz4: bool = True, impl: str | None = None) -> dict:
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    job = {"streams": streams, "port": port, "memory_bytes": memory_bytes, "name": name,
           "seed": 7, "fill": fill, "lz4": lz4}
    proc = ctx.Process(target=_source_main, args=(job, result_q))
    with _pagehash_env(impl):
        proc.start()
    try:
        src = result_q.get(timeout=600)
    finally:
        proc.join(timeout=60)
    if "error" in src:
        raise RuntimeError(src["error"])
    dst = dest_q.get(timeout=60)
    stats = src["stats"]
    gib = memory_bytes / GiB
    return {
        "kind": f"streams={streams}" + ("" if lz4 else " no-lz4")
                + _label(impl), "streams": streams,
        "data_path": stats["data_path"], "dest_data_path": dst["data_path"],
        "source_pagehash": src["pagehash"], "dest_pagehash": dst["pagehash"],
        "dest_first_touch": dst["first_touch"],
        "total_s": stats["total_time_ms"] / 1e3, "downtime_ms": stats["downtime_ms"],
        "rounds": stats["nrounds"], "bytes_sent": stats["bytes_sent"],
        "rate_mib_s": memory_bytes / MiB / (stats["total_time_ms"] / 1e3),
        "source_cpu_s_per_gib": src["cpu_s"] / gib,
        "dest_cpu_s_per_gib": dst["cpu_s"] / gib,
        "dest_stream_cpu_s_per_gib": dst["stream_cpu_s"] / gib,
        "pages_by_encoding": stats.get("pages_by_encoding", {}),
        "setup_ms": stats["setup_time_ms"],
        "round_s": [r.get("duration_s") for r in stats["rounds"]],
    }


def raw_once(total_bytes: int, source: memoryview) -> dict:
    got, seconds, recv_cpu_s, send_cpu_s = run_raw(total_bytes, source)
    gib = got / GiB
    return {"kind": "raw-tcp", "rate_mib_s": got / MiB / seconds,
            "source_cpu_s_per_gib": send_cpu_s / gib, "dest_cpu_s_per_gib": recv_cpu_s / gib}


def _first_touch_main(memory_bytes: int, result_q) -> None:
    from livemig.native.memory import GuestMemory

    mem = GuestMemory(memory_bytes)
    try:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        mem.populate()
        result_q.put((time.perf_counter() - t0, time.thread_time() - cpu0))
    finally:
        mem.close()


def first_touch_once(memory_bytes: int) -> dict:
    """Pre-faulting fresh guest memory alone, in a fresh process: the kernel
    zeroing every page the destination will then overwrite. Raw TCP's
    receiver, reusing one buffer, never pays this; a destination must."""
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    proc = ctx.Process(target=_first_touch_main, args=(memory_bytes, result_q))
    proc.start()
    try:
        wall_s, cpu_s = result_q.get(timeout=600)
    finally:
        proc.join(timeout=60)
    return {"kind": "first-touch", "rate_mib_s": memory_bytes / MiB / wall_s,
            "source_cpu_s_per_gib": None, "dest_cpu_s_per_gib": cpu_s / (memory_bytes / GiB)}


def _swap_impls(kinds: list[tuple], impls: list) -> list[tuple]:
    """kinds with the page hash implementations of each stream count reversed."""
    order = {impl: i for i, impl in enumerate(reversed(impls))}
    return sorted(kinds, key=lambda k: (kinds.index((k[0], k[1], impls[0])), order[k[2]]))


def _ratio(x: float | None, ref: float | None) -> float | None:
    return x / ref if x is not None and ref else None


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict]) -> list[dict]:
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    raw = [r for r in runs if r["kind"] == "raw-tcp"]
    raw_rate = _median(raw, "rate_mib_s")
    raw_src_cpu, raw_dst_cpu = (_median(raw, "source_cpu_s_per_gib"),
                                _median(raw, "dest_cpu_s_per_gib"))
    out = []
    for kind in kinds:
        rows = [r for r in runs if r["kind"] == kind]
        row = {"kind": kind, "n": len(rows)}
        for key in ("rate_mib_s", "total_s", "downtime_ms", "source_cpu_s_per_gib",
                    "dest_cpu_s_per_gib", "dest_stream_cpu_s_per_gib", "rounds"):
            row[key] = _median(rows, key)
        row["rate_vs_raw"] = _ratio(row["rate_mib_s"], raw_rate)
        row["source_cpu_vs_raw"] = _ratio(row["source_cpu_s_per_gib"], raw_src_cpu)
        row["dest_cpu_vs_raw"] = _ratio(row["dest_cpu_s_per_gib"], raw_dst_cpu)
        row["data_path"] = rows[0].get("data_path", "-")
        if "source_pagehash" in rows[0]:
            row["pagehash"] = "/".join(sorted({f"{r['source_pagehash']}>{r['dest_pagehash']}"
                                               for r in rows}))
        row["lz4_pages"] = _median([{"v": r.get("pages_by_encoding", {}).get("lz4", 0)}
                                    for r in rows], "v")
        out.append(row)
    return out


def markdown(result: dict) -> str:
    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"
    lines = ["| run | data path | rate MiB/s | × raw TCP | total s | downtime ms | "
             "CPU s/GiB source (× raw) | CPU s/GiB destination (× raw) | "
             "of which dest. stream threads | LZ4 pages |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        lines.append(
            f"| {r['kind']} | {r['data_path']}"
            + (f", hash {r['pagehash']}" if r.get("pagehash") else "")
            + f" | {f(r['rate_mib_s'], 0)} | {f(r['rate_vs_raw'])} "
            f"| {f(r['total_s'])} | {f(r['downtime_ms'], 1)} | {f(r['source_cpu_s_per_gib'])} "
            f"({f(r['source_cpu_vs_raw'], 1)}) | {f(r['dest_cpu_s_per_gib'])} "
            f"({f(r['dest_cpu_vs_raw'], 1)}) | {f(r['dest_stream_cpu_s_per_gib'])} "
            f"| {f(r['lz4_pages'], 0)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, one repetition")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--streams", default="1,2,4", help="stream counts to run (0 = Python path)")
    ap.add_argument("--python-path", action="store_true",
                    help="also migrate on the Python path (streams=0) for reference")
    ap.add_argument("--no-lz4-too", action="store_true",
                    help="also run each native stream count with LZ4 switched off")
    ap.add_argument("--fill", choices=("random", "sparse"), default="random",
                    help="incompressible guest memory, or a few set words per page")
    ap.add_argument("--pagehash", default="",
                    help="comma list of page hash implementations (scalar, avx512) to run "
                         "each stream count with, both peers alike; default: the CPU's choice")
    ap.add_argument("--first-touch", default="",
                    help="comma list of destination first-touch modes (uffd, prefault, auto) to run "
                         "each stream count with; default: the destination's choice")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streams.json"))
    args = ap.parse_args()
    memory_bytes = 256 * MiB if args.quick else GiB
    repeat = 1 if args.quick else args.repeat
    counts = [int(x) for x in args.streams.split(",")] + ([0] if args.python_path else [])
    impls = [x for x in (args.pagehash + "," + args.first_touch).split(",") if x] or [None]
    kinds = [(n, True, impl) for n in counts for impl in impls] + [
        (n, False, impl) for n in counts if n and args.no_lz4_too for impl in impls]

    ctx = mp.get_context("spawn")
    dests, ports, dest_qs = [], {}, {}
    for impl in impls:   # one destination per page hash implementation
        port_q, dest_qs[impl] = ctx.Queue(), ctx.Queue()
        dest = ctx.Process(target=_destination_main, args=(port_q, dest_qs[impl]), daemon=True)
        with _pagehash_env(impl):
            dest.start()
        dests.append(dest)
        ports[impl] = port_q.get(timeout=60)
    source = memoryview(np.random.default_rng(1).bytes(64 * MiB))
    runs: list[dict] = []
    load_before = os.getloadavg()
    try:
        for rep in range(repeat):
            row = raw_once(memory_bytes, source)
            runs.append(row)
            print(f"rep {rep}: raw TCP {row['rate_mib_s']:.0f} MiB/s", flush=True)
            row = first_touch_once(memory_bytes)
            runs.append(row)
            print(f"rep {rep}: first touch {row['rate_mib_s']:.0f} MiB/s, "
                  f"{row['dest_cpu_s_per_gib']:.2f} CPU s/GiB", flush=True)
            # odd repetitions run the implementations in the other order
            for n, lz4, impl in (kinds if rep % 2 == 0 or len(impls) == 1
                                 else _swap_impls(kinds, impls)):
                row = migrate_once(n, ports[impl], dest_qs[impl], memory_bytes,
                                   f"bench-{rep}-{n}-{lz4}-{impl}", args.fill, lz4, impl)
                runs.append(row)
                print(f"rep {rep}: {row['kind']} {row['rate_mib_s']:.0f} MiB/s "
                      f"({row['total_s']:.2f} s, {row['data_path']}, hash "
                      f"{row['source_pagehash']}>{row['dest_pagehash']})", flush=True)
    finally:
        for dest in dests:
            dest.terminate()
            dest.join(timeout=10)
    result = {
        "question": f"1 GiB idle guest ({args.fill} memory), loopback, unlimited: migration "
                    "rate and CPU per GiB with native streams, against raw TCP in the same run",
        "memory_bytes": memory_bytes, "repeat": repeat, "fill": args.fill,
        "pagehash": impls if impls != [None] else None,
        "machine": report.machine(load_before),
        "runs": runs, "summary": summarize(runs),
    }
    report.write(args.out, result, markdown(result))
    print(f"load average before {load_before}, after {result['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()

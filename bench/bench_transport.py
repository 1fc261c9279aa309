"""Transport throughput: livemig channels against raw loopback TCP, same run.

Question: how much of the loopback TCP limit does a bulk channel sending
PageBatch frames of incompressible 4 KiB pages reach, under asyncio and under
uvloop? Target: >= 70 % of raw.

Method. Each measurement runs a receiver in a separate process (so sender and
receiver do not share one interpreter), on 127.0.0.1:
* raw: Python sockets, the sender ``sendall``s 4 MiB slices of a random
  buffer, the receiver ``recv_into``s a preallocated buffer;
* channel: ``open_channel`` (bulk) -> ``serve_channels``, the sender sends
  PageBatch frames of ``--pages-per-frame`` pages (zero-copy memoryviews into
  a numpy array of random bytes), the receiver awaits every event; every frame
  is checksummed (xxh3) and parsed by the full protocol stack.
Throughput is measured on the receiver, first byte to last byte, in payload
bytes (page bytes for channels, so header overhead counts against them).
The median of ``--repeat`` runs is reported, raw runs interleaved with the
channel runs so drift from other load affects both. CPU seconds per GiB on
each side (process time) are reported too: on a shared machine they are far
steadier than wall-clock rates and show where the cost goes.

Usage: python bench/bench_transport.py [--quick] [--out bench/results/transport.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PAGE_BYTES = 4096


def _raw_receiver(port_q, result_q, total_bytes):
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buf = memoryview(bytearray(4 << 20))
    got = conn.recv_into(buf)
    start, cpu0 = time.perf_counter(), time.process_time()
    while got < total_bytes:
        n = conn.recv_into(buf)
        if n == 0:
            break
        got += n
    result_q.put((got, time.perf_counter() - start, time.process_time() - cpu0))
    conn.close()
    srv.close()


def run_raw(total_bytes: int, source: memoryview) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_raw_receiver, args=(port_q, result_q, total_bytes))
    proc.start()
    sock = socket.create_connection(("127.0.0.1", port_q.get(timeout=30)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    chunk = 4 << 20
    sent = 0
    cpu0 = time.process_time()
    while sent < total_bytes:
        off = sent % (len(source) - chunk + 1)
        n = min(chunk, total_bytes - sent)
        sock.sendall(source[off:off + n])
        sent += n
    sender_cpu_s = time.process_time() - cpu0
    result = result_q.get(timeout=120)
    sock.close()
    proc.join()
    return (*result, sender_cpu_s)


def _channel_receiver(port_q, result_q, loop_kind):
    from livemig.aio.channel import serve_channels
    from livemig.aio.loop import run

    async def main():
        done = asyncio.get_running_loop().create_future()

        async def handler(ch):
            nbytes = 0
            start = cpu0 = None
            while (ev := await ch.recv()) is not None:
                if start is None:
                    start, cpu0 = time.perf_counter(), time.process_time()
                nbytes += ev.data_bytes
            done.set_result((nbytes, time.perf_counter() - start, time.process_time() - cpu0))

        async with await serve_channels("127.0.0.1", 0, handler) as srv:
            port_q.put(srv.port)
            result_q.put(await done)

    run(main(), kind=loop_kind)


def run_channel(total_bytes: int, pages: np.ndarray, pages_per_frame: int,
                loop_kind: str) -> tuple[int, float]:
    from livemig.aio.channel import open_channel
    from livemig.aio.loop import run
    from livemig.protocol import ChannelKind, PageBatch

    ctx = mp.get_context("spawn")
    port_q, result_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_channel_receiver, args=(port_q, result_q, loop_kind))
    proc.start()
    port = port_q.get(timeout=30)
    nframes = total_bytes // (pages_per_frame * PAGE_BYTES)
    nsrc = len(pages) // pages_per_frame

    async def main():
        ch = await open_channel("127.0.0.1", port, kind=ChannelKind.BULK,
                                session_id=os.urandom(16))
        cpu0 = time.process_time()
        for i in range(nframes):
            j = (i % nsrc) * pages_per_frame
            await ch.send(PageBatch(0, pages_per_frame, pages[j:j + pages_per_frame]))
        await ch.close()
        return time.process_time() - cpu0

    sender_cpu_s = run(main(), kind=loop_kind)
    result = result_q.get(timeout=120)
    proc.join()
    return (*result, sender_cpu_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: smaller runs")
    ap.add_argument("--pages-per-frame", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transport.json"))
    args = ap.parse_args(argv)
    total_bytes = (384 << 20) if args.quick else (2 << 30)
    repeat = args.repeat or (3 if args.quick else 5)
    source_bytes = 64 << 20
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, source_bytes, dtype=np.uint8).reshape(-1, PAGE_BYTES)

    from livemig.aio.loop import resolve_kind
    kinds = ["asyncio"] + (["uvloop"] if resolve_kind("auto") == "uvloop" else [])
    samples: dict[str, list] = {"raw": [], **{k: [] for k in kinds}}
    for _ in range(repeat):
        samples["raw"].append(run_raw(total_bytes, memoryview(pages.reshape(-1))))
        for kind in kinds:
            samples[kind].append(run_channel(total_bytes, pages, args.pages_per_frame, kind))

    def rate(sample):
        return sample[0] / sample[1]

    def cpu_per_gib(runs, index):
        return statistics.median(s[index] / (s[0] / (1 << 30)) for s in runs)

    raw_bps = statistics.median(rate(s) for s in samples["raw"])
    rows = []
    for name, runs in samples.items():
        bps = statistics.median(rate(s) for s in runs)
        rows.append({"transport": "raw TCP (Python sockets)" if name == "raw"
                     else f"livemig channel, {name}",
                     "loop": None if name == "raw" else name,
                     "bytes_per_run": runs[0][0],
                     "runs_bytes_per_s": [rate(s) for s in runs],
                     "median_bytes_per_s": bps,
                     "ratio_to_raw": bps / raw_bps,
                     "receiver_cpu_s_per_gib": cpu_per_gib(runs, 2),
                     "sender_cpu_s_per_gib": cpu_per_gib(runs, 3)})
    result = {
        "benchmark": "transport",
        "mode": "quick" if args.quick else "full",
        "pages_per_frame": args.pages_per_frame,
        "page_bytes": PAGE_BYTES,
        "repeat": repeat,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine(), "kernel": platform.release()},
        "target_ratio": 0.70,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"| transport ({result['mode']}, {args.pages_per_frame} pages/frame) "
          "| median MiB/s | ratio to raw | sender CPU s/GiB | receiver CPU s/GiB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['transport']} | {row['median_bytes_per_s'] / (1 << 20):.0f} "
              f"| {row['ratio_to_raw']:.2f} | {row['sender_cpu_s_per_gib']:.3f} "
              f"| {row['receiver_cpu_s_per_gib']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency and throughput floors of post-copy fault service.

What a remote fault can cost at best on this host, so the real fault-service
path can be compared against it:

  a) fault -> UFFDIO_COPY of a local 4 KiB page -> resume, a native handler
     thread on the same CPU as the faulting thread, and on the other CPU;
  b) an 8-byte request -> 4 KiB reply over loopback TCP (page server in another
     process), from blocking Python sockets and from an asyncio / uvloop protocol;
  c) end to end: a native thread faults, an asyncio (uvloop) loop reads the
     fault, asks the page server over loopback, places the reply by UFFDIO_COPY;
  d) placement throughput: UFFDIO_COPY in 64-page runs (and single pages),
     UFFDIO_MOVE in 64-page runs.

Latencies (a, c) are timed by the faulting thread itself around its load.
Writes bench/results/postcopy_floor.json and a markdown table next to it.

    python bench/bench_postcopy_floor.py --quick
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import struct
import sys
import time
from multiprocessing import get_context

import numpy as np

from livemig.lab.faultbench import LocalFaultServer, Toucher
from livemig.native.memory import GuestMemory
from livemig.native.postcopy import PostcopyMemory, probe

import report

PAGE = 4096
HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 11


def _source(npages: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, size=(npages, PAGE), dtype=np.uint8)


def _summary_us(ns: np.ndarray) -> dict:
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return {"n": int(us.size), "p50_us": round(float(np.percentile(us, 50)), 2),
            "p99_us": round(float(np.percentile(us, 99)), 2),
            "max_us": round(float(us.max()), 2)}


# ---- the page server (a separate process: no GIL shared with the client) -------------

def _page_server(listener: socket.socket, npages: int) -> None:
    pages = _source(npages)
    req = bytearray(8)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            view = memoryview(req)
            while True:
                got = 0
                while got < 8:
                    n = conn.recv_into(view[got:], 8 - got)
                    if n == 0:
                        break
                    got += n
                if got < 8:
                    break
                (index,) = struct.unpack("<Q", req)
                if index == 2**64 - 1:
                    return
                conn.sendall(pages[index % npages])


class PageServer:
    def __init__(self, npages: int):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.proc = get_context("fork").Process(target=_page_server,
                                                args=(self.listener, npages), daemon=True)
        self.proc.start()

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def stop(self) -> None:
        with self.connect() as s:
            s.sendall(struct.pack("<Q", 2**64 - 1))
        self.proc.join(5)
        self.listener.close()


# ---- a) local UFFDIO_COPY, fault to resume ----------------------------------------------

def bench_local_copy(nfaults: int, toucher_cpu: int, server_cpu: int) -> dict:
    source = _source(nfaults)
    with GuestMemory(nfaults * PAGE) as mem:
        with PostcopyMemory(mem) as pm:
            with LocalFaultServer(pm, source, cpu=server_cpu):
                t = Toucher(mem, np.arange(nfaults), cpu=toucher_cpu)
                t.join(60)
            assert np.array_equal(mem.pages, source), "wrong page contents"
    return _summary_us(t.latency_ns[1:])  # the first touch also pays thread start-up


# ---- b) 8-byte request -> 4 KiB reply over loopback TCP ---------------------------------

def bench_tcp_sockets(server: PageServer, n: int) -> dict:
    lat = np.zeros(n, dtype=np.int64)
    reply = bytearray(PAGE)
    view = memoryview(reply)
    with server.connect() as s:
        for i in range(n):
            t0 = time.perf_counter_ns()
            s.sendall(struct.pack("<Q", i))
            got = 0
            while got < PAGE:
                got += s.recv_into(view[got:], PAGE - got)
            lat[i] = time.perf_counter_ns() - t0
    return _summary_us(lat[10:])


class _PageClient(asyncio.Protocol):
    """Pipelined requests on one connection; replies come back in order."""

    def __init__(self, on_page):
        self.on_page = on_page
        self.pending: list[int] = []
        self.buf = bytearray()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, index: int) -> None:
        self.pending.append(index)
        self.transport.write(struct.pack("<Q", index))

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= PAGE and self.pending:
            self.on_page(self.pending.pop(0), self.buf[:PAGE])
            del self.buf[:PAGE]


def _new_loop(loop_name: str):
    if loop_name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def bench_tcp_asyncio(server: PageServer, n: int, loop_name: str) -> dict:
    async def main():
        loop = asyncio.get_running_loop()
        waiter = None

        def on_page(index, data):
            waiter.set_result(None)

        _, proto = await loop.create_connection(lambda: _PageClient(on_page),
                                                "127.0.0.1", server.port)
        lat = np.zeros(n, dtype=np.int64)
        for i in range(n):
            waiter = loop.create_future()
            t0 = time.perf_counter_ns()
            proto.request(i)
            await waiter
            lat[i] = time.perf_counter_ns() - t0
        proto.transport.close()
        return lat

    with asyncio.Runner(loop_factory=lambda: _new_loop(loop_name)) as runner:
        lat = runner.run(main())
    return _summary_us(lat[10:])


# ---- c) end to end: fault -> loop -> page server -> UFFDIO_COPY ---------------------------

def bench_end_to_end(server: PageServer, npages: int, loop_name: str) -> dict:
    source = _source(npages)
    with GuestMemory(npages * PAGE) as mem, PostcopyMemory(mem) as pm:
        async def main():
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(
                lambda: _PageClient(lambda index, data: pm.place(index, data)),
                "127.0.0.1", server.port)

            def on_faults():
                for page in pm.read_faults():
                    proto.request(int(page))

            loop.add_reader(pm.fileno(), on_faults)
            t = Toucher(mem, np.arange(npages))
            try:
                deadline = loop.time() + 60
                while t.done < npages:
                    if loop.time() > deadline:
                        raise TimeoutError("end-to-end faults were not served")
                    await asyncio.sleep(0.005)
            finally:
                loop.remove_reader(pm.fileno())
                proto.transport.close()
            t.join(5)
            return t

        with asyncio.Runner(loop_factory=lambda: _new_loop(loop_name)) as runner:
            t = runner.run(main())
        assert np.array_equal(mem.pages, source), "wrong page contents"
        stats = pm.stats
    out = _summary_us(t.latency_ns[1:])
    out["faults_read"] = stats["faults_read"]
    return out


# ---- d) placement throughput ----------------------------------------------------------------

def bench_copy_throughput(npages: int, batch: int) -> dict:
    source = _source(npages)
    with GuestMemory(npages * PAGE) as mem, PostcopyMemory(mem) as pm:
        t0 = time.perf_counter()
        for first in range(0, npages, batch):
            pm.place(first, source[first:first + batch], min(batch, npages - first))
        dt = time.perf_counter() - t0
        assert pm.missing == 0 and np.array_equal(mem.pages, source)
    return {"pages": npages, "batch_pages": batch, "mpages_per_s": round(npages / dt / 1e6, 3)}


def bench_move_throughput(npages: int, batch: int) -> dict:
    source = _source(npages)
    with GuestMemory(npages * PAGE) as mem, GuestMemory(npages * PAGE, hugepages=False) as donor:
        donor.pages[:] = source  # populate: the pages to be moved must exist
        with PostcopyMemory(mem) as pm:
            t0 = time.perf_counter()
            for first in range(0, npages, batch):
                n = min(batch, npages - first)
                pm.place_move(first, donor.bytes[first * PAGE:(first + n) * PAGE], n)
            dt = time.perf_counter() - t0
            stats = pm.stats
            assert pm.missing == 0 and np.array_equal(mem.pages, source)
    return {"pages": npages, "batch_pages": batch, "mpages_per_s": round(npages / dt / 1e6, 3),
            "busy_copies": stats["move_busy_copies"]}


# ---- report ---------------------------------------------------------------------------------

REFERENCE = {
    "a_local_copy_same_cpu": "7.8 us p50",
    "a_local_copy_cross_cpu": "30 us p50",
    "b_tcp": "~25 us p50 (C)",
    "c_end_to_end": "24.8 us p50 / 57 us p99 (C)",
    "d_copy_batch64": "0.9 Mpages/s",
    "d_move_batch64": "3.7 Mpages/s",
}


def _table(results: dict) -> str:
    lines = ["| measurement | p50 µs | p99 µs | max µs | throughput | reference |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        ref = next((v for k, v in REFERENCE.items() if name.startswith(k)), "")
        if "p50_us" in r:
            lines.append(f"| {name} | {r['p50_us']} | {r['p99_us']} | {r['max_us']} | | {ref} |")
        else:
            lines.append(f"| {name} | | | | {r['mpages_per_s']} Mpages/s | {ref} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (seconds, not minutes)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "postcopy_floor.json"))
    args = ap.parse_args(argv)
    found = probe()
    if not found.missing:
        print(f"userfaultfd MISSING unavailable: {found.reason}", file=sys.stderr)
        return 2
    nfaults = 2000 if args.quick else 20000
    nrtt = 2000 if args.quick else 20000
    nthru = 16384 if args.quick else 262144
    ncpu = os.cpu_count() or 1
    other = 1 if ncpu > 1 else 0

    results: dict[str, dict] = {}
    server = PageServer(nfaults)  # fork before any thread exists
    try:
        results["a_local_copy_same_cpu"] = bench_local_copy(nfaults, 0, 0)
        results["a_local_copy_cross_cpu"] = bench_local_copy(nfaults, 0, other)
        results["b_tcp_python_sockets"] = bench_tcp_sockets(server, nrtt)
        results["b_tcp_asyncio"] = bench_tcp_asyncio(server, nrtt, "asyncio")
        results["b_tcp_uvloop"] = bench_tcp_asyncio(server, nrtt, "uvloop")
        results["c_end_to_end_asyncio"] = bench_end_to_end(server, nfaults, "asyncio")
        results["c_end_to_end_uvloop"] = bench_end_to_end(server, nfaults, "uvloop")
    finally:
        server.stop()
    results["d_copy_batch64"] = bench_copy_throughput(nthru, 64)
    results["d_copy_batch1"] = bench_copy_throughput(nthru // 4, 1)
    if found.move:
        results["d_move_batch64"] = bench_move_throughput(nthru, 64)

    doc = {
        "benchmark": "postcopy_floor",
        "mode": "quick" if args.quick else "full",
        "host": {"kernel": platform.release(), "cpus": ncpu, "python": platform.python_version()},
        "notes": "latencies timed by the faulting native thread around its load; page server "
                 "is a separate Python process (blocking sockets, TCP_NODELAY); (a) with a "
                 "native handler thread; (c) unpinned",
        "reference": REFERENCE,
        "results": results,
    }
    report.write(args.out, doc, f"## Post-copy floors ({doc['mode']}, kernel "
                 f"{platform.release()}, {ncpu} CPUs)\n\n{_table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

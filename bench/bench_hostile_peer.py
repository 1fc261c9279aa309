"""What a hostile source costs a daemon: its RSS before and after each attack.

Starts one daemon process, then for each attack takes the daemon's RSS as a
baseline, attacks ``--attempts`` times from a raw socket speaking frames
(docs/protocol.md), lets the peer go, and records the RSS once it settles
(the lowest value seen within ``--settle`` seconds). Writes
bench/results/hostile_peer.json.

    python bench/bench_hostile_peer.py [--attempts 12] [--size-mib 32]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

from livemig.lab.daemonproc import free_port, stop, wait_ready
from livemig.protocol.spec import FRAME_HEADER_FORMAT, FRAME_MAGIC, MESSAGE_IDS
from livemig.service.control import ControlClient

HEADER = struct.Struct(FRAME_HEADER_FORMAT)
OUT = Path(__file__).parent / "results" / "hostile_peer.json"


def frame(message: str, sequence: int, body: bytes) -> bytes:
    return HEADER.pack(FRAME_MAGIC, 1, MESSAGE_IDS[message], 0, 0, len(body), sequence,
                       xxhash.xxh3_64_intdigest(body)) + body


def hello(caps_count: int = 0, pad_bytes: int = 0) -> bytes:
    return (struct.pack("<HHBBHI", 1, 1, 1, 0, 0, 64 << 20) + os.urandom(16)
            + struct.pack("<H", caps_count) + bytes(pad_bytes))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def drain(sock: socket.socket) -> None:
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def big_hello(port: int, size_bytes: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(frame("Hello", 0, hello(caps_count=60000, pad_bytes=size_bytes)))
        except OSError:
            return      # closed on the header
        drain(s)


def bad_offer(port: int, size_bytes: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(frame("Hello", 0, hello()))
        s.recv(1 << 16)
        try:
            s.sendall(frame("MigrationOffer", 1, b"\xff" * size_bytes))
        except OSError:
            return
        drain(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attempts", type=int, default=12)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--settle", type=float, default=5.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port, control, log = free_port(), str(tmp / "d.sock"), str(tmp / "d.log")
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "daemon", "--listen",
                             f"127.0.0.1:{port}", "--control", control],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=60)
    wait_ready(client, proc, log)
    results = []
    try:
        for name, attack in (("hello_announcing_size_bad_caps", big_hello),
                             ("offer_after_welcome_not_decodable", bad_offer)):
            before = rss_mib(proc.pid)
            for _ in range(args.attempts):
                attack(port, args.size_mib << 20)
            deadline, after = time.monotonic() + args.settle, rss_mib(proc.pid)
            while time.monotonic() < deadline:
                time.sleep(0.2)
                after = min(after, rss_mib(proc.pid))
            results.append({"attack": name, "attempts": args.attempts,
                            "size_mib": args.size_mib, "rss_before_mib": round(before, 1),
                            "rss_after_mib": round(after, 1)})
            print(f"{name}: {before:.0f} MiB -> {after:.0f} MiB")
    finally:
        stop(client, proc)
    OUT.write_text(json.dumps({"host_cpus": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

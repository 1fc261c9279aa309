"""A hostile peer written from docs/protocol.md: raw frames over a plain socket,
and the resident memory of the process it attacks."""
from __future__ import annotations

import os
import socket
import struct
import time

import xxhash

from livemig.protocol.spec import FRAME_HEADER_FORMAT, FRAME_MAGIC, MESSAGE_IDS

HEADER = struct.Struct(FRAME_HEADER_FORMAT)
# u16 min/max version, u8 channel kind, u8 resume, u16 reserved, u32 max payload
HELLO_PREFIX = struct.Struct("<HHBBHI")
CONTROL = 1


def frame(message: str, sequence: int, body: bytes, *, version: int = 1,
          length: int | None = None) -> bytes:
    """One frame; ``length`` (default: the body's) may lie about the payload."""
    return HEADER.pack(FRAME_MAGIC, version, MESSAGE_IDS[message], 0, 0,
                       len(body) if length is None else length, sequence,
                       xxhash.xxh3_64_intdigest(body)) + body


def hello_body(*, caps_count: int = 0, pad_bytes: int = 0) -> bytes:
    """A control-channel Hello with a fresh session id; ``caps_count`` is
    written as is (a lie when no names follow) and ``pad_bytes`` appended."""
    return (HELLO_PREFIX.pack(1, 1, CONTROL, 0, 0, 64 << 20) + os.urandom(16)
            + struct.pack("<H", caps_count) + bytes(pad_bytes))


def read_frame(sock: socket.socket) -> tuple[str, bytes] | None:
    """(message name, payload) of the next frame, or None at end of stream."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    type_id, length = HEADER.unpack(header)[2], HEADER.unpack(header)[5]
    body = _read_exactly(sock, length) or b""
    names = {v: k for k, v in MESSAGE_IDS.items()}
    return names[type_id], body


def _read_exactly(sock: socket.socket, nbytes: int) -> bytes | None:
    out = bytearray()
    while len(out) < nbytes:
        chunk = sock.recv(nbytes - len(out))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_rss_below(pid: int, limit_bytes: int, timeout_s: float = 30.0) -> int:
    """Poll until the process's RSS is at most ``limit_bytes``; returns it.
    Fails with the last value after ``timeout_s`` (a condition, not a speed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rss = rss_bytes(pid)
        if rss <= limit_bytes or time.monotonic() > deadline:
            return rss
        time.sleep(0.2)


class SilentSource:
    """A source that follows the protocol (a sans-IO Connection over a plain
    socket) exactly as far as the test drives it, then may fall silent."""

    def __init__(self, port: int, timeout_s: float = 60.0):
        from livemig.protocol import ChannelKind, Connection, Hello
        from livemig.protocol.state import Role

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(timeout_s)
        self.conn = Connection(Role.SOURCE, ChannelKind.CONTROL)
        self.send(Hello(1, 1, ChannelKind.CONTROL, os.urandom(16)))
        self.welcome = self.recv()

    def send(self, event) -> None:
        for buf in self.conn.send(event):
            self.sock.sendall(buf)

    def recv(self):
        """The next event, or None once the destination closed."""
        from livemig.protocol import CLOSED, NEED_DATA

        while True:
            event = self.conn.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                return event
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def offer(self, name: str, memory_bytes: int):
        from livemig.protocol import MigrationOffer, Mode

        self.send(MigrationOffer({"name": name, "memory_bytes": memory_bytes, "vcpus": 1,
                                  "workload": "idle"}, Mode.PRECOPY, memory_bytes // 4096))
        return self.recv()

    def close(self) -> None:
        self.sock.close()

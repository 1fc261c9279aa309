"""The commit point's fast path: an etcd transaction from a blocking socket.

Theory of operation
-------------------
The guest is paused while the destination makes its commit-point
transaction (member.py ``CommitGate``: owner := here, epoch + 1). Through
the event loop it costs a loop wake-up on its answer on top of etcd's own
time (bench/RESULTS.md §12); sent from a blocking socket on the loop's own
thread, it costs etcd's time alone. ``BlockingTxn`` is that
socket to the endpoint the daemon's client uses now, kept alive between
commit points and checked at each offer (``alive``: a connection etcd closed
while idle is replaced then, before the pause).

It is only a fast path, never the judge: every socket operation is bounded by
``FAST_TRY_S`` (the loop is blocked at most that long a step), and anything
but a clean 200 answer — a refusal, a 5xx, silence, a malformed reply —
raises ``FastPathFailed``, the socket is closed, and the caller goes on
with the full asynchronous path (failover, lost-answer reads, retries),
which treats the fast attempt as an answer lost on the way. Nothing is left
in flight when a call returns or raises: no thread, no pending request.
"""
from __future__ import annotations

import json
import socket

FAST_TRY_S = 0.1             # the longest the loop blocks on one connect/send/receive
MAX_ANSWER_BYTES = 1 << 20


class FastPathFailed(Exception):
    """The fast path gave up; its request's outcome is unknown."""


class BlockingTxn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        try:
            self.sock = socket.create_connection((host, port), timeout=FAST_TRY_S)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise FastPathFailed(f"{host}:{port}: {exc}") from exc
        self._head = (f"POST /v3/kv/txn HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Content-Type: application/json\r\nContent-Length: ").encode()

    def txn(self, compare: list[dict], success: list[dict],
            failure: list[dict] | None = None) -> tuple[bool, dict]:
        """(succeeded, answer); FastPathFailed when there is no clean answer."""
        if self.sock is None:
            raise FastPathFailed("closed")
        body = json.dumps({"compare": compare, "success": success,
                           "failure": failure or []}).encode()
        try:
            self.sock.sendall(self._head + b"%d\r\n\r\n" % len(body) + body)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf = self._recv(buf)
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            if not lines[0].startswith(b"HTTP/1.1 200 "):
                raise FastPathFailed(f"answer {lines[0][:60]!r}")
            length = next((int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                           if k.strip().lower() == b"content-length"), -1)
            if not 0 <= length <= MAX_ANSWER_BYTES:
                raise FastPathFailed(f"answer length {length}")
            while len(rest) < length:
                rest = self._recv(rest)
            answer = json.loads(rest[:length])
        except (OSError, ValueError) as exc:
            self.close()
            raise FastPathFailed(f"{self.host}:{self.port}: {exc}") from exc
        except FastPathFailed:
            self.close()
            raise
        return bool(answer.get("succeeded", False)), answer

    def alive(self) -> bool:
        """Still connected, nothing unasked-for waiting (checked without
        blocking); a dead connection is closed."""
        if self.sock is None:
            return False
        self.sock.settimeout(0.0)         # a peek that never waits
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            self.sock.settimeout(FAST_TRY_S)
            return True
        except OSError:
            pass
        self.close()          # closed by etcd (b""), or bytes nobody asked for
        return False

    def _recv(self, buf: bytes) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise FastPathFailed("connection closed")
        if len(buf) + len(chunk) > MAX_ANSWER_BYTES + 16384:
            raise FastPathFailed("answer too large")
        return buf + chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

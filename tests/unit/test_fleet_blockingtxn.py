"""The commit point's blocking-socket fast path (fleet/blockingtxn.py): a clean
answer is returned; anything else — an error status, silence, a closed or
garbled connection, a huge length — raises FastPathFailed within FAST_TRY_S
a step and leaves the socket closed, so the caller falls back with nothing in
flight. ``alive`` notices a connection the server closed while idle."""
import json
import socket
import threading
import time

import pytest

from livemig.fleet.blockingtxn import FAST_TRY_S, BlockingTxn, FastPathFailed
from support.waiting import wait_for


class OneShotServer:
    """Accepts one connection; answers each request with ``reply(n)`` bytes
    (None: say nothing)."""

    def __init__(self, reply):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.conn = reply, None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self._answer()
        except OSError:          # the test closed the sockets under us
            pass

    def _answer(self):
        self.conn, _ = self.listener.accept()
        n = 0
        while True:
            data = self.conn.recv(65536)
            if not data:
                return
            out = self.reply(n)
            n += 1
            if out is None:
                continue
            if out == b"CLOSE":
                self.conn.close()
                return
            self.conn.sendall(out)

    def close(self):
        self.listener.close()
        if self.conn is not None:
            self.conn.close()


def http(status: str, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Length: {n}\r\n\r\n".encode() + body


OK = json.dumps({"header": {"revision": "5"}, "succeeded": True}).encode()


def test_a_clean_answer_twice_on_one_connection():
    srv = OneShotServer(lambda n: http("200 OK", OK))
    try:
        txn = BlockingTxn("127.0.0.1", srv.port)
        assert txn.txn([], [])[0] is True
        assert txn.txn([], [])[0] is True
        assert txn.alive()
        txn.close()
    finally:
        srv.close()


@pytest.mark.parametrize("reply", [
    lambda n: http("503 Service Unavailable", b'{"error":"etcdserver: no leader"}'),
    lambda n: http("200 OK", OK, length=1 << 30),
    lambda n: b"garbage\r\n\r\n",
    lambda n: b"CLOSE",
    lambda n: http("200 OK", b"{not json"),
    lambda n: None,                      # silence
], ids=["503", "huge-length", "not-http", "closed", "bad-json", "silence"])
def test_anything_but_a_clean_answer_fails_fast_and_closes(reply):
    srv = OneShotServer(reply)
    try:
        txn = BlockingTxn("127.0.0.1", srv.port)
        t0 = time.monotonic()
        with pytest.raises(FastPathFailed):
            txn.txn([], [])
        assert time.monotonic() - t0 < 20 * FAST_TRY_S     # bounded, not the etcd timeout
        assert txn.sock is None and not txn.alive()
        with pytest.raises(FastPathFailed):
            txn.txn([], [])
    finally:
        srv.close()


def test_alive_notices_a_connection_closed_while_idle():
    srv = OneShotServer(lambda n: b"CLOSE")
    try:
        txn = BlockingTxn("127.0.0.1", srv.port)
        assert txn.alive()
        txn.sock.sendall(b"x")          # the server closes on its next read
        srv.thread.join(5)
        wait_for("the closed connection to be noticed", lambda: not txn.alive(), timeout_s=5)
        assert txn.sock is None
    finally:
        srv.close()


def test_a_refused_connection_fails_fast():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(FastPathFailed):
        BlockingTxn("127.0.0.1", port)

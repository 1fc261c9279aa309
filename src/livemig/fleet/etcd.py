"""A small etcd v3 client over the JSON gateway (``/v3/…``), on asyncio streams.

Theory of operation
-------------------
etcd serves its gRPC API as JSON over HTTP/1.1 at ``/v3/kv/range``,
``/v3/kv/put``, ``/v3/kv/txn``, ``/v3/kv/deleterange``, ``/v3/lease/grant``,
``/v3/lease/keepalive`` and ``/v3/lease/revoke`` (3.4 and later); keys and
values travel base64-encoded. Each ``EtcdClient`` keeps one keep-alive
connection to one endpoint at a time, one request in flight (a lock), and on
any failure moves to the next endpoint and retries once per endpoint within
the call's deadline (a 5xx answer, such as "no leader", or a 429 "too many
requests" counts as a failure: members answer so during and just after a leader
change).
Every call is bounded: ``timeout_s`` for the whole call,
``MAX_RESPONSE_BYTES`` for a response, ``MAX_HEADER_BYTES`` for its headers.
All failures leave as ``EtcdUnavailable`` (no endpoint answered: the outcome
of a write is then unknown) or ``EtcdError`` (etcd answered with an error).

A write whose connection breaks after the request was sent may or may not
have been applied: callers that must know (the ownership transaction) read
the key back rather than retrying blindly (fleet/member.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

from ..addresses import parse_hostport
from ..errors import ConfigError, LivemigError
from ..aio.deadline import within

MAX_RESPONSE_BYTES = 4 << 20
MAX_HEADER_BYTES = 16 << 10
DEFAULT_TIMEOUT_S = 5.0
MIN_TRY_S = 0.5           # the shortest wait for one endpoint's answer
RETRY_PAUSE_S = 0.05      # between endpoints, so an election can finish within the deadline
SCHEME = "etcd://"
HTTP_TOO_MANY_REQUESTS = 429   # gRPC RESOURCE_EXHAUSTED: "too many requests", retried elsewhere


class EtcdError(LivemigError):
    """etcd answered, with an error."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the deadline; a write's outcome is unknown."""


def parse_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://HOST:PORT[,HOST:PORT…]`` → [(host, port), …]."""
    if not url.startswith(SCHEME):
        raise ConfigError(f"--fleet must look like etcd://HOST:PORT[,HOST:PORT…], got {url!r}")
    parts = [p for p in url[len(SCHEME):].split(",") if p]
    if not parts:
        raise ConfigError(f"--fleet {url!r} names no etcd endpoint")
    return [parse_hostport(p, what="etcd endpoint") for p in parts]


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict) -> "KeyValue":
        return cls(unb64(kv.get("key")).decode(), unb64(kv.get("value")),
                   int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)),
                   int(kv.get("lease", 0)))


class EtcdClient:
    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.endpoints = parse_endpoints(url)
        self.timeout_s = timeout_s
        self._current = 0
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    @property
    def endpoint_index(self) -> int:
        return self._current

    # -- transport ---------------------------------------------------------------------------
    async def call(self, path: str, body: dict, *, timeout_s: float | None = None) -> dict:
        """POST ``body`` to ``/v3/<path>`` and return the JSON answer."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        payload = json.dumps(body).encode()
        last = "no endpoint tried"
        async with self._lock:
            while True:     # every endpoint in turn, until the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                host, port = self.endpoints[self._current]
                try:
                    # One silent member must not use up the whole deadline.
                    per_try_s = max(MIN_TRY_S, self.timeout_s / len(self.endpoints))
                    return await within(self._exchange(host, port, path, payload),
                                        min(left, per_try_s))
                except EtcdError:
                    raise
                except (OSError, asyncio.TimeoutError, ValueError, asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError) as exc:
                    last = f"{host}:{port}: {type(exc).__name__}: {exc}"
                    self._drop()
                    self._current = (self._current + 1) % len(self.endpoints)
                    await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
        raise EtcdUnavailable(f"etcd at {self.url} did not answer /v3/{path} ({last})")

    async def _exchange(self, host: str, port: int, path: str, payload: bytes) -> dict:
        if self._conn is None:
            self._conn = await asyncio.open_connection(host, port, limit=MAX_HEADER_BYTES)
        reader, writer = self._conn
        writer.write(f"POST /v3/{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     "\r\n".encode() + payload)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            raise ValueError("response headers too large")
        lines = head.decode("latin-1").split("\r\n")
        first = lines[0].split()
        if len(first) < 2 or not first[0].startswith("HTTP/1.") or not first[1].isdigit():
            raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
        status = int(first[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        else:
            length = int(headers.get("content-length", "-1"))
            if not 0 <= length <= MAX_RESPONSE_BYTES:
                raise ValueError(f"response length {length} outside 0..{MAX_RESPONSE_BYTES}")
            body = await reader.readexactly(length)
        if headers.get("connection", "").lower() == "close":
            self._drop()
        answer = json.loads(body or b"{}")
        if status >= 500 or status == HTTP_TOO_MANY_REQUESTS:
            # No leader, a leader change, a timed-out proposal, a member too
            # busy to take the request: another member (or this one, a moment
            # later) may answer. Callers of a write make it safe to repeat (a
            # compare on the revision), see member.py.
            raise ConnectionError(f"HTTP {status}: {answer.get('message') or body[:200]!r}")
        if status != 200 or "error" in answer and "result" not in answer:
            raise EtcdError(f"etcd /v3/{path}: HTTP {status}: "
                            f"{answer.get('message') or answer.get('error') or body[:200]!r}")
        return answer

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if len(body) + size > MAX_RESPONSE_BYTES:
                raise ValueError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if size == 0:
                return bytes(body)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def close(self) -> None:
        self._drop()

    # -- API -------------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        kvs = (await self.call("kv/range", {"key": b64(key)})).get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str, *, limit: int = 100_000) -> list[KeyValue]:
        p = prefix.encode()
        answer = await self.call("kv/range", {"key": b64(p), "range_end": b64(prefix_end(p)),
                                              "limit": limit})
        return [KeyValue.from_json(kv) for kv in answer.get("kvs") or []]

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self.call("kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> int:
        answer = await self.call("kv/deleterange", {"key": b64(key)})
        return int(answer.get("deleted", 0))

    async def txn(self, compare: list[dict], success: list[dict],
                  failure: list[dict] | None = None, *,
                  timeout_s: float | None = None) -> tuple[bool, dict]:
        """One transaction: (succeeded, the whole answer)."""
        answer = await self.call("kv/txn", {"compare": compare, "success": success,
                                            "failure": failure or []}, timeout_s=timeout_s)
        return bool(answer.get("succeeded", False)), answer

    async def lease_grant(self, ttl_s: int) -> int:
        answer = await self.call("lease/grant", {"TTL": str(int(ttl_s))})
        return int(answer["ID"])

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew; returns the TTL left (0: the lease is gone)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease_id)})
        return int((answer.get("result") or {}).get("TTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        await self.call("lease/revoke", {"ID": str(lease_id)})


# Request builders for transactions (the gateway's JSON shape of RequestOp/Compare).
def op_put(key: str, value: bytes | str, lease: int = 0) -> dict:
    req = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_get(key: str) -> dict:
    return {"request_range": {"key": b64(key)}}


def cmp_mod_revision(key: str, revision: int) -> dict:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def cmp_absent(key: str) -> dict:
    """True while ``key`` does not exist (it was never created, or deleted)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def cmp_value(key: str, value: bytes | str) -> dict:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


__all__ = ["EtcdClient", "EtcdError", "EtcdUnavailable", "KeyValue", "parse_endpoints",
           "op_put", "op_get", "cmp_absent", "cmp_mod_revision", "cmp_value", "MAX_RESPONSE_BYTES"]

"""A watch on one etcd key through the JSON gateway (``POST /v3/watch``).

Theory of operation
-------------------
The gateway answers a watch with a chunked HTTP response that never ends:
one JSON object per line, ``{"result": {"header": {"revision": …},
"created": true}}`` first, then one per batch of events (``"type":
"DELETE"`` for a deletion; a put carries no type). ``WatchDecoder`` is the
sans-IO half: it takes the bytes as they come (any split), undoes the
chunking and returns whole messages, and refuses — ``ValueError`` — a chunk
or a line longer than ``MAX_WATCH_MESSAGE_BYTES`` or anything that is not
chunked JSON: a broken or hostile gateway costs at most that much memory.
``watch_key`` is the I/O half, on its own connection (``EtcdClient`` keeps
one request in flight on one connection; a watch would hold it forever): it
opens the stream on one endpoint after another, yields each event, and
raises ``EtcdUnavailable`` when the stream breaks, stays silent past the
connection deadline before it is created, or etcd cancels it.

Resuming without a gap is the caller's part: it asks again from the
revision after the last one it saw (``start_revision``), so an event that
happened while the stream was down is delivered by the next one; a revision
etcd compacted away cancels the watch (``compact_revision``), and the caller
then reads the key afresh. A member cut off from its peers accepts a watch and
stays silent: the caller keeps a slow linearizable read as a safety net.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from ..aio.deadline import within
from .etcd import MAX_HEADER_BYTES, EtcdClient, EtcdUnavailable, KeyValue, b64

MAX_WATCH_MESSAGE_BYTES = 1 << 20    # one chunk, one line: a leader record is ~100 bytes
READ_BYTES = 16 << 10


@dataclass
class WatchEvent:
    kind: str            # "PUT" or "DELETE"
    kv: KeyValue
    revision: int        # the header's: resume after it


class WatchDecoder:
    """Chunked HTTP body → JSON messages, bounded (sans-IO)."""

    def __init__(self, limit_bytes: int = MAX_WATCH_MESSAGE_BYTES):
        self.limit_bytes = limit_bytes
        self._raw = bytearray()       # undecoded chunked bytes
        self._line = bytearray()      # decoded body bytes not yet ending a line
        self._chunk_left = -1         # bytes of the current chunk still to come; -1: a size line
        self.ended = False

    def feed(self, data: bytes) -> list[dict]:
        if not data:
            raise ValueError("the watch stream ended")
        self._raw += data
        out: list[dict] = []
        while self._raw and not self.ended:
            if self._chunk_left < 0:
                end = self._raw.find(b"\r\n")
                if end < 0:
                    if len(self._raw) > 64:
                        raise ValueError("a chunk size line longer than 64 bytes")
                    break
                size = int(bytes(self._raw[:end]).split(b";")[0], 16)   # ValueError if not hex
                if size > self.limit_bytes:
                    raise ValueError(f"a watch chunk of {size} bytes (at most "
                                     f"{self.limit_bytes})")
                del self._raw[:end + 2]
                self._chunk_left = size + 2          # its trailing CRLF too
                if size == 0:
                    self.ended = True
                continue
            take = bytes(self._raw[:self._chunk_left])
            data_part = take[:max(0, self._chunk_left - 2)]     # not the chunk's CRLF
            del self._raw[:len(take)]
            self._chunk_left -= len(take)
            if self._chunk_left == 0:
                self._chunk_left = -1
            self._line += data_part
            while (nl := self._line.find(b"\n")) >= 0:
                line = bytes(self._line[:nl]).strip()
                del self._line[:nl + 1]
                if line:
                    out.append(json.loads(line))
            if len(self._line) > self.limit_bytes:
                raise ValueError(f"a watch message longer than {self.limit_bytes} bytes")
        if self.ended:
            raise ValueError("the watch stream ended")
        return out


def events(message: dict) -> tuple[int, list[WatchEvent]]:
    """(the header's revision, the events) of one watch message; raises
    EtcdUnavailable when etcd cancelled the watch (e.g. compacted revision)."""
    result = message.get("result")
    if not isinstance(result, dict):
        raise EtcdUnavailable(f"watch: etcd said {str(message)[:200]}")
    if result.get("canceled") or result.get("compact_revision"):
        raise EtcdUnavailable(f"watch cancelled by etcd (compact_revision "
                              f"{result.get('compact_revision', 0)}, "
                              f"{result.get('cancel_reason', '')})")
    try:
        revision = int((result.get("header") or {}).get("revision", 0))
        return revision, [WatchEvent(e.get("type", "PUT"), KeyValue.from_json(e.get("kv") or {}),
                                     revision) for e in result.get("events") or []]
    except (TypeError, AttributeError) as exc:     # a message of another shape
        raise ValueError(f"a malformed watch message: {str(message)[:200]}") from exc


async def watch_key(client: EtcdClient, key: str, start_revision: int) -> AsyncIterator:
    """Yield ``WatchEvent``s on ``key`` from ``start_revision``, and the
    int revision of the created header first. Uses ``client``'s endpoints,
    never its connection."""
    body = json.dumps({"create_request": {"key": b64(key),
                                          "start_revision": str(start_revision)}}).encode()
    last = "no endpoint tried"
    first = client.endpoint_index     # the member the client's requests go to now
    for host, port in client.endpoints[first:] + client.endpoints[:first]:
        try:
            reader, writer = await within(asyncio.open_connection(host, port,
                                                                  limit=MAX_HEADER_BYTES),
                                          client.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            last = f"{host}:{port}: {type(exc).__name__}: {exc}"
            continue
        try:
            writer.write(f"POST /v3/watch HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "\r\n".encode() + body)
            decoder, created = WatchDecoder(), False
            try:
                head = await within(reader.readuntil(b"\r\n\r\n"), client.timeout_s)
                status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.") else b""
                if status != b"200" or b"chunked" not in head.lower():
                    raise ValueError(f"not a chunked 200 answer: {head[:80]!r}")
                while True:
                    # Until created: the connection deadline; then silence is allowed.
                    data = await (reader.read(READ_BYTES) if created else
                                  within(reader.read(READ_BYTES), client.timeout_s))
                    for message in decoder.feed(data):
                        revision, evs = events(message)
                        if not created:
                            created = True
                            yield revision
                        for e in evs:
                            yield e
            except (OSError, asyncio.TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                last = f"{host}:{port}: {type(exc).__name__}: {exc}"
                if created:
                    break       # the caller resumes from the revision it saw
        finally:
            writer.close()
    raise EtcdUnavailable(f"etcd watch on {key} at {client.url} broke ({last})")


__all__ = ["WatchDecoder", "WatchEvent", "watch_key", "events", "MAX_WATCH_MESSAGE_BYTES"]

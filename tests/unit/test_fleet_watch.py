"""The leader-key watch (fleet/watch.py): the decoder against any split and
hostile streams (bounded, only ValueError out), and a real etcd's stream:
a deletion is delivered, and a watch resumed from a revision misses nothing."""
import asyncio
import json

import pytest

from livemig.fleet.etcd import EtcdClient, EtcdUnavailable
from livemig.fleet.watch import WatchDecoder, events, watch_key
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster

MESSAGES = [{"result": {"header": {"revision": "1"}, "created": True}},
            {"result": {"header": {"revision": "3"}, "events": [
                {"type": "DELETE", "kv": {"key": "L2E=", "mod_revision": "3"}}]}}]


def _chunked(messages, chunk_bytes: int) -> bytes:
    body = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    out = b""
    for i in range(0, len(body), chunk_bytes):
        part = body[i:i + chunk_bytes]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 4096])
@pytest.mark.parametrize("feed_bytes", [1, 3, 100, 100_000])
def test_any_split_gives_the_same_messages(chunk_bytes, feed_bytes):
    stream, decoder, got = _chunked(MESSAGES, chunk_bytes), WatchDecoder(), []
    for i in range(0, len(stream), feed_bytes):
        got += decoder.feed(stream[i:i + feed_bytes])
    assert got == MESSAGES
    revision, evs = events(got[1])
    assert revision == 3 and [(e.kind, e.kv.key, e.kv.mod_revision) for e in evs] == [
        ("DELETE", "/a", 3)]


@pytest.mark.parametrize("stream", [
    b"zz\r\n",                                        # not a chunk size
    b"ffffffff\r\n",                                  # a chunk larger than the bound
    b"1" * 100,                                       # a size line without end
    b"0\r\n\r\n",                                     # the stream ended
    b"5\r\n{nope\r\n1\r\n\n\r\n",                     # not JSON
])
def test_hostile_streams_raise_value_error(stream):
    with pytest.raises(ValueError):
        WatchDecoder().feed(stream)


def test_a_line_without_end_is_bounded():
    decoder = WatchDecoder(limit_bytes=1000)
    with pytest.raises(ValueError, match="longer than"):
        for _ in range(10):
            decoder.feed(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
    with pytest.raises(ValueError):
        WatchDecoder().feed(b"")


@pytest.mark.parametrize("message", [{"result": {"events": 5}},
                                     {"result": {"header": "x", "events": []}},
                                     {"result": {"events": [{"kv": {"mod_revision": "x"}}]}}])
def test_malformed_messages_raise_value_error(message):
    with pytest.raises(ValueError):
        events(message)


def test_a_cancelled_watch_is_unavailable():
    with pytest.raises(EtcdUnavailable, match="compact"):
        events({"result": {"header": {}, "canceled": True, "compact_revision": "7"}})


@pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
def test_a_real_watch_delivers_deletions_and_resumes_from_a_revision(tmp_path):
    async def main(url):
        client = EtcdClient(url)
        try:
            rev = await client.put("/w/k", "1")
            stream = watch_key(client, "/w/k", rev + 1)
            assert isinstance(await stream.__anext__(), int)       # created
            await client.delete("/w/k")
            gone = await asyncio.wait_for(stream.__anext__(), 10)
            assert gone.kind == "DELETE" and gone.kv.key == "/w/k"
            await stream.aclose()
            # While nobody watches: a put and a delete; resumed after the
            # last event seen, the watch delivers both.
            await client.put("/w/k", "2")
            await client.delete("/w/k")
            stream = watch_key(client, "/w/k", gone.revision + 1)
            await stream.__anext__()
            seen = [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(2)]
            assert [(e.kind, e.kv.value) for e in seen] == [("PUT", b"2"), ("DELETE", b"")]
            await stream.aclose()
        finally:
            await client.close()

    with etcd_cluster(tmp_path, members=1) as etcd:
        asyncio.run(main(etcd.url))

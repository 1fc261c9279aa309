"""The etcd gateway client against hostile or broken servers: every answer is
bounded in size and time, and every failure is EtcdUnavailable or EtcdError."""
import asyncio

import pytest

from livemig.errors import ConfigError
from livemig.fleet.etcd import (MAX_RESPONSE_BYTES, EtcdClient, EtcdError, EtcdUnavailable,
                                parse_endpoints)


def test_endpoints_parse_and_refuse_garbage():
    assert parse_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2380") == [("127.0.0.1", 2379),
                                                                      ("10.0.0.2", 2380)]
    for bad in ("http://x:1", "etcd://", "etcd://host"):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)


async def _serve(answer: bytes | None):
    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await asyncio.sleep(3600)       # silence
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("answer, error", [
    (None, EtcdUnavailable),                                              # silence
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", EtcdUnavailable),   # huge
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     + f"{MAX_RESPONSE_BYTES + 1:x}\r\n".encode(), EtcdUnavailable),      # huge chunk
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nnot json!!", EtcdUnavailable),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", EtcdUnavailable),     # headers
    (b"garbage\r\n\r\n", EtcdUnavailable),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 37\r\n\r\n"
     b'{"error":"bad","code":3,"message":"x"}'[:37], EtcdError),
])
def test_a_hostile_gateway_costs_bounded_time_and_memory(answer, error):
    async def main():
        server, port = await _serve(answer)
        client = EtcdClient(f"etcd://127.0.0.1:{port}", timeout_s=1.0)
        try:
            with pytest.raises(error):
                await client.get("k")
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
    asyncio.run(main())


def test_nothing_listening_is_unavailable_naming_the_endpoint():
    async def main():
        client = EtcdClient("etcd://127.0.0.1:1", timeout_s=1.0)
        with pytest.raises(EtcdUnavailable, match="127.0.0.1:1"):
            await client.get("k")
        await client.close()
    asyncio.run(main())


def test_a_read_fails_over_across_every_endpoint():
    """During a leader change one member refuses, one answers "no leader"
    (503), one is busy (429) and one is silent: the read goes on to the member
    that answers, within the call's deadline, and stays there."""
    good = (b'HTTP/1.1 200 OK\r\nContent-Length: 51\r\n\r\n'
            b'{"header":{},"kvs":[{"key":"aw==","value":"dg=="}]}')

    def status(code: int, text: str) -> bytes:
        body = b'{"error":"etcdserver: no leader","code":14,"message":"no leader"}'
        return (f"HTTP/1.1 {code} {text}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body)

    async def main():
        servers = [await _serve(a) for a in (status(503, "Service Unavailable"),
                                             status(429, "Too Many Requests"), None, good)]
        ports = [1] + [port for _, port in servers]
        client = EtcdClient("etcd://" + ",".join(f"127.0.0.1:{p}" for p in ports),
                            timeout_s=5.0)
        try:
            kv = await client.get("k")
            assert (kv.key, kv.value) == ("k", b"v")
            assert client.endpoints[client._current][1] == ports[-1]
            assert (await client.get("k")).value == b"v"
        finally:
            await client.close()
            for server, _ in servers:
                server.close()
                await server.wait_closed()
    asyncio.run(main())

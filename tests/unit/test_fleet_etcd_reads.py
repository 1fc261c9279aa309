"""Every read the fleet makes is linearizable: no range request, alone or in
a transaction, asks for a serializable read (which a member cut off from its
peers would answer from its own, possibly stale, copy). A member that cannot
serve one — no leader, or silent — is moved past (test_fleet_etcd_client.py)."""
import asyncio
import json

from livemig.fleet import keys
from livemig.fleet.etcd import EtcdClient, cmp_absent, op_get, op_put

ANSWER = b'{"header":{"revision":"1"},"kvs":[],"succeeded":true,"responses":[]}'


def _serializable(obj) -> bool:
    if isinstance(obj, dict):
        return bool(obj.get("serializable")) or any(_serializable(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_serializable(v) for v in obj)
    return False


def test_no_read_asks_for_a_serializable_answer():
    bodies: list[tuple[str, dict]] = []

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                bodies.append((head.split()[1].decode(),
                               json.loads(await reader.readexactly(length))))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(ANSWER)
                             + ANSWER)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = EtcdClient(f"etcd://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            await client.get(keys.vm_key("a"))
            await client.get_prefix(keys.HOSTS)
            await client.txn([cmp_absent(keys.LEADER)], [op_put(keys.LEADER, "x")],
                             [op_get(keys.LEADER)])
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
    asyncio.run(main())
    assert [p for p, _ in bodies] == ["/v3/kv/range", "/v3/kv/range", "/v3/kv/txn"]
    assert not any(_serializable(b) for _, b in bodies), bodies

"""Channels over socketpairs, loopback TCP, TLS and a fault proxy, under both loops."""
import asyncio
import os
import socket

import pytest
import xxhash

from livemig.aio.channel import channel_pair, open_channel, serve_channels
from livemig.aio.ratelimit import TokenBucket
from livemig.aio.tls import make_test_pki
from livemig.errors import (ConnectionLost, HandshakeRefused, LocalProtocolError,
                            RemoteProtocolError)
from livemig.protocol import (BATCH_POSTCOPY, Accept, ChannelKind, Complete, MigrationOffer,
                              Mode, PageBatch, PageRequest, Ping, Pong, Resumed, RoundEnd,
                              RoundStart, Switchover, Verified, Commit, Welcome, wire)
from livemig.protocol.connection import Connection
from livemig.protocol.events import Hello
from livemig.protocol.state import Role
from support.conversations import pages
from support.faultproxy import FaultProxy
from support.waiting import PATIENCE_S, wait_for_async

SESSION = os.urandom(16)


async def drain_all(ch):
    out = []
    while (ev := await ch.recv()) is not None:
        out.append(ev)
    return out


def test_large_page_batches_arrive_intact_over_socketpair(run):
    async def main():
        src, dst = await channel_pair(ChannelKind.BULK, recv_buffer_bytes=4 << 20)
        batches = [pages(256, seed) for seed in range(12)]   # 12 x 1 MiB
        digests = [xxhash.xxh3_64_intdigest(b) for b in batches]

        async def sender():
            for i, data in enumerate(batches):
                await src.send(PageBatch(i, 256, data))
            await src.close()

        task = asyncio.create_task(sender())
        got = await drain_all(dst)
        await task
        await dst.close()
        assert [xxhash.xxh3_64_intdigest(ev.data) for ev in got] == digests
        assert [ev.round for ev in got] == list(range(12))
        assert dst.frames_received == src.frames_sent == 13  # with the Hello
    run(main())


def test_control_conversation_over_loopback_tcp(run):
    async def main():
        seen = []

        async def destination(ch):
            offer = await ch.recv()
            seen.append(offer)
            await ch.send(Accept())
            while True:
                ev = await ch.recv()
                seen.append(ev)
                if isinstance(ev, Ping):
                    await ch.send(Pong(ev.nonce))
                if isinstance(ev, Switchover):
                    await ch.send(Verified())
                if isinstance(ev, Commit):
                    await ch.send(Resumed())
                if isinstance(ev, Complete):
                    return

        async with await serve_channels("127.0.0.1", 0, destination,
                                        capabilities={"lz4"}) as server:
            ch = await open_channel("127.0.0.1", server.port, kind=ChannelKind.CONTROL,
                                    session_id=SESSION, capabilities={"lz4", "delta"})
            assert ch.conn.capabilities == frozenset({"lz4"})
            await ch.send(MigrationOffer({"vm": "t"}, Mode.PRECOPY, 512))
            assert await ch.recv() == Accept()
            await ch.send(Ping(42))
            assert await ch.recv() == Pong(42)
            await ch.send(RoundStart(0))
            await ch.send(PageBatch(0, 64, pages(64)))
            await ch.send(RoundEnd(0, 64, 64 * 4096))
            await ch.send(Switchover(b"cpu", b"d" * 16))
            assert await ch.recv() == Verified()
            await ch.send(Commit())
            assert await ch.recv() == Resumed()
            await ch.send(Complete())
            assert await ch.recv() is None     # destination closes after Complete
            await ch.close()
            assert server.errors == []
        assert [type(e).__name__ for e in seen] == [
            "MigrationOffer", "Ping", "RoundStart", "PageBatch", "RoundEnd", "Switchover",
            "Commit", "Complete"]
    run(main())


def test_refused_hello_raises_handshake_refused(run):
    async def main():
        async def never(ch):
            raise AssertionError("a refused channel must not reach the handler")

        async with await serve_channels("127.0.0.1", 0, never, required={"postcopy"}) as srv:
            with pytest.raises(HandshakeRefused, match="postcopy") as info:
                await open_channel("127.0.0.1", srv.port, kind=ChannelKind.URGENT,
                                   session_id=SESSION)
            assert info.value.side == "remote" and info.value.phase == "handshake"
    run(main())


def test_local_misuse_raises_before_writing(run):
    async def main():
        src, dst = await channel_pair(ChannelKind.URGENT)
        with pytest.raises(LocalProtocolError):
            await src.send(PageRequest(1, (1,)))   # only the destination asks for pages
        await src.close()
        await dst.close()
    run(main())


def test_backpressure_pauses_reading_and_blocks_sender(run):
    async def main():
        src, dst = await channel_pair(ChannelKind.BULK, recv_buffer_bytes=1 << 20)
        data = pages(64)   # 256 KiB per frame
        sent = 0

        async def sender():
            nonlocal sent
            for i in range(200):   # 50 MiB offered: far beyond every buffer
                await src.send(PageBatch(i, 64, data))
                sent += 1

        task = asyncio.create_task(sender())
        await wait_for_async("the receiver to pause reading", lambda: dst._reading_paused)
        assert not task.done() and sent < 200
        assert dst._queued_bytes <= (1 << 20) + 2 * wire.DEFAULT_MAX_PAYLOAD_BYTES
        got = 0
        while got < 200:
            ev = await dst.recv()
            assert bytes(ev.data[:64]) == bytes(data[:64])
            got += 1
        await task
        await src.close()
        await dst.close()
    run(main())


def test_rate_limiter_caps_channel_throughput_with_injected_clock(run):
    async def main():
        clock = [0.0]

        async def fake_sleep(delay_s):
            clock[0] += delay_s
            await asyncio.sleep(0)

        rate = 10 << 20
        bucket = TokenBucket(rate, 1 << 20, now=lambda: clock[0], sleep=fake_sleep)
        src, dst = await channel_pair(ChannelKind.BULK, rate_limiter=bucket)
        data = pages(256)
        reader = asyncio.create_task(drain_all(dst))
        for i in range(40):
            await src.send(PageBatch(i, 256, data))
        await src.close()
        got = await reader
        await dst.close()
        assert len(got) == 40
        total = bucket.consumed_bytes
        assert total >= 40 * len(data)
        # Never faster than the rate after the initial burst, and not slower
        # than one frame's worth of slack.
        assert clock[0] >= (total - bucket.burst_bytes) / rate
        assert clock[0] <= (total - bucket.burst_bytes) / rate + (len(data) + 64) / rate
    run(main())


def test_a_send_cancelled_in_the_rate_limiter_still_sends_its_frame(run):
    """A frame has its sequence number once encoded: a send cancelled while it
    waits for tokens (a daemon stopping) must not leave a gap in the stream,
    or the peer reads the next frame as "sequence out of order"."""
    async def main():
        gate = asyncio.Event()

        async def gated_sleep(delay_s):
            await gate.wait()

        bucket = TokenBucket(1 << 20, 64 << 10, sleep=gated_sleep)
        src, dst = await channel_pair(ChannelKind.BULK, rate_limiter=bucket)
        data = pages(64)                                  # 256 KiB: past the burst
        reader = asyncio.create_task(drain_all(dst))
        stuck = asyncio.create_task(src.send(PageBatch(0, 64, data)))
        await asyncio.wait_for(_until(lambda: bucket.waited_s > 0), 60)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        gate.set()
        await src.send(PageBatch(1, 64, data))
        await src.close()
        got = await asyncio.wait_for(reader, 60)
        await dst.close()
        assert [ev.round for ev in got] == [0, 1]
    run(main())


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.001)


def test_tls_mutual_authentication(run, tmp_path):
    pki = make_test_pki(tmp_path)

    async def main():
        async def destination(ch):
            ev = await ch.recv()
            await ch.send(Accept() if isinstance(ev, MigrationOffer) else Pong(0))
            await ch.recv()

        async with await serve_channels("127.0.0.1", 0, destination,
                                        ssl=pki.server_context()) as srv:
            ch = await open_channel("127.0.0.1", srv.port, kind=ChannelKind.CONTROL,
                                    session_id=SESSION, ssl=pki.client_context(),
                                    server_hostname="localhost")
            assert ch.get_extra_info("peercert") is not None
            await ch.send(MigrationOffer({}, Mode.POSTCOPY, 1))
            assert await ch.recv() == Accept()
            await ch.close()

            import ssl as _ssl
            no_cert = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
            no_cert.load_verify_locations(cafile=str(pki.ca_cert))
            from livemig.aio.tls import client_context
            rogue = client_context(pki.rogue_cert, pki.rogue_key, pki.ca_cert)
            for ctx in (no_cert, rogue):
                with pytest.raises((ConnectionLost, _ssl.SSLError, ConnectionError)):
                    bad = await open_channel("127.0.0.1", srv.port, kind=ChannelKind.CONTROL,
                                             session_id=SESSION, ssl=ctx,
                                             server_hostname="localhost", timeout_s=PATIENCE_S)
                    await bad.send(MigrationOffer({}, Mode.PRECOPY, 1))
                    await bad.recv()
    run(main())


def _raw_hello_frame(kind=ChannelKind.BULK) -> bytes:
    conn = Connection(Role.SOURCE, kind)
    return b"".join(bytes(b) for b in conn.send(Hello(1, 1, kind, SESSION)))


def test_peer_closing_mid_frame_is_remote_truncation(run):
    async def main():
        errors = []
        done = asyncio.Event()

        async def destination(ch):
            try:
                await ch.recv()
            except RemoteProtocolError as exc:
                errors.append(exc)
                done.set()
                raise

        async with await serve_channels("127.0.0.1", 0, destination) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(_raw_hello_frame())
            await reader.readexactly(wire.HEADER_BYTES)        # the Welcome header
            src = Connection(Role.SOURCE, ChannelKind.BULK)
            src.conversation.state = src.conversation.state.__class__.OPEN
            src._send_sequence = 1
            frame = b"".join(bytes(b) for b in src.send(PageBatch(0, 4, pages(4))))
            writer.write(frame[: len(frame) // 2])
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await asyncio.wait_for(done.wait(), 5)
        assert "truncated" in str(errors[0]) and errors[0].side == "remote"
        assert errors[0].phase == "precopy" and "the destination on its bulk channel" in str(errors[0])
    run(main())


def test_fault_proxy_cut_and_drop_surface_as_connection_lost(run):
    async def main():
        received = []
        failures = []

        async def destination(ch):
            try:
                while (ev := await ch.recv()) is not None:
                    received.append(ev)
            except RemoteProtocolError as exc:
                failures.append(exc)

        async with await serve_channels("127.0.0.1", 0, destination) as srv:
            # 1) cut the source->destination direction in the middle of a frame
            async with FaultProxy("127.0.0.1", srv.port, cut_after_bytes=300_000) as proxy:
                ch = await open_channel("127.0.0.1", proxy.port, kind=ChannelKind.BULK,
                                        session_id=SESSION)
                with pytest.raises(ConnectionLost) as info:
                    for i in range(50):
                        await ch.send(PageBatch(i, 64, pages(64), BATCH_POSTCOPY))
                    await ch.recv()
                assert info.value.channel == "source/bulk"
                assert proxy.cuts == 1
                await ch.close()
            await wait_for_async("the destination to fail on the cut", lambda: failures)
            assert isinstance(failures[0], RemoteProtocolError)

            # 2) drop everything once a request went through, while the
            #    source waits for the next one
            async with FaultProxy("127.0.0.1", srv.port) as proxy:
                ch = await open_channel("127.0.0.1", proxy.port, kind=ChannelKind.URGENT,
                                        session_id=SESSION)
                waiter = asyncio.create_task(ch.recv())
                await proxy.wait_forwarded(wire.HEADER_BYTES, "up")     # the Hello
                await proxy.wait_forwarded(wire.HEADER_BYTES, "down")   # the Welcome
                proxy.drop()
                with pytest.raises(ConnectionLost, match=r"seen by the source on its urgent") as lost:
                    await waiter
                assert lost.value.phase == "precopy"
                await ch.close()
    run(main())


def test_peer_breaking_protocol_gets_an_abort(run):
    async def main():
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        from livemig.aio.channel import Channel, _ChannelProtocol
        dst = Channel(Connection(Role.DESTINATION))
        await loop.create_connection(lambda: _ChannelProtocol(dst), sock=b)
        reader, writer = await asyncio.open_connection(sock=a)
        writer.write(b"LMIG" + bytes(60))     # version 0: a bad frame
        await writer.drain()
        with pytest.raises(RemoteProtocolError, match="version"):
            await dst.recv()
        reply = await reader.read()           # the Abort frame, then EOF
        assert reply[:4] == b"LMIG" and len(reply) >= wire.HEADER_BYTES
        writer.close()
        await writer.wait_closed()
        await dst.close()
    run(main())


def test_welcome_is_required_before_traffic(run):
    async def main():
        src, dst = await channel_pair(ChannelKind.BULK)
        assert src.conn.welcome == Welcome(2, frozenset(), wire.DEFAULT_MAX_PAYLOAD_BYTES)
        await src.close()
        assert await dst.recv() is None
        await dst.close()
    run(main())


def test_fault_proxy_delay_adds_latency(run):
    async def main():
        async def destination(ch):
            while (ev := await ch.recv()) is not None:
                if isinstance(ev, Ping):
                    await ch.send(Pong(ev.nonce))

        async with await serve_channels("127.0.0.1", 0, destination) as srv:
            async with FaultProxy("127.0.0.1", srv.port, delay_s=0.02) as proxy:
                ch = await open_channel("127.0.0.1", proxy.port, kind=ChannelKind.URGENT,
                                        session_id=SESSION)
                loop = asyncio.get_running_loop()
                start = loop.time()
                await ch.send(Ping(5))
                assert await ch.recv() == Pong(5)
                # one delay each way, at least (never asserted from above); libuv
                # timers have 1 ms granularity, so each sleep may end 1 ms early
                assert loop.time() - start >= 0.038
                await ch.close()
    run(main())

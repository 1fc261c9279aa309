"""Mutual TLS on the native bulk streams, under both event loops.

A TLS migration carries its pages on the native streams (TLS 1.3 in the
stream threads) and arrives bit-identical, the stats of both sides saying
"over TLS". Strangers are refused on a stream: a peer whose certificate
another CA signed, a plain-TCP peer behind the TLS stream preamble, a stream
whose certificate is not the session's control peer's; a destination that
answers a stream with another CA's certificate or in the clear fails the
migration with the VM running on at the source. A stream cut mid-round is
resumed as a plain one is, a corrupted record fails the migration cleanly,
the post-copy push runs on TLS streams too, and a peer without the "tls-streams" capability (either side) migrates on
the Python path, saying why.
"""
import asyncio
import socket
import ssl

import pytest

from livemig.aio import tlsstream
from livemig.aio.tls import make_test_pki
from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination import server as server_mod
from livemig.engine.source import session as session_mod
from livemig.engine.source import streams as source_streams
from livemig.engine.source.session import migrate
from livemig.errors import MigrationError, RemoteProtocolError
from livemig.native import postcopy
from livemig.native import tls as native_tls
from livemig.native.streams import probe
from livemig.protocol import ChannelKind, spec
from support.oracle import Recipe, assert_arrival_matches_unmoved, moved_and_checked
from support.relay import LOCAL, Relay, pump
from support.streamsaboteur import StreamSaboteur
from support.waiting import wait_for_async

OK, WHY = probe()
TLS_OK, TLS_WHY = native_tls.probe()
pytestmark = pytest.mark.skipif(not (OK and TLS_OK),
                                reason=f"native TLS streams: {WHY or TLS_WHY}")
# Random memory, written while it moves: every page RAW, later ones BLOCK.
RECIPE = Recipe("32MiB", 2, "uniform", seed=51, dirty_rate="24MiB/s", fill_seed=5)
IDLE = Recipe("16MiB", 2, "idle", seed=52, fill_seed=6)
PUSHED = Recipe("16MiB", 2, "uniform", seed=53, dirty_rate="16MiB/s", fill_seed=7)
QUICK = dict(handshake_timeout_s=10, switchover_timeout_s=10, ack_timeout_s=10)
TLS_PATH = "native-streams ×2 over TLS"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _server(pki, **config):
    return server_mod.MigrationServer(LOCAL, 0, ssl=pki.server_context(),
                                      config=MigrationConfig(**(QUICK | config)))


async def _migrate(vm, pki, port, config: MigrationConfig, **kw):
    return await migrate(vm, LOCAL, port, config=config, name="s", ssl=pki.client_context(),
                         server_hostname="localhost", **kw)


async def _moved_checked(recipe: Recipe, pki, *, server, port=None, **config):
    """Migrate a fresh VM of ``recipe`` under TLS; check it against its twin."""
    cfg = MigrationConfig(**({"streams": 2} | QUICK | config))
    return await moved_and_checked(
        recipe, server, lambda vm: _migrate(vm, pki, port or server.port, cfg), timeout_s=30)


def test_a_tls_migration_runs_on_the_native_streams_and_arrives_whole(run, pki):
    async def main():
        async with _server(pki) as server:
            src, dst = await _moved_checked(RECIPE, pki, server=server)
            assert not server.errors, server.errors
        assert src.data_path == dst.data_path == TLS_PATH
        assert src.pages_sent == dst.pages_sent and src.bytes_sent == dst.bytes_sent
        assert src.pages_by_encoding["raw"] > 0 and src.stream_cpu_s > 0 < dst.stream_cpu_s
        assert src.pages_by_encoding == dst.pages_by_encoding
    run(main())


async def _stranger_stream(port: int, ctx: native_tls.TlsContext):
    return await tlsstream.open_tls_stream(LOCAL, port, tls=ctx, peer_cert=None,
                                           kind=ChannelKind.BULK, session_id=bytes(16),
                                           capabilities={spec.STREAMS_CAPABILITY},
                                           timeout_s=5, what="stranger's stream")


async def _server_error(server, *words) -> str:
    def seen():
        return next((str(e) for e in server.errors
                     if all(w in str(e) for w in words)), None)
    await wait_for_async(f"a server error naming {words}", lambda: seen() is not None)
    return seen()


def test_a_stream_with_a_certificate_from_another_ca_is_refused(run, pki):
    rogue = native_tls.TlsContext(pki.rogue_cert, pki.rogue_key, pki.ca_cert, server=False)

    async def main():
        async with _server(pki) as server:
            with pytest.raises(RemoteProtocolError):
                await _stranger_stream(server.port, rogue)
            text = await _server_error(server, "TLS bulk stream from", "certificate")
            assert "refused" in text, text
            # The daemon is unharmed: the next migration moves on its streams.
            src, _ = await _moved_checked(IDLE, pki, server=server)
            assert src.data_path == TLS_PATH
    try:
        run(main())
    finally:
        rogue.close()


def test_a_plain_tcp_peer_behind_the_stream_preamble_is_refused(run, pki):
    async def main():
        async with _server(pki) as server:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (LOCAL, server.port))
                # The preamble, then a livemig frame in the clear.
                await loop.sock_sendall(sock, spec.TLS_STREAM_PREAMBLE + b"LMIG" + bytes(60))
                while True:   # whatever alert comes back, then the end
                    try:
                        if not await asyncio.wait_for(loop.sock_recv(sock, 4096), 10):
                            break
                    except ConnectionResetError:
                        break
            finally:
                sock.close()
            text = await _server_error(server, "TLS bulk stream from", "does not speak TLS")
            assert server.completed.empty()
            return text
    run(main())


def test_a_stream_presenting_another_certificate_than_its_control_is_refused(run, pki,
                                                                            monkeypatch):
    # The control channel presents the client certificate; the streams present
    # the server's (the same CA signed both, with clientAuth): refused.
    real = source_streams.StreamTls.__init__

    def other_cert(self, tls, control):
        real(self, tls, control)
        self.context = native_tls.TlsContext(pki.server_cert, pki.server_key, pki.ca_cert,
                                             server=False)
    monkeypatch.setattr(source_streams.StreamTls, "__init__", other_cert)

    async def main():
        vm = IDLE.build()
        try:
            vm.start()
            async with _server(pki) as server:
                with pytest.raises(MigrationError) as info:
                    await _migrate(vm, pki, server.port, MigrationConfig(streams=2, **QUICK))
                err = info.value
                assert "not the one its session's control channel presented" in str(err), err
                assert err.source_resumed and vm.running and server.completed.empty()
        finally:
            vm.close()
    run(main())


class HostileStreamRelay(Relay):
    """Relays every connection to the real destination, except a native TLS
    stream's, which it answers itself: with a certificate another CA signed
    (``rogue``), or in the clear (``plain``)."""

    def __init__(self, target_port: int, answer: str, pki):
        super().__init__()
        self.target_port = target_port
        self.answer = answer
        self.pki = pki
        self.answered = asyncio.Event()

    async def _accept(self, reader, writer):
        self._writers.append(writer)
        try:
            first = await reader.readexactly(len(spec.TLS_STREAM_PREAMBLE))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()
            return
        if first == spec.TLS_STREAM_PREAMBLE:
            self.answered.set()
            if self.answer == "plain":
                writer.write(b"LMIG" + bytes(60))   # a frame in the clear
                await writer.drain()
            else:
                await self._rogue_handshake(reader, writer)
            writer.transport.abort()
            return
        s_reader, s_writer = await asyncio.open_connection(LOCAL, self.target_port)
        self._writers.append(s_writer)
        s_writer.write(first)
        self._spawn(pump(reader, s_writer, (s_writer,)))
        self._spawn(pump(s_reader, writer, (writer,)))

    async def _rogue_handshake(self, reader, writer) -> None:
        """Answer as a TLS server with the rogue certificate, by hand over
        memory BIOs: the client's first flight may already sit in the
        reader's buffer behind the preamble, where start_tls would never
        see it (the handshake then hung until the client's timeout)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.rogue_cert, self.pki.rogue_key)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
        try:
            while True:
                try:
                    tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                if outgoing.pending:
                    writer.write(outgoing.read())
                    await writer.drain()
                if done:
                    return
                data = await reader.read(1 << 16)
                if not data:
                    return
                incoming.write(data)
        except (ssl.SSLError, ConnectionError, OSError):
            pass


@pytest.mark.parametrize("answer, words", [("rogue", "certificate was refused"),
                                           ("plain", "TLS handshake (connecting)")])
def test_a_destination_stream_that_is_not_its_tls_fails_with_the_vm_at_the_source(
        run, pki, answer, words):
    async def main():
        vm = IDLE.build()
        try:
            vm.start()
            async with _server(pki) as server, \
                    HostileStreamRelay(server.port, answer, pki) as relay:
                with pytest.raises(MigrationError) as info:
                    await _migrate(vm, pki, relay.port, MigrationConfig(streams=2, **QUICK))
                assert relay.answered.is_set()
                err = info.value
                assert "bulk stream 1 (TLS)" in str(err) and words in str(err), err
                assert err.source_resumed and vm.running and server.completed.empty()
                assert "runs on at the source" in str(err) or "source" in str(err), err
                # Straight to the destination, the same VM moves on TLS streams.
                stats = await _migrate(vm, pki, server.port,
                                       MigrationConfig(streams=2, **QUICK))
                assert stats.status == "completed" and stats.data_path == TLS_PATH
                await assert_arrival_matches_unmoved(server, IDLE)
        finally:
            vm.close()
    run(main())


def test_a_tls_stream_cut_mid_round_is_resumed_as_a_plain_one_is(run, pki):
    async def main():
        async with _server(pki, idle_timeout_s=3.0, precopy_resume_timeout_s=60.0) as server:
            # Connection 3: the second TLS stream, 2 MiB into round 0.
            async with StreamSaboteur(server.port, victim=3, after_bytes=2 << 20,
                                      action="cut") as relay:
                src, dst = await _moved_checked(IDLE, pki, server=server, port=relay.port,
                                                precopy_resume_timeout_s=60.0)
                assert relay.harmed.is_set()
        assert src.precopy_resumes == 1 == dst.precopy_resumes
        assert src.data_path == dst.data_path == TLS_PATH
        assert src.resent_pages + src.resend_avoided_pages == (16 << 20) // 4096
    run(main())


def test_a_corrupted_tls_record_fails_the_migration_cleanly(run, pki):
    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            async with _server(pki) as server:
                async with StreamSaboteur(server.port, victim=3, after_bytes=4 << 20,
                                          action="corrupt") as relay:
                    with pytest.raises(MigrationError) as info:
                        await _migrate(vm, pki, relay.port,
                                       MigrationConfig(streams=2, precopy_resume_timeout_s=0,
                                                       **QUICK))
                    assert relay.harmed.is_set()
                err = info.value
                assert err.source_resumed and err.phase == "precopy", err
                assert "bulk stream" in str(err), err
                assert vm.running and server.completed.empty()
        finally:
            vm.close()
    run(main())


@pytest.mark.parametrize("old_side", ["source", "destination"])
def test_a_peer_without_tls_streams_migrates_on_the_python_path(run, pki, monkeypatch,
                                                                old_side):
    if old_side == "destination":
        # A listener that accepts no native TLS streams grants none under TLS.
        monkeypatch.setattr(server_mod, "stream_tls_context",
                            lambda config, tls: (None, "an older livemig"))
    else:
        # The source offers "streams" but not "tls-streams": its streams would
        # not speak TLS, so the destination grants neither.
        real = session_mod.stream_capabilities
        monkeypatch.setattr(session_mod, "stream_capabilities",
                            lambda *a, **kw: real(*a, **kw) - {spec.TLS_STREAMS_CAPABILITY})

    async def main():
        async with _server(pki) as server:
            src, dst = await _moved_checked(IDLE, pki, server=server)
        assert src.data_path == ("python: the destination does not run native streams under "
                                 "TLS (an older livemig, or it cannot here)")
        assert dst.data_path.startswith("python:")
    run(main())


@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_the_post_copy_push_runs_on_tls_streams(run, pki, mode):
    if not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
    hybrid = ({"hybrid_postcopy_after_rounds": 1, "max_downtime_ms": 0.001} if mode == "hybrid"
              else {})

    async def main():
        async with _server(pki) as server:
            return await _moved_checked(PUSHED, pki, server=server, mode=mode,
                                        codec=CodecConfig().without("lz4"), **hybrid)
    src, dst = run(main())
    assert src.status == "completed" and dst.status == "completed"
    assert src.push_path == dst.push_path == TLS_PATH
    assert 0 < dst.pages_pushed <= src.pages_pushed
    if mode == "hybrid":
        assert src.data_path == dst.data_path == TLS_PATH


def test_a_cut_tls_push_stream_is_a_break_to_recover_from(run, pki):
    if not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")

    async def main():
        async with _server(pki, postcopy_recovery_timeout_s=60.0) as server:
            # Connection 4: the first push stream (after control, urgent, bulk),
            # 1 MiB into the push; the cap keeps the push going that long.
            async with StreamSaboteur(server.port, victim=4, after_bytes=1 << 20,
                                      action="cut") as relay:
                out = await _moved_checked(PUSHED, pki, server=server, port=relay.port,
                                           mode="postcopy", codec=CodecConfig().without("lz4"),
                                           max_bandwidth_bps=16 << 20,
                                           postcopy_recovery_timeout_s=60.0)
                assert relay.harmed.is_set()
            return out
    src, dst = run(main())
    assert src.recoveries >= 1 and dst.recoveries >= 1
    assert src.push_path == TLS_PATH

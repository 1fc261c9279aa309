"""Migrations over mutual TLS, and the daemon's refusal to listen in the clear."""
import ssl

import pytest

from livemig.aio.tls import client_context, make_test_pki
from livemig.service.daemon import Daemon, TlsFiles
from livemig.engine.destination.server import MigrationServer
from livemig.errors import ConfigError, MigrationError
from livemig.engine.source.session import migrate
from support.oracle import Recipe, assert_arrival_matches_unmoved

LOCAL = "127.0.0.1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=31, dirty_rate="24MiB/s")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "192.0.2.7:7400", "[::]:0"])
def test_daemon_refuses_a_non_loopback_listener_without_tls(tmp_path, listen):
    with pytest.raises(ConfigError, match="without TLS"):
        Daemon(listen=listen, control_path=str(tmp_path / "c.sock"))


def test_daemon_accepts_non_loopback_with_tls_or_explicit_insecure(tmp_path, pki):
    tls = TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    assert Daemon(listen="0.0.0.0:0", control_path=str(tmp_path / "a.sock"), tls=tls).tls
    assert Daemon(listen="0.0.0.0:0", control_path=str(tmp_path / "b.sock"),
                  insecure=True).insecure


def _no_cert_client(ca) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


def test_mutual_tls_migration_works_and_strangers_are_refused(run, pki):
    strangers = {
        "rogue client cert": client_context(pki.rogue_cert, pki.rogue_key, pki.ca_cert),
        "no client cert": _no_cert_client(pki.ca_cert),
        "server from an unknown CA": client_context(pki.client_cert, pki.client_key,
                                                    pki.rogue_cert.parent / "rogue-ca.crt"),
        "no TLS at all": None,
    }

    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0, ssl=pki.server_context()) as server:
                for who, ctx in strangers.items():
                    with pytest.raises(MigrationError) as info:
                        await migrate(vm, LOCAL, server.port, ssl=ctx,
                                      server_hostname="localhost")
                    assert info.value.phase == "handshake", who
                    assert info.value.source_resumed and vm.running, who
                assert server.completed.empty()
                stats = await migrate(vm, LOCAL, server.port, ssl=pki.client_context(),
                                      server_hostname="localhost")
                assert stats.status == "completed"
                await assert_arrival_matches_unmoved(server, RECIPE)
        finally:
            vm.close()
    run(main())


def test_postcopy_over_mutual_tls_serves_faults_on_the_event_loop(run, pki):
    """The native urgent threads speak plain TCP: over TLS both sides keep the
    urgent channel on the event loop, say so, and the VM still arrives whole."""
    from livemig.config import MigrationConfig

    async def main():
        vm = RECIPE.build()
        try:
            vm.start()
            async with MigrationServer(LOCAL, 0, ssl=pki.server_context()) as server:
                stats = await migrate(vm, LOCAL, server.port, ssl=pki.client_context(),
                                      server_hostname="localhost",
                                      config=MigrationConfig(mode="postcopy"))
                assert stats.status == "completed"
                assert stats.fault_path == "python" and "TLS" in stats.fault_path_reason
                await assert_arrival_matches_unmoved(server, RECIPE)
        finally:
            vm.close()
    run(main())

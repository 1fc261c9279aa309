"""Daemons under adversity and over mutual TLS: separate processes, real signals.

The destination daemon is SIGKILLed in the middle of pre-copy; daemons with
``--tls-*`` migrate to each other and refuse a daemon without TLS (both
ways). The source daemon lives on, its VM runs on and still matches a twin
that never moved, and it migrates the VM elsewhere afterwards.
"""
import signal

import pytest

from support.daemons import EXIT_FAILED, DaemonProcess
from support.daemons import assert_daemon_vm_matches_unmoved as _assert_matches_unmoved
from support.daemons import start_vm as _start
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for


def test_destination_daemon_killed_mid_round(tmp_path):
    """The peer vanishes for real (SIGKILL) in the middle of pre-copy."""
    a = DaemonProcess(tmp_path, "src", "auto")
    b = DaemonProcess(tmp_path, "dst", "auto")
    try:
        recipe = Recipe("64MiB", 2, "memtest", seed=9, dirty_rate="64MiB/s")
        _start(a, "victim", recipe)
        # dirtying far faster than a 1 MiB/s link carries, with a 1 ms downtime
        # limit and no round limit: the migration cannot end before the kill
        rec = a.cli_json("migrate", "victim", "--to", b.address, "--max-bandwidth", "1MiB/s",
                         "--downtime-ms", "1", "--max-rounds", "100000", "--no-wait")
        wait_for("the migration to send 256 KiB",
                 lambda: (a.client.call("status", id=rec["id"]).get("stats") or {}).get(
                     "bytes_sent", 0) >= 256 << 10)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        final = a.client.call("migration.wait", id=rec["id"], timeout_s=PATIENCE_S)
        assert final["status"] == "failed", final
        assert "resumed on the source" in final["error"], final["error"]
        assert final["stats"]["status"] == "failed" and not final["stats"]["converged"]
        assert a.alive()
        victim = a.cli_json("vm", "list")[0]
        assert victim["name"] == "victim" and victim["running"] and not victim["migrating"]
        c = DaemonProcess(tmp_path, "dst2", "auto")
        try:
            assert a.cli_json("migrate", "victim", "--to", c.address)["status"] == "completed"
            _assert_matches_unmoved(c, "victim", recipe)
        finally:
            c.close()
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_daemons_with_mutual_tls_migrate_and_refuse_a_clear_peer(tmp_path, loop):
    from livemig.aio.tls import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    tls = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-ca", pki.ca_cert]
    a = DaemonProcess(tmp_path, "tls-a", loop, *tls)
    b = DaemonProcess(tmp_path, "tls-b", loop, *tls)
    clear = DaemonProcess(tmp_path, "clear", loop)
    try:
        assert a.info["tls"] and not clear.info["tls"]
        recipe = Recipe("16MiB", 2, "memtest", seed=12, dirty_rate="16MiB/s")
        _start(a, "secret", recipe)
        refused = a.cli_json("migrate", "secret", "--to", clear.address, check=EXIT_FAILED)
        assert refused["status"] == "failed" and "handshake" in refused["error"]
        _start(clear, "intruder", recipe)
        assert clear.cli_json("migrate", "intruder", "--to", b.address,
                              check=EXIT_FAILED)["status"] == "failed"
        assert all(v["name"] != "intruder" for v in b.cli_json("vm", "list"))
        assert a.cli_json("migrate", "secret", "--to", b.address)["status"] == "completed"
        _assert_matches_unmoved(b, "secret", recipe)
    finally:
        for d in (clear, b, a):
            d.close()

"""The daemon and the ``livemig`` CLI as users run them: separate processes.

Two daemons per event-loop kind listen on loopback; every CLI call is a real
``python -m livemig`` subprocess whose exit code and ``--json`` output are
checked. A migrated VM is compared with a twin that never moved, through the
daemon's ``vm.run_to`` and ``vm.inspect`` control commands.
"""
import contextlib
import os
import socket

import pytest

from support.daemons import (EXIT_FAILED, EXIT_NO_DAEMON, EXIT_USAGE, daemon_pair, livemig,
                             livemig_json)
from support.daemons import assert_daemon_vm_matches_unmoved as _assert_matches_unmoved
from support.daemons import start_vm as _start
from support.oracle import Recipe


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def daemons(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"daemons-{request.param}")
    with daemon_pair(tmp, request.param) as pair:
        yield pair


def test_vm_start_list_stop_and_their_exit_codes(daemons):
    a, _ = daemons
    recipe = Recipe("16MiB", 2, "hotset", seed=1, dirty_rate="8MiB/s")
    started = _start(a, "life", recipe)
    assert started["name"] == "life" and started["memory_bytes"] == 16 << 20
    assert started["running"] and started["origin"] == "local"
    listed = a.cli_json("vm", "list")
    assert [v["name"] for v in listed if v["name"] == "life"] == ["life"]
    human = a.cli("vm", "list").stdout
    assert "life" in human and "hotset" in human
    assert "already exists" in _start_fails(a, "life", recipe).stderr
    assert a.cli_json("vm", "stop", "life") == {"name": "life", "stopped": True}
    assert "no VM named" in a.cli("vm", "stop", "life", check=EXIT_FAILED).stderr
    assert all(v["name"] != "life" for v in a.cli_json("vm", "list"))


def _start_fails(daemon, name, recipe):
    return daemon.cli("vm", "start", name, "--memory", recipe.memory, "--workload",
                      recipe.workload, check=EXIT_FAILED)


def test_migrate_there_and_back_then_identical_to_an_unmoved_vm(daemons):
    a, b = daemons
    recipe = Recipe("32MiB", 2, "memtest", seed=7, dirty_rate="32MiB/s")
    _start(a, "trip", recipe)
    there = a.cli_json("migrate", "trip", "--to", b.address, "--downtime-ms", "100")
    assert there["status"] == "completed" and there["direction"] == "outgoing"
    stats = there["stats"]
    assert stats["converged"] and stats["downtime_ms"] > 0 and stats["nrounds"] >= 2
    assert all(v["name"] != "trip" for v in a.cli_json("vm", "list"))
    arrived = next(v for v in b.cli_json("vm", "list") if v["name"] == "trip")
    assert arrived["running"] and arrived["origin"].startswith("migrated from")
    status = a.cli_json("status")
    assert any(m["id"] == there["id"] and m["status"] == "completed"
               for m in status["migrations"])
    one = a.cli_json("status", there["id"])
    assert one["id"] == there["id"] and one["stats"]["bytes_sent"] == stats["bytes_sent"]
    incoming = [m for m in b.cli_json("status")["migrations"] if m["vm"] == "trip"]
    assert incoming and incoming[-1]["direction"] == "incoming"
    assert "completed" in a.cli("status", there["id"]).stdout
    back = b.cli_json("migrate", "trip", "--to", a.address, "--max-bandwidth", "1Gbit/s")
    assert back["status"] == "completed"
    _assert_matches_unmoved(a, "trip", recipe)
    a.cli("vm", "stop", "trip")


def test_failed_migration_exit_code_and_the_vm_runs_on(daemons):
    a, b = daemons
    recipe = Recipe("16MiB", 2, "uniform", seed=3, dirty_rate="16MiB/s")
    _start(a, "stay", recipe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"   # bound, not listening: refused
        rec = a.cli_json("migrate", "stay", "--to", dead, check=EXIT_FAILED)
    assert rec["status"] == "failed" and rec["error"]
    assert a.cli_json("vm", "list")[0]["running"]
    assert "no VM named" in a.cli("migrate", "ghost", "--to", b.address,
                                  check=EXIT_FAILED).stderr
    assert "no migration with id" in a.cli("status", "9999", check=EXIT_FAILED).stderr
    # the daemon lives on and migrates the same VM fine
    assert a.cli_json("migrate", "stay", "--to", b.address)["status"] == "completed"
    _assert_matches_unmoved(b, "stay", recipe)
    b.cli("vm", "stop", "stay")


def test_usage_and_config_errors_exit_2_and_no_daemon_exits_3(tmp_path):
    assert "fast" in livemig("migrate", "x", "--to", "127.0.0.1:1", "--max-bandwidth", "fast",
                             check=EXIT_USAGE).stderr
    livemig("migrate", "x", check=EXIT_USAGE)                     # --to missing
    livemig("vm", "start", "x", "--workload", "bogus", check=EXIT_USAGE)
    livemig("daemon", "--listen", "0.0.0.0:0", "--control", tmp_path / "d.sock",
            check=EXIT_USAGE)
    livemig("daemon", "--listen", "127.0.0.1:0", "--tls-cert", "x.pem", check=EXIT_USAGE)
    gone = livemig("vm", "list", "--control", tmp_path / "none.sock", check=EXIT_NO_DAEMON)
    assert "no livemig daemon" in gone.stderr
    livemig("status", "--control", tmp_path / "none.sock", "--json", check=EXIT_NO_DAEMON)


def test_probe_json_parses():
    report = livemig_json("probe")
    assert report["page_size"] == 4096 and "userfaultfd" in report
    ur = report["urgent"]
    assert isinstance(ur["native"], bool) and isinstance(ur["realtime"], bool)
    assert ur["realtime_reason"] and (ur["native"] or ur["reason"])
    assert "fault service" in livemig("probe").stdout


def test_hostile_peers_never_hurt_a_daemon_or_its_vms(daemons):
    a, _ = daemons
    recipe = Recipe("16MiB", 2, "memtest", seed=5, dirty_rate="8MiB/s")
    _start(a, "calm", recipe)
    for payload in (os.urandom(1 << 16), b"LMIG" + os.urandom(3000), b"\x00" * 64, b""):
        with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
            with contextlib.suppress(OSError):
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.recv(1 << 16)
    assert a.alive()
    calm = next(v for v in a.cli_json("vm", "list") if v["name"] == "calm")
    assert calm["running"]
    _assert_matches_unmoved(a, "calm", recipe)
    a.cli("vm", "stop", "calm")

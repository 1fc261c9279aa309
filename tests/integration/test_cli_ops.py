"""Operating migrations from the CLI: progress, cancel, runtime limits,
timeout, history, snapshots and the CLI's conventions (exit codes, JSON
errors, flags named in messages, no tracebacks).

Daemons are real processes; a migration is kept running long enough to be
acted on by a low bandwidth cap, and every wait is for a condition, with a
generous deadline, never for an amount of time.
"""
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from support.daemons import (ENV, EXIT_FAILED, EXIT_NO_DAEMON, EXIT_OK, EXIT_USAGE,
                             DaemonProcess, daemon_pair, livemig)
from support.ports import listen_port

DEADLINE_S = 120
# A fresh guest is mostly zero pages and re-sent pages travel as deltas, so
# most guests move in a blink whatever the cap. The rewrite workload fills
# whole pages with random words (nothing to compress): at a low cap a round
# then lasts tens of seconds, time to act on it.
SLOW_CAP = "64KiB/s"
SLOW_VM = ("--memory", "64MiB", "--vcpus", "1", "--workload", "rewrite", "--dirty-rate",
           "16MiB/s")


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    with daemon_pair(tmp, "asyncio") as pair:
        yield pair


def _wait_for(what, predicate, deadline_s=DEADLINE_S):
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start_slow(a, b, name, *extra):
    a.cli("vm", "start", name, *SLOW_VM)
    return a.cli_json("migrate", name, "--to", b.address, "--max-bandwidth", SLOW_CAP,
                      "--no-wait", *extra)


def _vm_names(daemon):
    return {v["name"] for v in daemon.client.call("vm.list")}


def test_progress_has_real_values_while_active_then_cancel_resumes_at_source(daemons):
    a, b = daemons
    started = _start_slow(a, b, "cancelme")
    live = _wait_for("progress with bytes moving", lambda: (
        lambda r: r if (r.get("progress") or {}).get("transferred_bytes") else None)(
            a.cli_json("status", "cancelme")))
    p = live["progress"]
    assert live["id"] == started["id"] and live["status"] == "active"
    assert 0 <= p["remaining_bytes"] <= 64 << 20 and 0 <= p["percent"] <= 100
    assert p["transferred_bytes"] > 0 and p["throughput_bps"] > 0 and p["elapsed_s"] > 0
    # the dirty rate is known once a round has ended; owed pages only in post-copy
    assert (p["dirty_rate_bps"] is None) if p["round"] == 0 else (p["dirty_rate_bps"] > 0)
    assert p["owed_pages"] is None
    assert live["stats"]["total_time_ms"] > 0 and live["stats"]["throughput_bps"] > 0
    done = a.cli_json("cancel", "cancelme")
    assert done["status"] == "cancelled" and "runs on at the source" in done["error"]
    assert "cancelme" in _vm_names(a) and a.client.call("vm.list")[0]["running"]
    _wait_for("the destination to free it", lambda: any(
        m["vm"] == "cancelme" and m["status"] in ("failed", "cancelled")
        for m in b.client.call("status")["migrations"]))
    assert "cancelme" not in _vm_names(b)
    again = a.cli("cancel", "cancelme", check=EXIT_FAILED)
    assert "only an active outgoing migration" in again.stderr
    a.cli("vm", "stop", "cancelme")


def test_migrate_set_lifts_the_cap_and_the_migration_completes(daemons):
    a, b = daemons
    started = _start_slow(a, b, "speedup")
    changed = a.cli_json("migrate-set", "speedup", "--unlimited-bandwidth", "--downtime-ms",
                         "500")
    assert changed["id"] == started["id"]
    end = a.client.call("migration.wait", id=started["id"], timeout_s=DEADLINE_S)
    assert end["status"] == "completed", end
    assert "speedup" in _vm_names(b)
    b.cli("vm", "stop", "speedup")


def test_timeout_cancels_a_migration_that_runs_too_long(daemons):
    a, b = daemons
    started = _start_slow(a, b, "slowpoke", "--timeout", "0.5")
    end = a.client.call("migration.wait", id=started["id"], timeout_s=DEADLINE_S)
    assert end["status"] == "cancelled" and "slowpoke" in _vm_names(a)
    a.cli("vm", "stop", "slowpoke")


def test_timeout_switches_to_postcopy_and_the_cap_can_be_lifted_there(daemons):
    a, b = daemons
    # The switch happens when the round in flight ends: a cap under the dirty
    # rate keeps rounds a few seconds long, and pre-copy from converging.
    a.cli("vm", "start", "late", *SLOW_VM)
    started = a.cli_json("migrate", "late", "--to", b.address, "--max-bandwidth", "4MiB/s",
                         "--no-wait", "--timeout", "0.5", "--timeout-action", "postcopy")
    _wait_for("post-copy", lambda: a.cli_json("status", "late")["status"] == "postcopy-active")
    refused = a.cli("cancel", "late", check=EXIT_FAILED)
    assert "cannot be taken back" in refused.stderr
    a.cli_json("migrate-set", "late", "--unlimited-bandwidth")
    end = a.client.call("migration.wait", id=started["id"], timeout_s=DEADLINE_S)
    assert end["status"] == "completed" and end["stats"]["postcopy"]["duration_ms"] > 0
    assert "late" in _vm_names(b) and "late" not in _vm_names(a)
    b.cli("vm", "stop", "late")


def test_ctrl_c_on_an_attached_migrate_cancels_it(daemons):
    a, b = daemons
    a.cli("vm", "start", "ctrlc", *SLOW_VM)
    # A shell runs background jobs with SIGINT ignored, and Python keeps an
    # inherited "ignore"; a terminal's Ctrl-C reaches a process that has the
    # default disposition, so give the child that whatever ran this suite.
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "migrate", "ctrlc", "--to",
                             b.address, "--max-bandwidth", SLOW_CAP, "--control", a.control],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for("the migration to be active", lambda: any(
        m["vm"] == "ctrlc" and m["status"] == "active"
        for m in a.client.call("status")["migrations"]))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == EXIT_FAILED and "cancelled" in out and "Traceback" not in err
    assert "ctrlc" in _vm_names(a)
    a.cli("vm", "stop", "ctrlc")


def test_progress_bar_on_a_terminal(daemons):
    a, b = daemons
    a.cli("vm", "start", "onatty", *SLOW_VM)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "migrate", "onatty", "--to",
                             b.address, "--max-bandwidth", SLOW_CAP, "--timeout", "10",
                             "--control", a.control],
                            env=ENV, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], DEADLINE_S)
        assert ready, "no output from migrate on the terminal"
        try:
            chunk = os.read(master, 65536)
        except OSError:     # EIO: the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait(timeout=DEADLINE_S) == EXIT_FAILED     # the timeout cancelled it
    text = shown.decode(errors="replace")
    assert "[" in text and "%" in text and "onatty #" in text and "round " in text
    assert "\x1b[1F" in text and "cancelled" in text      # redrawn in place
    a.cli("vm", "stop", "onatty")


def test_history_names_both_ends_and_survives_a_restart(tmp_path):
    port = listen_port()
    listen = ("--listen", f"127.0.0.1:{port}")
    a = DaemonProcess(tmp_path, "ha", "asyncio", *listen)
    b = DaemonProcess(tmp_path, "hb", "asyncio")
    try:
        a.cli("vm", "start", "hist", "--memory", "16MiB", "--dirty-rate", "8MiB/s")
        a.cli_json("migrate", "hist", "--to", b.address, "--mode", "postcopy")
        a.close()
        a = DaemonProcess(tmp_path, "ha", "asyncio", *listen)
        rows = a.cli_json("history")
        row = next(r for r in rows if r["vm"] == "hist")
        assert row["direction"] == "outgoing" and row["peer"] == b.address
        assert row["mode"] == "postcopy" and row["status"] == "completed"
        assert row["converged"] is None and row["rounds"] is None
        assert row["host"] == f"127.0.0.1:{port}" and row["finished_at"].endswith("Z")
        incoming = next(r for r in b.cli_json("history") if r["vm"] == "hist")
        assert incoming["direction"] == "incoming" and incoming["converged"] is None
        assert incoming["peer"] == f"127.0.0.1:{port}"          # the source daemon, by name
        assert "n/a" in a.cli("history").stdout
    finally:
        b.close()
        a.close()


def test_snapshot_save_and_restore(daemons, tmp_path):
    a, _ = daemons
    a.cli("vm", "start", "snap", "--memory", "16MiB", "--dirty-rate", "8MiB/s")
    saved = a.cli_json("vm", "save", "snap", str(tmp_path / "snap.lmvm"))
    assert saved["bytes"] > 0
    restored = a.cli_json("vm", "restore", str(tmp_path / "snap.lmvm"), "--name", "snap2")
    assert restored["name"] == "snap2" and restored["running"]
    for name in ("snap", "snap2"):
        a.cli("vm", "stop", name)


@pytest.mark.parametrize("argv, flag", [
    (("vm", "start", "x", "--dirty-rate", "64MiB"), "--dirty-rate"),
    (("migrate", "x", "--to", "127.0.0.1:1", "--downtime-ms", "-5"), "--downtime-ms"),
    (("migrate", "x", "--to", "127.0.0.1:1", "--timeout", "0"), "--timeout"),
])
def test_validation_names_the_flag(argv, flag):
    proc = livemig(*argv, check=EXIT_USAGE)
    assert flag in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_json_errors_and_empty_names(daemons, tmp_path):
    a, _ = daemons
    assert livemig("--version").stdout.startswith("livemig ")
    missing = livemig("status", "--json", "--control", str(tmp_path / "none.sock"),
                      check=EXIT_NO_DAEMON)
    error = json.loads(missing.stdout)
    assert error["ok"] is False and error["error"]["type"] == "NoDaemon"
    empty = a.cli("vm", "start", "", check=EXIT_USAGE)
    assert "bad VM name" in empty.stderr and "" not in _vm_names(a)


def test_daemon_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = livemig("daemon", "--listen", f"127.0.0.1:{port}", "--control",
                       str(tmp_path / "c.sock"), "--state-dir", str(tmp_path), check=4)
    assert "Traceback" not in proc.stderr and "address already in use" in proc.stderr.lower()


def test_missing_tls_file_is_named(tmp_path):
    proc = livemig("daemon", "--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "c.pem"),
                   "--tls-key", str(tmp_path / "k.pem"), "--tls-ca", str(tmp_path / "ca.pem"),
                   check=EXIT_USAGE)
    assert "--tls-cert" in proc.stderr and "c.pem" in proc.stderr


def test_broken_pipe_is_silent():
    # The reader is gone before livemig writes a byte: its first write fails
    # with EPIPE, every time.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "livemig", "probe"], env=ENV,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_OK and proc.stderr == ""


def test_event_log_and_metrics(tmp_path):
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    log_path = tmp_path / "events.jsonl"
    a = DaemonProcess(tmp_path, "la", "asyncio", "--log-file", str(log_path), "--log-json",
                      "--metrics", f"127.0.0.1:{metrics_port}")
    b = DaemonProcess(tmp_path, "lb", "asyncio")
    try:
        a.cli("vm", "start", "logged", "--memory", "16MiB")
        a.cli_json("migrate", "logged", "--to", b.address)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=DEADLINE_S) as reply:
            text = reply.read().decode()
        assert 'livemig_migrations{direction="outgoing",status="completed"} 1' in text
        assert "livemig_vms 0" in text
        events = _wait_for("the end of the migration in the log", lambda: (
            lambda rows: rows if any(r.get("event") == "end" for r in rows) else None)(
                [json.loads(line) for line in log_path.read_text().splitlines()]))
        kinds = {r.get("event") for r in events if r.get("vm") == "logged"}
        assert {"vm-start", "start", "status", "decision", "end"} <= kinds
        assert all(r["level"] in ("debug", "info", "warning", "error") for r in events)
    finally:
        b.close()
        a.close()


def test_daemon_config_file_is_read_and_flags_win(tmp_path):
    event_log = tmp_path / "events.jsonl"
    config = tmp_path / "livemig.toml"
    # DaemonProcess passes --listen 127.0.0.1:PORT (support/ports.py),
    # which must win over the file's port 1; the log settings come from the file.
    config.write_text(f'listen = "127.0.0.1:1"\nlog-file = "{event_log}"\nlog-json = true\n')
    daemon = DaemonProcess(tmp_path, "cfg", "asyncio", "--config", str(config))
    try:
        assert daemon.port != 1
        lines = [json.loads(line) for line in event_log.read_text().splitlines()]
        assert any("daemon listening" in line["message"] for line in lines)
    finally:
        daemon.close()

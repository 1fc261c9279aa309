"""Stopping a daemon never silently loses a VM.

Real daemon processes and real signals: a daemon with VMs or migrations
refuses the first SIGTERM/SIGINT (and `livemig daemon stop` without
--force), saying why; a second signal forces the stop, cancelling
migrations first so that each VM resumes at its source. `livemig daemon
drain` moves every VM away, then stops the daemon.
"""
import json
import signal
import time

import pytest

from support.daemons import EXIT_FAILED, DaemonProcess, start_vm
from support.oracle import Recipe

WAIT_S = 60


def _log(daemon) -> str:
    daemon.log.flush()
    daemon.log.seek(0)
    return daemon.log.read()


def _wait_for_log(daemon, text: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while text not in _log(daemon):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{_log(daemon)}"
        time.sleep(0.05)
    return _log(daemon)


def _slow_migration(src, dst, name: str) -> dict:
    """A migration that cannot finish on its own while the test acts: a 64 MiB
    guest dirtying far faster than a 1 MiB/s link, with no round limit."""
    start_vm(src, name, Recipe("64MiB", 1, "uniform", seed=5, dirty_rate="16MiB/s"))
    rec = src.cli_json("migrate", name, "--to", dst.address, "--max-bandwidth", "1MiB/s",
                       "--downtime-ms", "1", "--max-rounds", "100000", "--no-wait")
    deadline = time.monotonic() + WAIT_S
    while (src.client.call("status", id=rec["id"]).get("stats") or {}).get(
            "bytes_sent", 0) < 128 << 10:
        assert time.monotonic() < deadline, "the migration never got going"
        time.sleep(0.05)
    return rec


def test_a_daemon_with_nothing_at_stake_stops_on_the_first_signal(tmp_path):
    d = DaemonProcess(tmp_path, "idle", "auto")
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=WAIT_S) == 0
        assert "nothing runs here; stopping" in _log(d)
    finally:
        d.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_is_refused_while_vms_run_and_the_second_forces(tmp_path, sig):
    d = DaemonProcess(tmp_path, "host", "auto")
    try:
        start_vm(d, "keep", Recipe("16MiB", 1, "uniform", seed=1, dirty_rate="1MiB/s"))
        d.proc.send_signal(sig)
        log = _wait_for_log(d, "refusing to stop the daemon: 1 VM(s) run here (keep)")
        assert "livemig daemon drain --to" in log
        assert d.alive()
        assert d.client.call("vm.list")[0]["running"]
        refused = d.cli("daemon", "stop", check=EXIT_FAILED)
        assert "refusing to stop the daemon" in refused.stderr
        d.proc.send_signal(sig)
        assert d.proc.wait(timeout=WAIT_S) == 0
        assert "stopping VM keep with the daemon" in _log(d)
    finally:
        d.close()


def test_stop_force_cancels_an_outgoing_migration_and_the_destination_discards(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        _slow_migration(src, dst, "away")
        src.cli("daemon", "stop", check=EXIT_FAILED)       # a migration is under way
        assert src.cli_json("daemon", "stop", "--force")["shutting_down"]
        assert src.proc.wait(timeout=WAIT_S) == 0
        log = _log(src)
        assert "cancelling the outgoing migration of away" in log
        assert "resumed here before being stopped" in log
        deadline = time.monotonic() + WAIT_S
        while True:     # the destination learns of it from the Abort (or the close)
            rec = next(m for m in dst.client.call("status")["migrations"] if m["vm"] == "away")
            if rec["status"] == "failed":
                break
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)
        assert dst.client.call("vm.list") == []
    finally:
        src.close()
        dst.close()


def test_signals_on_a_destination_mid_migration_leave_the_vm_running_at_its_source(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        rec = _slow_migration(src, dst, "coming")
        dst.proc.send_signal(signal.SIGTERM)
        _wait_for_log(dst, "1 migration(s) are under way (coming from")
        assert src.client.call("status", id=rec["id"])["status"] == "active"
        dst.proc.send_signal(signal.SIGTERM)
        assert dst.proc.wait(timeout=WAIT_S) == 0
        assert "discarded here; it resumes at its source" in _log(dst)
        # Its record says so in words, not "CancelledError", and outlives it.
        said = ("the daemon here was stopped while VM coming arrived from "
                f"{src.address}; the copy here was discarded and the VM runs on at its source")
        assert f"cancelled: {said}" in _log(dst) and "CancelledError" not in _log(dst)
        history = tmp_path / "dst-state" / f"history-{dst.port}.jsonl"
        row = next(r for r in map(json.loads, history.read_text().splitlines())
                   if r["vm"] == "coming")
        assert row["direction"] == "incoming" and row["status"] == "cancelled", row
        assert row["error"] == said, row
        final = src.client.call("migration.wait", id=rec["id"], timeout_s=WAIT_S)
        assert final["status"] == "failed", final
        vm = next(v for v in src.client.call("vm.list") if v["name"] == "coming")
        assert vm["running"] and not vm["migrating"]
    finally:
        src.close()
        dst.close()


def test_drain_moves_every_vm_then_stops(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        for i, name in enumerate(("one", "two")):
            start_vm(src, name, Recipe("16MiB", 1, "uniform", seed=i, dirty_rate="1MiB/s"))
        res = src.cli_json("daemon", "drain", "--to", dst.address)
        assert res["moved"] == ["one", "two"] and res["kept"] == {} and res["stopping"]
        assert src.proc.wait(timeout=WAIT_S) == 0
        assert sorted(v["name"] for v in dst.client.call("vm.list")) == ["one", "two"]
        assert all(v["running"] for v in dst.client.call("vm.list"))
    finally:
        src.close()
        dst.close()


def test_drain_to_a_daemon_that_refuses_keeps_the_vms_and_the_daemon(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto", "--max-incoming-memory", "8MiB")
    try:
        start_vm(src, "stays", Recipe("16MiB", 1, "uniform", seed=1, dirty_rate="1MiB/s"))
        res = src.cli_json("daemon", "drain", "--to", dst.address, check=EXIT_FAILED)
        assert res["moved"] == [] and "incoming memory limit" in res["kept"]["stays"]
        assert not res["stopping"] and src.alive()
        assert src.client.call("vm.list")[0]["running"]
    finally:
        src.close()
        dst.close()

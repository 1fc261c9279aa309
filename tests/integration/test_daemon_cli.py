"""The daemon and the ``livemig`` CLI as users run them: separate processes.

Two daemons per event-loop kind listen on loopback (port 0: the kernel picks)
with control sockets in a temporary directory; every CLI call is a real
``python -m livemig`` subprocess whose exit code and ``--json`` output are
checked. A migrated VM is compared with a twin that never moved, through the
daemon's ``vm.run_to`` and ``vm.inspect`` control commands.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig.control import ControlClient, ControlError
from support.oracle import Recipe

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3
# A daemon's VM runs at its paced speed (the control socket cannot unpace it),
# so compare a few thousand steps ahead: any common step is as good an oracle.
AHEAD_STEPS = 5_000


def livemig(*args, check: int | None = EXIT_OK, timeout_s: float = 60):
    proc = subprocess.run([sys.executable, "-m", "livemig", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout_s)
    if check is not None:
        assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def livemig_json(*args, check: int = EXIT_OK):
    return json.loads(livemig(*args, "--json", check=check).stdout)


class DaemonProcess:
    def __init__(self, tmp: Path, label: str, loop: str, *extra):
        self.control = str(tmp / f"{label}.sock")
        self.log = open(tmp / f"{label}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "daemon", "--listen", "127.0.0.1:0",
             "--control", self.control, "--loop", loop, *extra],
            env=ENV, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = ControlClient(self.control, timeout_s=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.info = self.client.call("ping")
                break
            except ControlError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError(f"daemon {label} did not start:\n{self.log.read()}")
                time.sleep(0.05)
        self.address = self.info["listen"]
        self.port = int(self.address.rsplit(":", 1)[1])

    def cli(self, *args, check: int | None = EXIT_OK):
        return livemig(*args, "--control", self.control, check=check)

    def cli_json(self, *args, check: int = EXIT_OK):
        return json.loads(self.cli(*args, "--json", check=check).stdout)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.client.call("ping")["pid"] == self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ControlError):
                self.client.call("shutdown")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def daemons(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"daemons-{request.param}")
    a = DaemonProcess(tmp, "a", request.param)
    try:
        b = DaemonProcess(tmp, "b", request.param)
    except BaseException:
        a.close()
        raise
    yield a, b
    b.close()
    a.close()


def _start(daemon, name, recipe: Recipe) -> dict:
    return daemon.cli_json("vm", "start", name, "--memory", recipe.memory, "--vcpus",
                           recipe.vcpus, "--workload", recipe.workload, "--dirty-rate",
                           recipe.dirty_rate, "--seed", recipe.seed)


def _assert_matches_unmoved(daemon, name: str, recipe: Recipe) -> None:
    vm = daemon.client.call("vm.list")
    steps = next(v["steps"] for v in vm if v["name"] == name)
    target = max(steps) + AHEAD_STEPS
    daemon.client.call("vm.run_to", name=name, step=target, timeout_s=30)
    got = daemon.client.call("vm.inspect", name=name)
    with recipe.build(paced=False) as twin:
        twin.run_to(target, timeout_s=30)
        assert got["steps"] == twin.steps() == [target] * recipe.vcpus
        assert got["digest"] == twin.digest().hex(), "memory digest differs"
        for i in range(recipe.vcpus):
            assert got["cpus"][i] == twin.registers(i), f"vCPU {i} registers differ"
            assert got["console"][i] == twin.console(i).hex(), f"vCPU {i} console differs"


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
    assert livemig("probe").stdout.strip()


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
        deadline = time.monotonic() + 10
        while (a.client.call("status", id=rec["id"]).get("stats") or {}).get(
                "bytes_sent", 0) < 256 << 10:
            assert time.monotonic() < deadline, "the migration never got going"
            time.sleep(0.05)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        final = a.client.call("migration.wait", id=rec["id"], timeout_s=20)
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

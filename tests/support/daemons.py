"""Daemons as separate processes and the ``livemig`` CLI, for integration tests.

``DaemonProcess`` runs ``python -m livemig daemon`` on loopback (on a port
below the kernel's ephemeral range, support/ports.py, so that a restart can
come back on it) with its control socket in a temporary directory; ``livemig()``
runs one CLI command as a subprocess and checks its exit code.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import livemig
from livemig.errors import ControlError
from livemig.lab.daemonproc import wait_hosted as lab_wait_hosted
from livemig.service.control import ControlClient
from support.oracle import Recipe
from support.ports import listen_port
from support.waiting import PATIENCE_S, wait_for

# The daemons and CLI run the same livemig this test process imported (the
# source tree with its built module, or the installed package).
ENV = {**os.environ, "PYTHONPATH": str(Path(livemig.__file__).resolve().parents[1])}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3
# A daemon's VM runs at its paced speed (the control socket cannot unpace it),
# so compare a few thousand steps ahead: any common step is as good an oracle.
AHEAD_STEPS = 5_000


def livemig(*args, check: int | None = EXIT_OK, timeout_s: float = PATIENCE_S):
    proc = subprocess.run([sys.executable, "-m", "livemig", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout_s)
    if check is not None:
        assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def livemig_json(*args, check: int = EXIT_OK):
    return json.loads(livemig(*args, "--json", check=check).stdout)


class DaemonProcess:
    def __init__(self, tmp: Path, label: str, loop: str, *extra, log_label: str | None = None,
                 env: dict | None = None):
        # ``env``: more environment for this process only (a restart goes without)
        self._args = (tmp, label, loop, extra)
        self.control = str(tmp / f"{label}.sock")
        self.log = open(tmp / f"{log_label or label}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "daemon", "--listen", f"127.0.0.1:{listen_port()}",
             "--control", self.control, "--loop", loop,
             "--state-dir", str(tmp / f"{label}-state"), *extra],
            env={**ENV, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = ControlClient(self.control, timeout_s=PATIENCE_S)
        self.info = wait_for(f"daemon {label} to answer on its control socket", self._ping)
        self.address = self.info["listen"]
        self.port = int(self.address.rsplit(":", 1)[1])

    def _ping(self) -> dict | None:
        try:
            return self.client.call("ping")
        except ControlError:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"daemon exited at start:\n{self.log.read()}") from None
            return None

    def restarted(self) -> "DaemonProcess":
        """A new daemon with this one's state dir, control socket and listen
        port (this one has exited: killed, say), logging to its own file."""
        tmp, label, loop, extra = self._args
        return DaemonProcess(tmp, label, loop, *extra, "--listen", self.address,
                             log_label=f"{label}-restarted")

    def cli(self, *args, check: int | None = EXIT_OK):
        return livemig(*args, "--control", self.control, check=check)

    def cli_json(self, *args, check: int = EXIT_OK):
        return json.loads(self.cli(*args, "--json", check=check).stdout)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.client.call("ping")["pid"] == self.proc.pid

    def log_tail(self, nbytes: int = 8000) -> str:
        """The end of this daemon's log (for a failing test's report)."""
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-nbytes:]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ControlError):
                self.client.call("shutdown", force=True)
            try:
                self.proc.wait(timeout=PATIENCE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def daemon_pair(tmp: Path, loop: str, *, env_a: dict | None = None):
    """Daemon processes "a" and "b" on ``loop``, closed at the end (``a`` at
    once if ``b`` does not start); ``env_a``: more environment for "a"."""
    a = DaemonProcess(tmp, "a", loop, env=env_a)
    try:
        b = DaemonProcess(tmp, "b", loop)
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    except BaseException:
        # pytest shows what a failing test printed: both daemons' last words.
        for d in (a, b):
            print(f"--- daemon {Path(d.log.name).stem} log (tail) ---\n{d.log_tail()}")
        raise
    finally:
        b.close()
        a.close()


def start_vm(daemon, name, recipe: Recipe) -> dict:
    return daemon.cli_json("vm", "start", name, "--memory", recipe.memory, "--vcpus",
                           recipe.vcpus, "--workload", recipe.workload, "--dirty-rate",
                           recipe.dirty_rate, "--seed", recipe.seed)


def wait_hosted(daemon, name: str) -> dict:
    """The daemon's listing of VM ``name`` once it hosts it whole (not still
    arriving in post-copy)."""
    return lab_wait_hosted(daemon.client, name, timeout_s=PATIENCE_S)


def assert_daemon_vm_matches_unmoved(daemon, name: str, recipe: Recipe) -> None:
    wait_hosted(daemon, name)
    # Paused first: a running guest could pass the target between reading
    # its steps and asking it to stop there.
    steps = daemon.client.call("vm.pause", name=name)["steps"]
    target = max(steps) + AHEAD_STEPS
    daemon.client.call("vm.run_to", name=name, step=target, timeout_s=PATIENCE_S)
    got = daemon.client.call("vm.inspect", name=name)
    with recipe.build(paced=False) as twin:
        twin.run_to(target, timeout_s=PATIENCE_S)
        assert got["steps"] == twin.steps() == [target] * recipe.vcpus
        assert got["digest"] == twin.digest().hex(), "memory digest differs"
        for i in range(recipe.vcpus):
            assert got["cpus"][i] == twin.registers(i), f"vCPU {i} registers differ"
            assert got["console"][i] == twin.console(i).hex(), f"vCPU {i} console differs"



"""``livemig daemon --detach``: start the daemon in the background and return
once it answers on its control socket.

The daemon runs as a new session (no controlling terminal, so closing the
shell or Ctrl-C there does not stop it), with its output in a log file of
the state directory. Returning only once ``ping`` succeeds is what makes a
pasted sequence of commands work: the next command finds the daemon up,
rather than racing its start-up as ``livemig daemon &`` would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..addresses import parse_hostport
from ..errors import ControlError, LivemigError
from .control import ControlClient
from .history import default_state_dir

START_TIMEOUT_S = 30.0
POLL_S = 0.05


def detach(argv: list[str], *, control_path: str, state_dir: str | None, listen: str,
           as_json: bool) -> int:
    """Re-run ``livemig daemon`` from ``argv`` without ``--detach`` in the
    background; 0 once it answers, 4 (with its log) if it exits first."""
    _, port = parse_hostport(listen, what="--listen")
    state_dir = state_dir or default_state_dir()
    os.makedirs(state_dir, exist_ok=True)
    log_path = os.path.join(state_dir, f"daemon-{port}.log")
    child_argv = [a for a in argv if a not in ("--detach", "--json")]
    if "--control" not in child_argv:
        child_argv += ["--control", control_path]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "livemig", *child_argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = ControlClient(control_path, timeout_s=5.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise LivemigError(f"the daemon exited at start-up with code {proc.returncode}: "
                               f"{_tail(log_path)} (log: {log_path})")
        try:
            info = client.call("ping")
            break
        except ControlError:
            if time.monotonic() > deadline:
                raise LivemigError(f"the daemon (pid {proc.pid}) did not answer on "
                                   f"{control_path} within {START_TIMEOUT_S:g} s; it keeps "
                                   f"running: see {log_path}") from None
            time.sleep(POLL_S)
    result = {"pid": proc.pid, "listen": info["listen"], "control": control_path,
              "log": log_path}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"livemig daemon {info['listen']} started in the background (pid {proc.pid}); "
              f"log {log_path}; stop it with `livemig shutdown --daemon {listen}`")
    return 0


def _tail(path: str, max_chars: int = 600) -> str:
    with open(path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return (lines[-1] if lines else "(no output)")[-max_chars:]

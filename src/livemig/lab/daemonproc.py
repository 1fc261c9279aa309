"""Driving ``livemig daemon`` processes from a program (the demo, the sweep).

Start-up is judged by the control socket answering ``ping``; a daemon that
exits or stays silent is reported with its log. Stopping asks politely
(``shutdown``) and kills only a daemon that ignores it.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import time

from ..addresses import DEFAULT_HOST
from ..errors import ControlError
from ..service.control import ControlClient
from ..stats import ACTIVE_STATUSES


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(client: ControlClient, proc: subprocess.Popen, log_path: str, *,
               what: str = "a daemon", timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.call("ping")
            return
        except ControlError:
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    raise ControlError(f"{what} did not start; its log:\n{f.read()}") from None
            time.sleep(0.05)


def stop(client: ControlClient, proc: subprocess.Popen, *, timeout_s: float = 10.0) -> None:
    with contextlib.suppress(ControlError, OSError):
        client.call("shutdown", force=True)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_hosted(client: ControlClient, name: str, *, timeout_s: float = 60.0) -> dict:
    """The daemon's listing of VM ``name`` once it hosts it whole: a post-copy
    arrival is listed in state ``postcopy`` until its last page has landed,
    a moment after the source already reported the migration completed."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = next((v for v in client.call("vm.list") if v["name"] == name), None)
        if row is not None and row["state"] != "postcopy":
            return row
        if time.monotonic() > deadline:
            raise ControlError(f"VM {name!r} was not hosted whole within {timeout_s:g} s "
                               f"(listed as {row and row['state']})")
        time.sleep(0.02)


def wait_migration(client: ControlClient, rec: dict, *, poll_s: float = 5.0) -> dict:
    """Follow a migration record until it is no longer active."""
    while rec["status"] in ACTIVE_STATUSES:
        rec = client.call("migration.wait", id=rec["id"], timeout_s=poll_s)
    return rec

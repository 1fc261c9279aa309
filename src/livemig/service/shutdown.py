"""Stopping a daemon without losing VMs by surprise.

Theory of operation
-------------------
A daemon's VMs live in its process: stopping it stops them. So a stop is
never silent and never the default while anything would be lost:

* **SIGTERM/SIGINT** on a daemon that hosts no VM and runs no migration
  stops it. Otherwise the first signal is refused, with a message on the
  daemon's stderr naming what would be lost and the ways out; a second
  signal is the operator insisting, and forces the stop.
* The control command ``shutdown`` (``livemig daemon stop``) is refused the
  same way unless ``force`` is given.
* A **forced** stop first cancels every migration: an outgoing one resumes
  its VM here (the source keeps the VM until the destination verified and
  resumed it, so a cancelled migration never loses it) and tells the
  destination, which discards its copy; an incoming one is discarded here,
  and its source resumes. Only then are the VMs stopped, each one named in
  the log.
* **Drain** (``livemig daemon drain --to HOST:PORT``) migrates every VM to
  the given daemon, one at a time, and stops the daemon once none is left.
  A VM that fails to move stays here, running; the daemon then stays up and
  the answer says which VMs remain and why.
"""
from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

from ..errors import ControlError

if TYPE_CHECKING:
    from .daemon import Daemon


def under_way(daemon: "Daemon") -> list:
    """The daemon's migrations still running, either way."""
    return [rec for rec in daemon.migrations.values()
            if (rec.task is not None and not rec.task.done())
            or (rec.direction == "incoming"
                and rec.status not in ("completed", "failed", "cancelled"))]


def at_stake(daemon: "Daemon") -> str | None:
    """What stopping ``daemon`` now would lose, in words; None if nothing."""
    vms = sorted(daemon.vms)
    parts = []
    if vms:
        parts.append(f"{len(vms)} VM(s) run here ({', '.join(vms)})")
    moving = [f"{rec.vm_name} {'to' if rec.direction == 'outgoing' else 'from'} {rec.peer}"
              for rec in under_way(daemon)]
    if moving:
        parts.append(f"{len(moving)} migration(s) are under way ({', '.join(moving)})")
    return " and ".join(parts) or None


def refusal(daemon: "Daemon", what: str, how_to_force: str) -> str:
    return (f"refusing to stop the daemon: {what}; stopping would stop them. Move them "
            f"first (`livemig daemon drain --to HOST:PORT`), or {how_to_force}: outgoing "
            "migrations are then cancelled and their VMs resume here, incoming ones are "
            "discarded and resume at their source, and every VM here is stopped")


def log(message: str) -> None:
    print(f"livemig daemon: {message}", file=sys.stderr, flush=True)


class SignalGuard:
    """The daemon's SIGTERM/SIGINT handler: refuse once while something is at
    stake, force on the next signal."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.warned = False

    def __call__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        what = at_stake(self.daemon)
        if what is None:
            log(f"{name}: nothing runs here; stopping")
        elif not self.warned:
            self.warned = True
            log(f"{name}: " + refusal(self.daemon, what, "send the signal again to force it"))
            return
        else:
            log(f"{name} again: forcing the stop although {what}")
        self.daemon.request_stop()


def check_stop(daemon: "Daemon", force: bool) -> None:
    """The control command's rule: raise unless nothing is at stake or forced."""
    what = at_stake(daemon)
    if what is not None and not force:
        raise ControlError(refusal(daemon, what, "use `livemig daemon stop --force`"),
                           error_type="Refused")
    if what is not None:
        log(f"forced stop requested although {what}")


def report_losses(daemon: "Daemon") -> None:
    """Log, just before a stop, each migration cancelled and each VM stopped."""
    for rec in under_way(daemon):
        fate = ("resumed here before being stopped" if rec.direction == "outgoing"
                else "discarded here; it resumes at its source")
        log(f"cancelling the {rec.direction} migration of {rec.vm_name} "
            f"({rec.peer}): the VM is {fate}")
    for name in sorted(daemon.vms):
        log(f"stopping VM {name} with the daemon")


async def drain(daemon: "Daemon", to: str, **options) -> dict:
    """Migrate every VM to ``to``, one at a time; stop the daemon if all moved."""
    moved, kept = [], {}
    for name in sorted(daemon.vms):
        hosted = daemon.vms.get(name)
        if hosted is None or hosted.migrating or hosted.unresolved is not None:
            kept[name] = "busy or unresolved: not moved"
            continue
        rec = await daemon.migrate_vm(name, to, **options)
        if rec["status"] == "completed":
            moved.append(name)
        else:
            kept[name] = f"{rec['status']}: {rec['error']}"
    stopping = not kept and at_stake(daemon) is None
    if stopping:
        log(f"drained to {to} ({', '.join(moved) or 'no VM'}); stopping")
        daemon.request_stop()
    return {"to": to, "moved": moved, "kept": kept, "stopping": stopping}

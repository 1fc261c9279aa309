"""Killing a daemon at a handover step, for tests/integration/test_daemon_kills.py
and bench/soak_handover.py.

``kill_at(pool, Kill(...))`` migrates a warm VM between two daemon processes
through a FrameProxy that holds the chosen frame; with the frame held it
SIGKILLs the source or the destination daemon, then delivers or drops the
frame (``forward``: it had left a killed sender, or it never had), waits
until the survivor has settled, and says what the survivor reports
(``Settled``). ``ending(settled)`` names how the trial ended, ``check``
lists what is wrong with it (a message that does not say where the VM is or
what to do, an operator path that fails, a copy that differs from a twin
that never moved), and ``expected(kill)`` is what the design promises for
each step × side × mode (docs/postcopy.md, "A daemon killed at a handover
step").
"""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass

from support.daemons import (EXIT_FAILED, DaemonProcess, assert_daemon_vm_matches_unmoved,
                             start_vm, wait_hosted)
from support.frameproxy import HOLD, Fault
from support.oracle import Recipe
from support.proxythread import ProxyThread
from support.waiting import PATIENCE_S, wait_for

# Short windows: a source in doubt stops asking after WINDOW_S, a post-copy
# destination whose source is gone stops waiting after RECOVERY_S.
WINDOW_S = 2
RECOVERY_S = 2.0
DAEMON_FLAGS = ("--postcopy-recovery-timeout", str(RECOVERY_S))
MODES = {"precopy": {},
         "postcopy": {"mode": "postcopy"},
         "hybrid": {"mode": "hybrid", "hybrid_postcopy_after_rounds": 1, "downtime_ms": 0.001}}
# message -> the way it travels ("up": source to destination)
DIRECTION = {"Switchover": "up", "Verified": "down", "Commit": "up", "Resumed": "down",
             "PostcopyComplete": "down", "Complete": "up"}
STEPS = {"precopy": ("Switchover", "Verified", "Commit", "Resumed", "Complete"),
         "postcopy": tuple(DIRECTION), "hybrid": tuple(DIRECTION)}
SIDES = ("source", "destination")
# A memtest guest checks its own pages; warmed up, it has written a good
# share of them, so a post-copy destination owes pages at Resumed.
RECIPE = Recipe("16MiB", 2, "memtest", seed=51, dirty_rate="16MiB/s")
WARM_STEPS = 20_000
VM_NAME = "vm1"

# How a trial ends, as the surviving daemon tells it:
AT_DESTINATION = "moved"          # the destination runs the VM (the source died after Commit)
AT_SOURCE = "stayed"              # the source resumed it (the destination died before Commit)
RESOLVE = "resolve"               # in doubt at the source, which keeps it paused: the
                                  # operator's `vm resolve --resume` brings it back
NEVER_RESUMED = "died-with-source"    # the destination never got Commit: discarded its copy
ABANDONED = "abandoned"           # post-copy: the destination lacked pages only the dead
                                  # source held, stopped the VM
DIED_THERE = "died-with-destination"  # the source had let go when the destination died
ENDS = (AT_DESTINATION, AT_SOURCE, RESOLVE, NEVER_RESUMED, ABANDONED, DIED_THERE)


@dataclass(frozen=True)
class Kill:
    mode: str
    message: str
    killed: str            # "source" or "destination"
    forward: bool          # the held frame reaches the survivor after the kill
    loop: str = "asyncio"

    @property
    def id(self) -> str:
        fate = "delivered" if self.forward else "dropped"
        return f"{self.mode}-kill-{self.killed}-at-{self.message}-{fate}-{self.loop}"


def expected(k: Kill) -> set[str]:
    """The endings the design allows for ``k`` (more than one where the
    survivor's view depends on which of several connections it reads first)."""
    post = k.mode != "precopy"
    if k.killed == "source":
        if k.message in ("Switchover", "Verified") or (k.message == "Commit" and not k.forward):
            return {NEVER_RESUMED}
        if post and k.message in ("Commit", "Resumed"):
            # pages were owed, unless a hybrid guest wrote none since its last round
            return {ABANDONED} | ({AT_DESTINATION} if k.mode == "hybrid" else set())
        return {AT_DESTINATION}
    if k.message == "Switchover" or (k.message == "Verified" and not k.forward):
        return {AT_SOURCE}      # a Verified that did arrive is answered by Commit: in doubt
    if k.message == "Complete" or (k.message == "Resumed" and k.forward and not post):
        return {DIED_THERE}
    if k.message == "PostcopyComplete" and k.forward:
        # Complete goes out to a dead peer, unless the page channels' end is read first
        return {DIED_THERE, RESOLVE}
    return {RESOLVE}


@dataclass
class Settled:
    """What the survivor reports once it has settled."""

    survivor: DaemonProcess
    victim: DaemonProcess  # the killed one (to restart it, say)
    killed: str            # "source" or "destination"
    record: dict           # the source's migration record, or the destination's incoming one
    vm: dict | None        # the survivor's listing of the VM, if it holds it


class Pool:
    """Live daemons per event loop; a trial takes two and gives its survivor back."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.idle: dict[str, list[DaemonProcess]] = {}
        self.started = 0

    def take(self, loop: str) -> DaemonProcess:
        if self.idle.get(loop):
            return self.idle[loop].pop()
        self.started += 1
        return DaemonProcess(self.tmp, f"d{self.started}-{loop}", loop, *DAEMON_FLAGS)

    def give_back(self, daemon: DaemonProcess, loop: str) -> None:
        """Keep a survivor once nothing is left on it."""
        wait_for("the survivor's migrations to end", lambda: not _busy(daemon))
        for vm in daemon.client.call("vm.list"):
            daemon.client.call("vm.stop", name=vm["name"])
        self.idle.setdefault(loop, []).append(daemon)

    def close(self) -> None:
        for daemons in self.idle.values():
            for d in daemons:
                d.close()
        self.idle.clear()


def _busy(daemon: DaemonProcess) -> bool:
    return any(m["status"] in ("setup", "active", "postcopy-active")
               for m in daemon.client.call("status")["migrations"])


def incoming(daemon: DaemonProcess, name: str = VM_NAME) -> dict | None:
    recs = [m for m in daemon.client.call("status")["migrations"]
            if m["direction"] == "incoming" and m["vm"] == name]
    return recs[-1] if recs else None


def listed(daemon: DaemonProcess, name: str = VM_NAME) -> dict | None:
    return next((v for v in daemon.client.call("vm.list") if v["name"] == name), None)


@contextlib.contextmanager
def kill_at(pool: Pool, k: Kill):
    """Run trial ``k``; yields Settled. The survivor goes back to the pool
    if the body returns (the body may leave the VM on it), else it is closed."""
    src, dst = pool.take(k.loop), pool.take(k.loop)
    survivor = dst if k.killed == "source" else src
    link = ProxyThread(dst.port, Fault(HOLD, k.message, DIRECTION[k.message]))
    kept = False
    try:
        start_vm(src, VM_NAME, RECIPE)
        wait_for("the guest to write its pages",
                 lambda: min(wait_hosted(src, VM_NAME)["steps"]) >= WARM_STEPS)
        rec = src.client.call("migrate", name=VM_NAME, to=link.address, **MODES[k.mode],
                              ack_timeout_s=WINDOW_S, handshake_timeout_s=5,
                              postcopy_recovery_timeout_s=WINDOW_S)
        link.wait_fired(f"{k.message} to reach the proxy")
        victim = src if k.killed == "source" else dst
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        link.release(k.forward)
        if k.killed == "source":
            said = wait_for("the destination's record of the migration to settle",
                            lambda: (r := incoming(dst)) is not None
                            and r["status"] in ("completed", "failed") and r)
        else:
            said = src.client.call("migration.wait", id=rec["id"], timeout_s=PATIENCE_S)
        yield Settled(survivor, victim, k.killed, said, listed(survivor))
        pool.give_back(survivor, k.loop)
        kept = True
    finally:
        link.close()
        for d in (src, dst):
            if not (kept and d is survivor):
                d.close()


def ending(s: Settled) -> str:
    """How the trial ended, from the survivor's record and listing (one of
    ENDS, or "unclear: ..." for a state the design has no place for)."""
    status, vm = s.record["status"], s.vm
    running = vm is not None and vm["running"]
    if s.killed == "destination":
        if status == "completed" and vm is None:
            return DIED_THERE
        if status == "failed" and running:
            return AT_SOURCE
        if status == "in-doubt" and vm is not None and not running and vm["unresolved"]:
            return RESOLVE
    else:
        if status == "completed" and running:
            return AT_DESTINATION
        if status == "failed" and vm is None:
            return ABANDONED if "cannot be completed" in (s.record["error"] or "") \
                else NEVER_RESUMED
    return f"unclear: {status}, VM {'running' if running else 'paused' if vm else 'absent'}"


def check(s: Settled, end: str) -> list[str]:
    """What is wrong with a trial that ended ``end``: the survivor's words
    must say where the VM is and what to do, an in-doubt VM must be brought
    back by the operator's path (this resumes it), and a copy that runs must
    match a twin that never moved."""
    error = s.record.get("error") or ""
    needs = {AT_SOURCE: ("resumed on the source",),
             RESOLVE: (f"livemig vm resolve {VM_NAME}", "--resume"),
             NEVER_RESUMED: ("never resumed here", "stays with the source"),
             ABANDONED: ("cannot be completed", "stopped and its memory freed",
                         "if the source daemon died")}.get(end, ())
    problems = [f"the message lacks {words!r}: {error}" for words in needs if words not in error]
    if end == RESOLVE:
        unsure = s.survivor.cli("vm", "resolve", VM_NAME, check=None)
        if unsure.returncode != EXIT_FAILED or "cannot learn the outcome" not in unsure.stderr:
            problems.append(f"vm resolve did not say it cannot learn the outcome: {unsure}")
        done = s.survivor.cli_json("vm", "resolve", VM_NAME, "--resume")
        if done["resolved"] != "resumed" or "WARNING" not in (done["warning"] or ""):
            problems.append(f"vm resolve --resume: {done}")
    if end in (AT_DESTINATION, AT_SOURCE, RESOLVE):
        vm = listed(s.survivor)
        if vm is None or not vm["running"] or vm["unresolved"]:
            problems.append(f"the VM does not run on the survivor: {vm}")
        else:
            try:
                assert_daemon_vm_matches_unmoved(s.survivor, VM_NAME, RECIPE)
            except AssertionError as exc:
                problems.append(f"corrupted: {exc}")
    return problems

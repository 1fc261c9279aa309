"""A handover left in doubt by an unreachable destination is settled later.

Two daemons, a FrameProxy in front of the destination that black-holes the
link at Commit or at Resumed and then refuses every new connection: the
source cannot learn the outcome within its window, keeps the VM paused and
marks it unresolved. Once the destination is reachable again, ``vm.resolve``
asks it and applies the answer; an operator's ``--resume`` or ``--discard``
is refused where that answer shows it would run the VM twice or lose it.
The VM ends running in exactly one place, identical to one that never moved.
The last tests use the CLI and daemon processes, one of them killed after
Commit: the unavoidable case, left to the operator with a clear message.
"""
import asyncio
import contextlib
import dataclasses
import signal
import time

import pytest

from livemig.service.control import ControlError
from livemig.service.daemon import Daemon
from support.daemons import EXIT_FAILED, DaemonProcess, assert_daemon_vm_matches_unmoved, start_vm
from support.frameproxy import Fault, FrameProxy
from support.proxythread import ProxyThread
from support.oracle import Recipe

LOCAL = "127.0.0.1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=41, dirty_rate="16MiB/s")
STEPS_AHEAD = 20_000


async def _daemon(path) -> tuple[Daemon, dict]:
    d = Daemon(listen=f"{LOCAL}:0", control_path=str(path))
    # A destination left waiting for a Commit that never comes drops the
    # session after this long (the default is 30 s).
    d.incoming_config = dataclasses.replace(d.incoming_config, ack_timeout_s=3)
    await d.start()
    return d, d._handlers()


async def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _assert_runs_only_on(h_run, h_other, name: str) -> None:
    """``name`` runs under the first daemon's handlers, is absent from the
    other's, and matches a twin that never moved."""
    listed = {v["name"]: v for v in await h_run["vm.list"]()}
    assert listed[name]["running"] and not listed[name]["unresolved"]
    assert name not in {v["name"] for v in await h_other["vm.list"]()}
    # Paused first: a running guest could pass the target between reading
    # its steps and asking it to stop there.
    target = max((await h_run["vm.pause"](name=name))["steps"]) + STEPS_AHEAD
    await h_run["vm.run_to"](name=name, step=target, timeout_s=30)
    got = await h_run["vm.inspect"](name=name)
    with RECIPE.build(paced=False) as twin:
        await asyncio.get_running_loop().run_in_executor(None, lambda: twin.run_to(target))
        assert got["digest"] == twin.digest().hex(), "memory digest differs from the twin"
        assert got["cpus"] == [twin.registers(i) for i in range(RECIPE.vcpus)]


@contextlib.asynccontextmanager
async def _in_doubt(tmp_path, fault: Fault):
    """Two daemons and vm1 left in doubt at the source by ``fault``, the
    link back: (source, its handlers, destination, its handlers, proxy)."""
    a, ha = await _daemon(tmp_path / "a.sock")
    b, hb = await _daemon(tmp_path / "b.sock")
    proxy = await FrameProxy(LOCAL, b.listen_port, fault).start()
    await ha["vm.start"](name="vm1", memory=RECIPE.memory, vcpus=RECIPE.vcpus,
                         workload=RECIPE.workload, dirty_rate=RECIPE.dirty_rate,
                         seed=RECIPE.seed)
    rec = await ha["migrate"](name="vm1", to=f"{LOCAL}:{proxy.port}", ack_timeout_s=3,
                              handshake_timeout_s=5)
    await proxy.fired.wait()
    proxy.refusing = True      # the destination is unreachable from now on
    done = await ha["migration.wait"](id=rec["id"], timeout_s=60)
    assert done["status"] == "in-doubt", done
    assert "in doubt" in done["error"] and "livemig vm resolve vm1" in done["error"]
    (vm,) = await ha["vm.list"]()
    assert not vm["running"] and vm["unresolved"]["why"] == "in-doubt"
    with pytest.raises(ControlError, match="cannot learn the outcome"):
        await ha["vm.resolve"](name="vm1")
    with pytest.raises(ControlError, match="not settled"):
        await ha["vm.resume"](name="vm1")
    proxy.refusing = False     # the link is back
    try:
        yield a, ha, b, hb, proxy
    finally:
        await proxy.close()
        await a.close()
        await b.close()


def test_resolve_after_resumed_was_lost_releases_the_source(run, tmp_path):
    async def scenario():
        fault = Fault("black-hole", "Resumed", "down")
        async with _in_doubt(tmp_path, fault) as (a, ha, b, hb, proxy):
            await _until(lambda: _has(hb, "vm1"), "the destination to host the VM")
            with pytest.raises(ControlError, match="refusing to resume"):
                await ha["vm.resolve"](name="vm1", action="resume")
            res = await ha["vm.resolve"](name="vm1")
            assert res["resolved"] == "discarded" and res["destination_says"] == "committed"
            await _assert_runs_only_on(hb, ha, "vm1")
    run(scenario())


def test_resolve_after_commit_was_lost_resumes_the_source(run, tmp_path):
    async def scenario():
        fault = Fault("black-hole", "Commit", "up")
        async with _in_doubt(tmp_path, fault) as (a, ha, b, hb, proxy):
            # Asking makes the destination drop the session it never got Commit for.
            with pytest.raises(ControlError, match="refusing to discard"):
                await ha["vm.resolve"](name="vm1", action="discard")
            res = await ha["vm.resolve"](name="vm1")
            assert res["resolved"] == "resumed" and res["destination_says"] == "not-committed"
            await _assert_runs_only_on(ha, hb, "vm1")
    run(scenario())


def test_resolve_by_hand_when_the_destination_stays_unreachable(run, tmp_path):
    async def scenario():
        fault = Fault("black-hole", "Commit", "up")
        async with _in_doubt(tmp_path, fault) as (a, ha, b, hb, proxy):
            proxy.refusing = True
            res = await ha["vm.resolve"](name="vm1", action="resume")
            assert res["resolved"] == "resumed" and "WARNING" in res["warning"]
            proxy.refusing = False
            # The destination never got Commit: it must end up without the VM.
            await _until(lambda: _no_incoming(b), "the destination to drop the session", 60)
            await _assert_runs_only_on(ha, hb, "vm1")
    run(scenario())


async def _has(handlers, name: str) -> bool:
    return any(v["name"] == name for v in await handlers["vm.list"]())


async def _no_incoming(daemon: Daemon) -> bool:
    return not daemon._listener.sessions


def _move_until_resumed_passes(a: DaemonProcess, link: ProxyThread) -> dict:
    """Start vm1 on ``a`` and move it through ``link``; return the migration's
    record once Resumed has passed the proxy."""
    start_vm(a, "vm1", RECIPE)
    # short waits for Resumed and for the outcome (the CLI has no flags for them)
    rec = a.client.call("migrate", name="vm1", to=f"{LOCAL}:{link.proxy.port}",
                        ack_timeout_s=3, handshake_timeout_s=5)
    deadline = time.monotonic() + 60
    while not link.proxy.fired.is_set():
        assert time.monotonic() < deadline, "Resumed never passed the proxy"
        time.sleep(0.02)
    return rec


def test_cli_resolve_of_a_vm_left_in_doubt(tmp_path):
    a = DaemonProcess(tmp_path, "src", "auto")
    b = DaemonProcess(tmp_path, "dst", "auto")
    link = ProxyThread(b.port, Fault("black-hole", "Resumed", "down"))
    try:
        rec = _move_until_resumed_passes(a, link)
        link.proxy.refusing = True
        final = a.client.call("migration.wait", id=rec["id"], timeout_s=120)
        assert final["status"] == "in-doubt", final
        assert "in-doubt" in a.cli("vm", "list").stdout
        link.proxy.refusing = False
        refused = a.cli("vm", "resolve", "vm1", "--resume", check=EXIT_FAILED)
        assert "refusing to resume" in refused.stderr and "WARNING" in refused.stderr
        out = a.cli("vm", "resolve", "vm1").stdout
        assert "discarded here" in out and "committed" in out, out
        assert a.cli_json("vm", "list") == []
        assert_daemon_vm_matches_unmoved(b, "vm1", RECIPE)
    finally:
        link.close()
        b.close()
        a.close()


def test_destination_killed_after_commit_the_operator_resumes_the_source(tmp_path):
    """The unavoidable case: the destination daemon dies (SIGKILL) with the VM
    it resumed. Nothing can be learned any more; the source keeps its copy
    paused and says so, and the operator's --resume brings it back, intact."""
    a = DaemonProcess(tmp_path, "src", "auto")
    b = DaemonProcess(tmp_path, "dst", "auto")
    link = ProxyThread(b.port, Fault("black-hole", "Resumed", "down"))
    try:
        rec = _move_until_resumed_passes(a, link)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        final = a.client.call("migration.wait", id=rec["id"], timeout_s=120)
        assert final["status"] == "in-doubt", final
        unsure = a.cli("vm", "resolve", "vm1", check=EXIT_FAILED)
        assert "cannot learn the outcome" in unsure.stderr and "--resume" in unsure.stderr
        done = a.cli_json("vm", "resolve", "vm1", "--resume")
        assert done["resolved"] == "resumed" and "WARNING" in done["warning"]
        assert_daemon_vm_matches_unmoved(a, "vm1", RECIPE)
    finally:
        link.close()
        b.close()
        a.close()

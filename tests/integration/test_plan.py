"""livemig plan: the bandwidth probe over the protocol and the prediction."""
import json
import os
import subprocess
import sys
import time

import pytest

import livemig
from livemig.config import MigrationConfig
from livemig.errors import ControlError
from livemig.service.control import ControlClient
from livemig.engine.destination.server import MigrationServer
from livemig.analysis.plan import plan_migration, predict_for, probe_bandwidth
from livemig.vm.machine import VM

MIB = 1 << 20


def test_probe_measures_the_in_process_cap(run):
    async def main():
        async with MigrationServer("127.0.0.1", 0) as srv:
            probe = await probe_bandwidth("127.0.0.1", srv.port, rate_limit_bps=40 * MIB,
                                          max_time_s=0.5)
            assert srv.errors == [] and srv.completed.empty()
            return probe
    probe = run(main())
    assert abs(probe.bytes_per_s - 40 * MIB) <= 0.2 * 40 * MIB, probe
    assert probe.frames >= 5 and probe.rtt_ms > 0 and probe.rate_limit_bps == 40 * MIB


def test_a_destination_still_migrates_after_a_probe(run):
    """The probe leaves the server as it was: the next connection migrates."""
    from livemig.engine.source.session import migrate

    async def main():
        async with MigrationServer("127.0.0.1", 0) as srv:
            await probe_bandwidth("127.0.0.1", srv.port, max_bytes=4 * MIB, max_time_s=0.2)
            with VM(memory="16MiB", vcpus=1, workload="uniform", dirty_rate=4 * MIB) as vm:
                vm.start()
                stats = await migrate(vm, "127.0.0.1", srv.port)
            _, moved = await srv.completed.get()
            moved.close()
            return stats
    assert run(main()).status == "completed"


def test_idle_vm_is_predicted_to_converge_in_one_round(run):
    async def main():
        async with MigrationServer("127.0.0.1", 0) as srv:
            with VM(memory="64MiB", vcpus=1, workload="idle") as vm:
                vm.start()
                plan = await plan_migration(vm, "127.0.0.1", srv.port, window_s=0.3,
                                            probe_time_s=0.3, probe_bytes=32 * MIB)
                vm.pause()
            return plan
    plan = run(main())
    p = plan.prediction
    assert plan.dirty.bytes_per_s == 0
    assert p.converges and p.rounds == 1 and p.recommended_mode == "precopy"
    assert p.expected_downtime_ms < 300 and p.total_bytes == 64 * MIB
    assert json.dumps(plan.to_dict())


def test_prediction_uses_the_configured_cap():
    cfg = MigrationConfig(max_bandwidth_bps=10 * MIB)
    bw, p = predict_for(1000 * MIB, 20 * MIB, 128 * MIB, cfg)
    assert bw == 10 * MIB and not p.converges and p.recommended_mode == "postcopy"


@pytest.fixture
def daemons(tmp_path):
    env = dict(os.environ)
    # the daemons import the same livemig this test imported
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(livemig.__file__)))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    out = []
    procs = []
    from livemig.lab.daemonproc import free_port
    for label in ("a", "b"):
        port = free_port()
        control = str(tmp_path / f"{label}.sock")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "livemig", "daemon", "--listen", f"127.0.0.1:{port}",
             "--control", control], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        client = ControlClient(control, timeout_s=30)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.call("ping")
                break
            except ControlError:
                assert time.monotonic() < deadline and procs[-1].poll() is None
                time.sleep(0.05)
        out.append((control, f"127.0.0.1:{port}", client))
    yield out, env
    for (_, _, client), proc in zip(out, procs):
        try:
            client.call("shutdown", force=True)
        except ControlError:
            pass
        proc.wait(timeout=10)


def test_cli_dirtyrate_and_plan_through_the_daemon(daemons):
    (a_ctl, _, a), (_, b_addr, _) = daemons[0]
    env = daemons[1]
    a.call("vm.start", name="v", memory="32MiB", vcpus=1, workload="uniform",
           dirty_rate="8MiB/s")
    cli = [sys.executable, "-m", "livemig"]
    res = subprocess.run(cli + ["dirtyrate", "v", "--window", "0.5", "--control", a_ctl,
                                "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["method"] == "tracker" and abs(rep["mib_per_s"] - 8) <= 0.2 * 8
    res = subprocess.run(cli + ["plan", "v", "--to", b_addr, "--window", "0.3",
                                "--probe-time", "0.2", "--control", a_ctl],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "prediction: converges" in res.stdout and "recommended mode: precopy" in res.stdout
    res = subprocess.run(cli + ["dirtyrate", "nope", "--control", a_ctl], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "no VM named 'nope'" in res.stderr

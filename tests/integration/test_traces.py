"""Dirty-page traces end to end: record a running guest, replay the file as a
workload, and migrate the replaying VM (checked against an unmoved twin)."""
import asyncio
import json

import pytest

from livemig.analysis.dirtyrate import measure_dirty_rate, record_trace
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.config import MigrationConfig
from livemig.errors import ConfigError
from livemig.native import postcopy
from livemig.vm import trace
from livemig.vm.machine import VM
from support.inprocess import started_daemons
from support.oracle import Recipe, assert_matches_unmoved

LOCAL = "127.0.0.1"


class TraceRecipe(Recipe):
    """A twin built from the same trace file. A trace VM built without a rate
    runs at its recorded rate, so the unmoved twin is unpaced afterwards."""

    def build(self, *, paced: bool = True) -> VM:
        vm = super().build(paced=paced)
        if not paced:
            vm.set_dirty_rate(None)
        return vm


@pytest.fixture(scope="module", params=["uniform", "hotset"])
def recorded(request, tmp_path_factory):
    """(trace path, recorded rate in bytes/s) of a paced 32 MiB guest."""
    path = str(tmp_path_factory.mktemp("traces") / f"{request.param}.lmtrace")
    with VM("32MiB", 2, request.param, dirty_rate="16MiB/s", seed=3) as vm:
        vm.start()
        result = record_trace(vm, path, 2.0, interval_s=0.1)
    assert result["intervals"] == 20 and result["dirty_pages"] > 0
    return path, result["dirty_rate_bps"]


def test_replay_dirties_at_about_the_recorded_rate(recorded):
    path, recorded_bps = recorded
    t = trace.load(path)
    assert t.dirty_rate_bps == pytest.approx(recorded_bps)
    memory = t.memory_bytes + (2 * trace.trace_area_npages(t) + 8) * 4096
    with VM(memory, 2, f"trace:{path}", seed=3) as vm:
        assert vm.workload == "trace"
        assert vm.dirty_rate == pytest.approx(recorded_bps, rel=0.05)
        vm.start()
        report = measure_dirty_rate(vm, 2.0, interval_s=0.1)
    # the replayed pages per interval, against the recorded ones: a generous
    # band, since a loaded host runs the guest behind its pace
    ratio = report.interval_pages / report.window_s * 4096 / recorded_bps
    assert 0.25 <= ratio <= 4, (ratio, report)


def test_replay_is_deterministic_and_loops(recorded):
    path, _ = recorded
    memory = "40MiB"
    steps = 1_000_000   # far more TICKs than the trace's intervals x slots: it loops
    with VM(memory, 2, f"trace:{path}", seed=3) as a, VM(memory, 2, f"trace:{path}", seed=3) as b:
        a.set_dirty_rate(None)
        b.set_dirty_rate(None)
        a.run_to(steps)
        b.run_to(steps)
        assert a.digest() == b.digest()
        assert [a.registers(i) for i in range(2)] == [b.registers(i) for i in range(2)]
        assert a.status() == ["parked", "parked"]


@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
def test_a_trace_vm_migrates_bit_identical(run, recorded, mode):
    if mode != "precopy" and not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
    path, _ = recorded
    recipe = TraceRecipe("40MiB", 2, f"trace:{path}", seed=3)

    async def main():
        vm = recipe.build()
        try:
            vm.start()
            await asyncio.sleep(0.2)
            async with MigrationServer(LOCAL, 0) as server:
                stats = await migrate(vm, LOCAL, server.port, name="t",
                                      config=MigrationConfig(mode=mode))
                arrival, moved = await server.completed.get()
            assert stats.status == "completed" and arrival.status == "completed"
            assert moved.workload == "trace" and moved.running
            try:
                assert_matches_unmoved(moved, recipe)
            finally:
                moved.close()
        finally:
            vm.close()
    run(main())


def test_bad_trace_workloads_are_refused_clearly(tmp_path):
    bad = tmp_path / "bad.lmtrace"
    bad.write_bytes(b"LMTRACE1" + b"\0" * 10)
    with pytest.raises(ConfigError, match="truncated"):
        VM("32MiB", 2, f"trace:{bad}")
    with pytest.raises(ConfigError, match="cannot read"):
        VM("32MiB", 2, f"trace:{tmp_path / 'absent'}")
    with pytest.raises(ConfigError, match="trace:FILE"):
        VM("32MiB", 2, "trace")
    with pytest.raises(ConfigError, match="name the trace file"):
        VM("32MiB", 2, "trace:")


def test_daemon_records_and_starts_a_trace_vm(run, tmp_path):
    path = str(tmp_path / "d.lmtrace")

    async def scenario():
        async with started_daemons(tmp_path, "a") as (a,):
            h = a._handlers()
            await h["vm.start"](name="src", memory="16MiB", vcpus=2, workload="hotset",
                                dirty_rate="8MiB/s")
            rec = await h["dirtyrate"](name="src", window_s=0.5, interval_s=0.1, record=path)
            assert rec["path"] == path and rec["intervals"] == 5 and rec["file_bytes"] > 0
            got = await h["vm.start"](name="replay", memory="24MiB", vcpus=2,
                                      workload=f"trace:{path}")
            assert got["workload"] == "trace"
            with pytest.raises(Exception, match="truncated"):
                open(tmp_path / "cut.lmtrace", "wb").write(open(path, "rb").read()[:-2])
                await h["vm.start"](name="cut", memory="24MiB", vcpus=2,
                                    workload=f"trace:{tmp_path / 'cut.lmtrace'}")

    run(scenario())


def test_cli_flags_name_trace_files_absolutely(monkeypatch, tmp_path):
    from livemig.cli import build_parser
    from livemig.cli.common import vm_dirty_rate

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["vm", "start", "x", "--workload", "trace:t.lmtrace"])
    assert args.workload == f"trace:{tmp_path / 't.lmtrace'}"
    assert vm_dirty_rate(args) is None          # the recorded rate
    args = build_parser().parse_args(["vm", "start", "x", "--workload", "uniform"])
    assert vm_dirty_rate(args) == 64 << 20      # the default pace
    args = build_parser().parse_args(["vm", "start", "x", "--workload", "trace:t",
                                      "--dirty-rate", "unpaced"])
    assert vm_dirty_rate(args) == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vm", "start", "x", "--workload", "trace"])


def test_cli_records_replays_and_migrates_a_trace(tmp_path):
    """The commands an operator types, against daemon processes: record with
    a path relative to the shell's directory, start the replay, move it, and
    a damaged file refused in one line."""
    import subprocess
    import sys

    from support.daemons import ENV, assert_daemon_vm_matches_unmoved, daemon_pair

    def cli(*args, control):
        return subprocess.run([sys.executable, "-m", "livemig", *map(str, args), "--control",
                               control], env=ENV, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    with daemon_pair(tmp_path, "asyncio") as (a, b):
        a.cli("vm", "start", "src", "--memory", "16MiB", "--workload", "uniform",
              "--dirty-rate", "8MiB/s")
        rec = cli("dirtyrate", "src", "--record", "src.lmtrace", "--seconds", "1", "--json",
                  control=a.control)
        assert rec.returncode == 0, rec.stderr
        doc = json.loads(rec.stdout)
        assert doc["path"] == str(tmp_path / "src.lmtrace") and doc["intervals"] == 10
        started = cli("vm", "start", "replay", "--memory", "24MiB", "--workload",
                      "trace:src.lmtrace", "--json", control=a.control)
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["workload"] == "trace"
        a.cli("migrate", "replay", "--to", b.address)
        assert_daemon_vm_matches_unmoved(
            b, "replay", TraceRecipe("24MiB", 2, f"trace:{tmp_path / 'src.lmtrace'}"))

        (tmp_path / "cut.lmtrace").write_bytes((tmp_path / "src.lmtrace").read_bytes()[:-1])
        bad = cli("vm", "start", "cut", "--memory", "24MiB", "--workload", "trace:cut.lmtrace",
                  control=a.control)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert "cut.lmtrace" in bad.stderr and "truncated" in bad.stderr, bad.stderr
        again = cli("dirtyrate", "src", "--seconds", "1", control=a.control)
        assert again.returncode == 2 and "--seconds goes with --record" in again.stderr

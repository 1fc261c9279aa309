"""The toy VM end to end: workloads, determinism oracle, memtest, state, snapshots."""
import errno
import os
import struct
import time

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings, strategies as st

from livemig.errors import ConfigError, GuestError, SnapshotError, StateFormatError, VMBusy
from livemig.vm import programs, snapshot, state
from livemig.vm.devices import console_hash
from livemig.vm.machine import VM
from support.waiting import wait_for

MEM = "16MiB"


def _observe(vm):
    regs = [vm.registers(i) for i in range(vm.nvcpus)]
    return vm.digest(), regs, [vm.console(i) for i in range(vm.nvcpus)]


def _let_every_vcpu_step(vm):
    """Wait until each vCPU of a running VM has retired another instruction."""
    before = vm.steps()
    wait_for("every vCPU to step", lambda: all(a > b for a, b in zip(vm.steps(), before)))


@pytest.mark.parametrize("workload", ["memtest", "hotset"])
def test_oracle_interrupted_run_matches_straight_run(tmp_path, workload):
    target = 400_000
    with VM(MEM, 2, workload, seed=7) as straight:
        straight.run_to(target)
        expected = _observe(straight)
        assert straight.steps() == [target, target]

    # Paced to tens of thousands of steps a second: interrupted long before the target.
    vm = VM(MEM, 2, workload, seed=7, dirty_rate="8MiB/s")  # pacing: timing only
    try:
        vm.start()
        for i in range(12):
            vm.set_throttle(60 if i % 3 == 0 else 0)
            _let_every_vcpu_step(vm)
            vm.pause()
            vm.resume()
        vm.pause()
        assert all(0 < s < target for s in vm.steps()), vm.steps()
        snapshot.save(vm, tmp_path / "mid.snap")
    finally:
        vm.close()

    with snapshot.load(tmp_path / "mid.snap") as restored:
        assert restored.workload == workload and restored.dirty_rate is not None
        restored.resume()
        for _ in range(4):
            _let_every_vcpu_step(restored)
            restored.pause()
            restored.resume()
        restored.pause()
        assert all(s < target for s in restored.steps())
        restored.set_dirty_rate(None)
        restored.set_throttle(0)
        restored.run_to(target)
        got = _observe(restored)
    assert got[0] == expected[0], "memory digest differs"
    assert got[1] == expected[1], "registers differ"
    assert got[2] == expected[2], "console differs"


def test_blank_vm_adopts_memory_and_state_and_continues_identically():
    with VM(MEM, 2, "uniform", seed=3) as src, VM.blank(MEM, 2) as dst:
        src.run_to(100_000)
        dst.memory.bytes[:] = src.memory.bytes
        dst.import_state(src.export_state())
        assert dst.workload == "uniform" and dst.digest() == src.digest()
        src.run_to(250_000)
        dst.run_to(250_000)
        assert _observe(src) == _observe(dst)


def _touched(vm, vcpu):
    first = vm.layout.data_first_page(vcpu)
    return vm.memory.words[first:first + vm.layout.data_npages].any(axis=1)


@pytest.mark.parametrize("workload", ["uniform", "hotset", "sweep", "memtest", "rewrite"])
def test_writing_workloads_dirty_only_their_partitions(workload):
    with VM(MEM, 2, workload, seed=1) as vm:
        vm.run_to(60_000 if workload != "rewrite" else 600_000)  # rewrite: ~2.6k steps a page
        vm.check_guest()
        end = vm.layout.data_first_page(vm.nvcpus - 1) + vm.layout.data_npages
        assert not vm.memory.words[end:].any(), "write outside every partition"
        for i in range(2):
            touched = _touched(vm, i)
            assert touched.sum() > 100
            assert vm.stats()["vcpus"][i]["stores"] > 1000
        if workload == "rewrite":     # every touched page is written whole
            first = vm.layout.data_first_page(0)
            pages = vm.memory.words[first:first + vm.layout.data_npages][_touched(vm, 0)]
            assert (pages != 0).mean() > 0.99
        if workload == "sweep":
            n = int(touched.sum())
            assert touched[:n].all() and not touched[n:].any()
        if workload == "hotset":
            hot = int(vm.layout.data_npages * 0.1)
            assert touched[:hot].mean() > 0.9 and touched[hot:].mean() < 0.5
        if workload == "memtest":
            first = vm.layout.data_first_page(0)
            pages = vm.memory.words[first:first + vm.layout.data_npages]
            weights = np.arange(1, 1024, 2, dtype=np.uint64)
            with np.errstate(over="ignore"):
                sums = (pages * weights).sum(axis=1, dtype=np.uint64)
            # only the page being updated at the stop step may be mid-way
            broken = first + np.flatnonzero(sums)
            in_flight = vm.registers(0)["regs"][4] // 4096
            assert set(broken.tolist()) <= {in_flight}, "a memtest page breaks its invariant"


def test_idle_does_not_write_and_prints_a_heartbeat():
    with VM(MEM, 1, "idle") as vm:
        before = vm.digest()
        vm.run_to(programs.IDLE_HEARTBEAT_EVERY * 4 + 1000)
        assert vm.digest() == before
        assert vm.console() == b"."
        assert vm.stats()["stores"] == 0


def test_two_vcpus_write_concurrently_and_the_dirty_rate_is_paced():
    rate = 16 * 2**20
    ticks = programs.pace_for("uniform", rate, 2) * 0.4    # per vCPU, 0.4 s at the rate
    with VM(MEM, 2, "uniform", dirty_rate=rate) as vm:
        t0 = time.monotonic()
        vm.start()

        def paced_window():
            s = vm.stats()
            return all(p["ticks"] >= ticks for p in s["vcpus"]) and s

        s = wait_for("both vCPUs to dirty 0.4 s worth of memory at the target rate",
                     paced_window)
        elapsed_s = time.monotonic() - t0
        vm.pause()
        assert all(p["stores"] > 0 for p in s["vcpus"])
        # Pacing holds the guest back: at most the rate plus each vCPU's 50 ms
        # catch-up allowance over the window. (A starved guest only takes
        # longer to get there; that it gets there at all is the wait above.)
        dirtied = s["ticks"] * programs.workload("uniform").bytes_per_tick
        assert dirtied / elapsed_s < 1.3 * rate, (s, elapsed_s)
        assert vm.console() == b""


def test_memtest_detects_a_flipped_byte():
    with VM(MEM, 2, "memtest", seed=5) as vm:
        vm.run_to(300_000)
        first = vm.layout.data_first_page(1)
        counters = vm.memory.words[first:first + vm.layout.data_npages, 1]
        page = first + int(np.flatnonzero(counters)[0])
        vm.memory.pages[page, 800] ^= 0x10
        vm.resume()
        wait_for("the guest to fault", lambda: "faulted" in vm.status())
        vm.pause()
        with pytest.raises(GuestError) as ei:
            vm.check_guest()
        assert ei.value.vcpu == 1
        assert ei.value.code == programs.MEMTEST_FAIL_CODE
        assert "memtest" in str(ei.value)


def test_console_of_a_running_vm_and_console_hash():
    with VM(MEM, 2, "memtest") as vm:
        vm.run_to(2_000_000)
        regs = vm.registers(1)
        out = vm.console(1)
        assert out and set(out) == {ord("b")}
        assert regs["console_count"] == len(out) and regs["console_hash"] == console_hash(out)
        vm.resume()
        assert set(vm.console(0)) == {ord("a")}
        with pytest.raises(VMBusy):
            vm.export_state()
        vm.pause()


def test_guest_fault_surfaces_in_run_to():
    with VM(MEM, 1, "uniform") as vm:
        vm.memory.bytes[:8] = 0  # opcode 0 at the entry point
        with pytest.raises(GuestError) as ei:
            vm.run_to(10)
        assert ei.value.code == 0x80000001 and ei.value.address == 0


# -- malformed state -------------------------------------------------------------
_BLOB = None
_BLANK = None


def _valid_blob_and_blank():
    global _BLOB, _BLANK
    if _BLOB is None:
        with VM("1MiB", 2, "memtest", seed=2) as vm:
            vm.run_to(50_000)
            _BLOB = vm.export_state()
        _BLANK = VM.blank("1MiB", 2, hugepages=False)
    return _BLOB, _BLANK


@pytest.fixture(scope="module", autouse=True)
def _close_blank():
    global _BLOB, _BLANK
    yield
    if _BLANK is not None:
        _BLANK.close()
    _BLOB = _BLANK = None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_truncated_or_flipped_state_raises_only_state_format_error(data):
    blob, blank = _valid_blob_and_blank()
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:cut]
    else:
        pos = data.draw(st.integers(0, len(blob) - 1))
        bit = data.draw(st.integers(0, 7))
        bad = bytearray(blob)
        bad[pos] ^= 1 << bit
        bad = bytes(bad)
    with pytest.raises(StateFormatError):
        blank.import_state(bad)


def test_state_semantic_checks():
    blob, blank = _valid_blob_and_blank()
    s = state.unpack(blob)
    blank.import_state(blob)
    for bad in (
        state.VMState(s.memory_bytes * 2, s.nvcpus, s.workload, s.seed, None, {}, s.vcpus),
        state.VMState(s.memory_bytes, 1, s.workload, s.seed, None, {}, s.vcpus[:1]),
        state.VMState(s.memory_bytes, 2, "nonsense", s.seed, None, {}, s.vcpus),
        state.VMState(s.memory_bytes, 2, "idle", s.seed, 1e6, {}, s.vcpus),
        state.VMState(s.memory_bytes, 2, s.workload, s.seed, None, {"x": 1}, s.vcpus),
        state.VMState(s.memory_bytes, 2, "hotset", s.seed, None, {"hot_fraction": "x"}, s.vcpus),
        state.VMState(s.memory_bytes, 2, s.workload, s.seed, float("nan"), {}, s.vcpus),
        state.VMState(s.memory_bytes, 2, s.workload, -1, None, {}, s.vcpus),
    ):
        with pytest.raises(StateFormatError):
            blank.import_state(bad.pack())
    wrong_version = bytearray(blob)
    wrong_version[8] = 9
    with pytest.raises(StateFormatError, match="version 9"):
        blank.import_state(bytes(wrong_version))
    with pytest.raises(StateFormatError, match="trailing"):
        body = blob[24:] + b"x"
        blank.import_state(struct.pack("<8sHHIQ", b"LMVMSTAT", 1, 0, len(body),
                                       xxhash.xxh64_intdigest(body)) + body)


# -- snapshots -----------------------------------------------------------------
@pytest.fixture
def snap(tmp_path):
    with VM("4MiB", 1, "sweep", seed=4) as vm:
        vm.run_to(20_000)
        path = tmp_path / "vm.snap"
        size = snapshot.save(vm, path)
        assert os.path.getsize(path) == size < 4 * 2**20  # zero pages elided
        yield path, vm.digest()


def test_snapshot_round_trip(snap):
    path, digest = snap
    with snapshot.load(path) as vm:
        assert vm.digest() == digest and vm.steps() == [20_000]


@pytest.mark.parametrize("cut", [0, 10, 60, 200, -4097, -1])
def test_truncated_snapshot_is_refused(snap, cut):
    path, _ = snap
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(StateFormatError):
        snapshot.load(path)


@pytest.mark.parametrize("where", ["header", "state", "page"])
def test_corrupted_snapshot_is_refused(snap, where):
    path, _ = snap
    data = bytearray(path.read_bytes())
    pos = {"header": 30, "state": snapshot.HEADER_BYTES + 40, "page": len(data) - 100}[where]
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StateFormatError):
        snapshot.load(path)


def test_snapshot_of_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with VM("4MiB", 1, "sweep") as vm:
        vm.run_to(1000)
        with pytest.raises(SnapshotError, match="no space left"):
            snapshot.save(vm, tmp_path / "full.snap")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary


def test_snapshot_refuses_a_running_vm_and_a_missing_file(tmp_path):
    with VM("4MiB", 1, "sweep", dirty_rate="1MiB/s") as vm:
        vm.start()
        with pytest.raises(VMBusy):
            snapshot.save(vm, tmp_path / "x.snap")
        vm.pause()
    with pytest.raises(SnapshotError):
        snapshot.load(tmp_path / "missing.snap")


@pytest.mark.parametrize("kwargs", [
    dict(vcpus=0), dict(vcpus=300), dict(memory="12KiB", vcpus=2), dict(workload="nope"),
    dict(workload="hotset", params={"hot_fraction": 0}), dict(workload="idle", dirty_rate="1MiB/s"),
    dict(workload="sweep", params={"stride": 2}), dict(seed=-1), dict(memory="1000"),
])
def test_bad_vm_configs_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        VM(**{"memory": "1MiB", **kwargs}).close()

"""The tracker contract with real guests: running vCPUs write while we collect.

A shadow copy is assembled only from the pages each collect reports (copied
right after the collect, while the guest keeps writing). After the vCPUs are
paused and a last collect is applied, the shadow must equal guest memory byte
for byte: any write the tracker lost would leave a stale page behind.
"""
import json

import numpy as np
import pytest

from livemig.analysis import probe
from livemig.native import PAGE_SIZE
from livemig.native.tracking import open_tracker
from livemig.vm.machine import VM
from support.waiting import wait_for

BACKENDS = [
    pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}"))
    for name, ok, reason in probe.backends_to_test()
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", ["uniform", "memtest", "sweep"])
def test_shadow_from_collected_pages_equals_memory(backend, workload):
    with VM(memory="32MiB", vcpus=2, workload=workload, dirty_rate="64MiB/s", seed=3) as vm, \
            open_tracker(vm.memory, backend) as trk:
        shadow = vm.memory.pages.copy()
        trk.start()
        vm.start()
        reported = rounds = 0

        def collect_round():
            nonlocal reported, rounds
            dirty = trk.collect().astype(np.int64)
            reported += dirty.size
            rounds += 1
            shadow[dirty] = vm.memory.pages[dirty]
            return rounds >= 6 and reported >= 1000

        wait_for("six collect rounds over 1000 pages the guest wrote", collect_round)
        vm.pause()
        dirty = trk.collect().astype(np.int64)
        shadow[dirty] = vm.memory.pages[dirty]
        trk.stop()
        stale = np.flatnonzero((shadow != vm.memory.pages).any(axis=1))
        assert stale.size == 0, f"{backend} lost writes to pages {stale[:10].tolist()}"
        vm.check_guest()


def test_vm_run_reports_dirty_rate(capsys):
    from livemig.cli import main

    rc = main(["vm", "run", "--memory", "32MiB", "--workload", "uniform", "--dirty-rate",
               "8MiB/s", "--seconds", "1.0", "--interval", "0.5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tracker"] in ("uffd-async", "uffd-wp", "mprotect")
    assert out["samples"] and out["mean_dirty_bytes_per_s"] > 0
    # The guest is paced: all it can have dirtied by the last sample is the
    # rate over the run plus its catch-up allowance. (How close to the target
    # a loaded machine lets it get is a question for bench/.)
    dirtied = sum(s["dirty_pages"] for s in out["samples"]) * PAGE_SIZE
    assert dirtied <= (8 << 20) * (out["samples"][-1]["t_s"] + 0.1), out["samples"]


def test_probe_command_json_and_text(capsys):
    from livemig.cli import main

    assert main(["probe", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["trackers"]) == {"uffd-async", "uffd-wp", "mprotect"}
    assert report["auto"] in report["trackers"] and report["auto_reason"]
    assert report["trackers"][report["auto"]]["available"]
    assert set(report["postcopy"]) >= {"available", "reason"}
    assert main(["probe"]) == 0
    text = capsys.readouterr().out
    assert "mprotect" in text and "auto choice" in text and "post-copy" in text

"""Dirty-rate measurement against the workload's configured rate."""
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from livemig.analysis.dirtyrate import BLOCK_PAGES, hot_block_share, measure_dirty_rate
from livemig.errors import ConfigError
from livemig.native.tracking import open_tracker
from livemig.vm.machine import VM
from support.waiting import wait_for

MIB = 1 << 20
RATE_BPS = 16 * MIB   # one vCPU does ~250 MiB/s unpaced: well below its maximum


@pytest.fixture(scope="module")
def uniform_vm():
    with VM(memory="256MiB", vcpus=1, workload="uniform", dirty_rate=RATE_BPS, seed=7) as vm:
        vm.start()
        time.sleep(0.1)   # a head start; the tests compare with the guest's own count
        yield vm
        vm.pause()
        vm.check_guest()


def test_tracker_measures_the_configured_rate(uniform_vm):
    r = measure_dirty_rate(uniform_vm, 1.0)
    assert r.method == "tracker" and r.tracker
    # Against the guest's own store count over the same window: how close a
    # paced guest gets to its target on a loaded machine is not the question.
    assert abs(r.bytes_per_s - r.guest_dirty_rate_bps) <= 0.2 * r.guest_dirty_rate_bps, r
    assert r.interval_pages >= r.dirty_pages
    assert 0.8 < r.distinct_per_store <= 1.0
    # uniform writes: the hottest 10 % of blocks hold little more than 10 % of them
    assert r.hot_block_share < 0.3


def test_hash_sampling_while_a_tracker_is_armed(uniform_vm):
    with open_tracker(uniform_vm.memory) as trk:   # as a migration would hold one
        trk.start()
        r = measure_dirty_rate(uniform_vm, 1.0, seed=3)
        trk.stop()
    assert r.method == "hash-sample" and r.sampled_pages >= 4096
    assert r.dirty_pages > 0, r
    # within 20 %, or four standard errors of the sample if the guest wrote little
    tolerance = max(0.2, 4 * r.relative_error)
    assert abs(r.bytes_per_s - r.guest_dirty_rate_bps) <= tolerance * r.guest_dirty_rate_bps, r
    with open_tracker(uniform_vm.memory) as trk:
        trk.start()
        with pytest.raises(ConfigError, match="hash-sample"):
            measure_dirty_rate(uniform_vm, 0.1, method="tracker")
        trk.stop()


def test_hot_set_is_concentrated():
    with VM(memory="128MiB", vcpus=1, workload="hotset", dirty_rate=8 * MIB) as vm:
        vm.start()
        # Rewrites show only once the hot set has taken enough stores: about
        # 1000 in a window at this rate, fewer if the guest was starved of CPU.
        r = wait_for("a 0.5 s window in which the guest stored 800 times",
                     lambda: (m := measure_dirty_rate(vm, 0.5)).guest_stores >= 800 and m)
        vm.pause()
    assert r.hot_block_share > 0.6
    assert r.distinct_per_store < 0.95   # hot pages are rewritten


def test_idle_vm_dirties_nothing():
    with VM(memory="32MiB", vcpus=1, workload="idle") as vm:
        vm.start()
        r = measure_dirty_rate(vm, 0.3)
        vm.pause()
    assert r.dirty_pages == 0 and r.bytes_per_s == 0 and r.hot_block_share is None


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"window_s": -1}, {"method": "magic"}])
def test_bad_arguments(kwargs):
    with VM(memory="8MiB", vcpus=1, workload="idle") as vm:
        with pytest.raises(ConfigError):
            measure_dirty_rate(vm, **{"window_s": 0.1, **kwargs})


@given(st.lists(st.integers(0, 64 * BLOCK_PAGES - 1), min_size=1, max_size=500, unique=True))
def test_hot_block_share_bounds(pages):
    share, touched = hot_block_share(np.array(sorted(pages)), 64 * BLOCK_PAGES)
    # 10 % of 64 blocks = 7 blocks (rounded up); the 7 fullest of the touched
    # blocks hold at least their proportional share 7/touched of the pages
    assert 0 < share <= 1.0 and 1 <= touched <= 64
    assert share >= min(1.0, 7 / touched) - 1e-9

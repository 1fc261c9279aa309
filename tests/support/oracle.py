"""The determinism oracle for migration tests.

A migrated VM is compared with a twin that never moved: both are run to the
same step on every vCPU, then memory digest, registers and console output of
each vCPU must be identical and neither guest may have faulted (the memtest
guest faults by itself when it finds a corrupted page).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from livemig.native import PAGE_SIZE
from livemig.vm.machine import VM
from support.waiting import PATIENCE_S, wait_for_async

AHEAD_STEPS = 200_000
FILL_STEPS = 1_000_000
"""A step by which every writing workload of a 16 MiB VM has written nearly
all of its pages (memtest, the slowest to cover them, needs about 700k)."""


@dataclass(frozen=True)
class Recipe:
    """How to build the twin of a VM: everything that decides its behaviour."""

    memory: int | str = "32MiB"
    vcpus: int = 2
    workload: str = "uniform"
    seed: int = 0
    dirty_rate: str | float | None = None
    params: dict | None = None
    fill_seed: int | None = None
    """Fill the data pages with random bytes from this seed before the guest
    starts: incompressible memory, so the link rather than the codec limits
    the migration (not for memtest, whose pages carry checksums)."""

    def build(self, *, paced: bool = True) -> VM:
        vm = VM(self.memory, self.vcpus, self.workload,
                dirty_rate=self.dirty_rate if paced else None, seed=self.seed,
                params=self.params)
        if self.fill_seed is not None:
            start = vm.layout.data_first_page(0) * PAGE_SIZE
            noise = np.random.default_rng(self.fill_seed).bytes(vm.memory.length_bytes - start)
            vm.memory.bytes[start:] = np.frombuffer(noise, dtype=np.uint8)
        return vm


def fill_then_start(vm: VM, step: int = FILL_STEPS) -> None:
    """Run a fresh VM unpaced to ``step``, then start it at its own pace.

    Unlike letting the guest run for a while, this leaves the same memory
    however loaded the machine is (a starved guest leaves zero pages, which
    cost nothing to move). Pacing is timing only: an unmoved twin run
    straight to a later step still agrees."""
    rate = vm.dirty_rate
    vm.set_dirty_rate(None)
    vm.run_to(step)
    vm.set_dirty_rate(rate)
    vm.start()


def observe(vm: VM) -> dict:
    vm.check_guest()
    return {"digest": vm.digest(), "steps": vm.steps(),
            "registers": [vm.registers(i) for i in range(vm.nvcpus)],
            "console": [vm.console(i) for i in range(vm.nvcpus)]}


def assert_matches_unmoved(moved: VM, recipe: Recipe, *, ahead_steps: int = AHEAD_STEPS,
                           timeout_s: float = PATIENCE_S) -> int:
    """Run ``moved`` and a never-moved twin to the same step; assert identical.

    Pacing and throttle are timing only, so both run unpaced to get there
    quickly. Returns the step compared at."""
    moved.pause()
    moved.set_dirty_rate(None)
    moved.set_throttle(0)
    moved.check_guest()
    target = max(moved.steps()) + ahead_steps
    moved.run_to(target, timeout_s=timeout_s)
    got = observe(moved)
    with recipe.build(paced=False) as twin:
        twin.run_to(target, timeout_s=timeout_s)
        want = observe(twin)
    assert got["steps"] == want["steps"] == [target] * moved.nvcpus
    assert got["digest"] == want["digest"], "memory digest differs from the unmoved twin"
    for i in range(moved.nvcpus):
        assert got["registers"][i] == want["registers"][i], f"vCPU {i} registers differ"
        assert got["console"][i] == want["console"][i], f"vCPU {i} console differs"
    return target


async def assert_arrival_matches_unmoved(server, recipe: Recipe, *,
                                         timeout_s: float = PATIENCE_S):
    """Take the next VM that arrived at ``server`` (a MigrationServer), check it
    against a never-moved twin of ``recipe``, and close it."""
    _, moved = await asyncio.wait_for(server.completed.get(), timeout_s)
    try:
        assert_matches_unmoved(moved, recipe)
    finally:
        moved.close()


async def moved_and_checked(recipe: Recipe, server, migrate_vm, *,
                            timeout_s: float = PATIENCE_S):
    """Build and start a VM of ``recipe``, move it with ``await
    migrate_vm(vm)`` (the source's stats, which must say completed), check
    the VM that arrived at ``server`` against a never-moved twin, close both.
    Returns (source stats, arrival stats)."""
    vm = recipe.build()
    try:
        vm.start()
        await wait_for_async("the guest to run", lambda: min(vm.steps()) > 0)
        stats = await migrate_vm(vm)
        assert stats.status == "completed", stats.error
        arrival, moved = await asyncio.wait_for(server.completed.get(), timeout_s)
        try:
            assert_matches_unmoved(moved, recipe)
        finally:
            moved.close()
        return stats, arrival.stats
    finally:
        vm.close()

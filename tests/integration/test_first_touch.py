"""Fresh guest memory at a pre-copy destination is filled without zeroing.

On native streams the destination registers the new VM's memory with
userfaultfd and places each page's first version with UFFDIO_COPY
(native/firsttouch.py); a zero-fill thread serves every other access, so the
Python side and the guest see ordinary memory. Each migration is checked
against a twin that never moved; where the fill cannot run the memory is
pre-faulted as before and the stats say why.
"""
import numpy as np
import pytest

from livemig.config import MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.errors import BackendUnavailable
from livemig.native import postcopy
from livemig.native import firsttouch
from livemig.native.firsttouch import HOW, FirstTouchFill
from livemig.native.memory import GuestMemory
from livemig.native.streams import probe
from support.oracle import Recipe, moved_and_checked
from support.relay import LOCAL

OK, WHY = probe()
UFFD = postcopy.probe()
pytestmark = pytest.mark.skipif(not (OK and UFFD.missing),
                                reason=f"native streams: {WHY}; userfaultfd: {UFFD.reason}")
# Random memory written while it moves: pages arrive absent (round 0) and
# present (later rounds, BLOCK and RAW); the idle recipe leaves zero pages
# never sent.
UNIFORM = Recipe("32MiB", 2, "uniform", seed=71, dirty_rate="24MiB/s", fill_seed=8)
MEMTEST = Recipe("16MiB", 2, "memtest", seed=72, dirty_rate="24MiB/s")


async def _moved(recipe: Recipe, config: MigrationConfig, server):
    return await moved_and_checked(
        recipe, server, lambda vm: migrate(vm, LOCAL, server.port, config=config, name="f"))


@pytest.fixture
def uffd_fill(monkeypatch):
    """The fill, whatever fresh memory costs on this machine right now."""
    monkeypatch.setenv(firsttouch.ENV_SWITCH, "uffd")


@pytest.mark.parametrize("recipe", [UNIFORM, MEMTEST], ids=["uniform", "memtest"])
def test_first_versions_land_without_zeroing_and_arrive_identical(run, recipe, uffd_fill):
    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            return await _moved(recipe, MigrationConfig(streams=2), server)
    src, dst = run(main())
    assert dst.first_touch == HOW
    assert src.data_path == dst.data_path == "native-streams ×2"


def test_hybrid_registers_for_post_copy_after_the_fill(run, uffd_fill):
    """The fill is unregistered before post-copy registers the same memory."""
    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            cfg = MigrationConfig(streams=2, mode="hybrid", hybrid_postcopy_after_rounds=1,
                                  max_downtime_ms=0.001)
            return await _moved(UNIFORM, cfg, server)
    src, dst = run(main())
    assert dst.first_touch == HOW and src.mode == "hybrid"


def test_without_userfaultfd_memory_is_pre_faulted_and_says_why(run, monkeypatch, uffd_fill):
    def refuse(memory):
        raise BackendUnavailable("first-touch fill", "userfaultfd refused (test)")
    monkeypatch.setattr(firsttouch, "FirstTouchFill", refuse)

    async def main():
        async with MigrationServer(LOCAL, 0) as server:
            return await _moved(UNIFORM, MigrationConfig(streams=2), server)
    src, dst = run(main())
    assert dst.first_touch == "pre-faulted: userfaultfd refused (test)"


def test_other_accesses_see_ordinary_memory_while_the_fill_runs():
    """Python reading and writing pages no stream placed neither blocks nor
    sees anything but zeros and its own writes; after close the region is
    plain memory."""
    mem = GuestMemory(64 * 4096)
    try:
        fill = FirstTouchFill(mem)
        try:
            pages = mem.pages
            assert not pages[3].any()          # a read of an absent page: the zero page
            pages[5][:8] = np.arange(8, dtype=np.uint8)    # a write: copy-on-write
            assert list(pages[5][:8]) == list(range(8))
        finally:
            fill.close()
        assert fill.zero_filled_pages >= 2
        pages[7][0] = 1
        assert pages[7][0] == 1 and list(pages[5][:8]) == list(range(8))
    finally:
        mem.close()


def test_fresh_memory_cheap_enough_is_pre_faulted_and_says_so(run, monkeypatch):
    """Unless the environment decides, each offer measures what fresh memory
    costs here: at or under the threshold it is pre-faulted (and the stats
    give the figure), above it the fill runs."""
    assert firsttouch.prefault_reason(None) is None          # not measurable: the fill
    assert firsttouch.prefault_reason(0.5) is None
    assert "0.05 CPU s/GiB measured" in firsttouch.prefault_reason(0.05)
    monkeypatch.setenv(firsttouch.ENV_SWITCH, "uffd")
    assert firsttouch.prefault_reason(0.05) is None
    monkeypatch.setenv(firsttouch.ENV_SWITCH, "prefault")
    assert firsttouch.prefault_reason(5.0) == "LIVEMIG_FIRST_TOUCH=prefault"
    monkeypatch.delenv(firsttouch.ENV_SWITCH)
    cost = firsttouch.fresh_memory_cost_s_per_gib()
    assert cost is None or cost > 0

    for measured, expect in ((0.01, "pre-faulted: fresh memory is cheap here"), (9.0, HOW)):
        monkeypatch.setattr(firsttouch, "cost_unless_decided", lambda m=measured: m)

        async def main():
            async with MigrationServer(LOCAL, 0) as server:
                return await _moved(MEMTEST, MigrationConfig(streams=2), server)
        src, dst = run(main())
        assert dst.first_touch.startswith(expect), dst.first_touch

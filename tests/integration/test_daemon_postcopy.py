"""Daemon control commands for post-copy: migrate --mode, postcopy VM, recover VM."""
import asyncio

import pytest

from livemig.native import postcopy
from livemig.errors import ControlError
from support.inprocess import started_daemons
from support.waiting import PATIENCE_S

pytestmark = pytest.mark.skipif(not postcopy.probe().missing,
                                reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")


def test_switch_a_running_precopy_migration_to_postcopy(run, tmp_path):
    async def scenario():
        async with started_daemons(tmp_path, "a", "b") as (a, b):
            ha, hb = a._handlers(), b._handlers()
            await ha["vm.start"](name="vm1", memory="16MiB", vcpus=2, workload="uniform",
                                 dirty_rate="64MiB/s")
            # a downtime limit pre-copy cannot meet: it would run all its rounds
            rec = await ha["migrate"](name="vm1", to=f"127.0.0.1:{b.listen_port}",
                                      mode="precopy", downtime_ms=0.001, max_rounds=1000,
                                      max_bandwidth_bps=32 << 20)
            await asyncio.sleep(0.2)   # some pre-copy first; it cannot end by itself
            asked = await ha["migration.postcopy"](vm="vm1")
            assert asked["id"] == rec["id"]
            done = await ha["migration.wait"](id=rec["id"], timeout_s=PATIENCE_S)
            assert done["status"] == "completed", done
            assert done["stats"]["postcopy"]["duration_ms"] > 0
            assert [v["name"] for v in await hb["vm.list"]()] == ["vm1"]
            assert await ha["vm.list"]() == []
            with pytest.raises(ControlError):
                await ha["migration.recover"](vm="vm1")   # nothing to recover any more

    run(scenario())

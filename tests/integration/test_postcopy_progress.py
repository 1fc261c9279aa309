"""Live post-copy progress on the native urgent path: the fault counters the
native threads keep reach ``status`` while post-copy runs, not at its end."""
import asyncio
import time

import pytest

from livemig.native import postcopy
from livemig.native.urgent import probe as native_probe
from support.inprocess import started_daemons
from support.waiting import PATIENCE_S

pytestmark = [
    pytest.mark.skipif(not postcopy.probe().missing,
                       reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}"),
    pytest.mark.skipif(not native_probe()[0], reason=f"no native urgent path: {native_probe()[1]}"),
]


def test_status_shows_faults_before_postcopy_completes(run, tmp_path):
    async def scenario():
        async with started_daemons(tmp_path, "a", "b") as (a, b):
            ha = a._handlers()
            # the guest writes everywhere at once; the pushed pages trickle
            # through a narrow cap, so post-copy lasts while the guest faults
            await ha["vm.start"](name="vm1", memory="64MiB", vcpus=2, workload="uniform",
                                 dirty_rate="64MiB/s")
            rec = await ha["migrate"](name="vm1", to=f"127.0.0.1:{b.listen_port}",
                                      mode="postcopy", max_bandwidth_bps=4 << 20)
            seen = None
            deadline = time.monotonic() + PATIENCE_S
            while seen is None:
                now = await ha["status"](id=rec["id"])
                assert now["status"] in ("setup", "active", "postcopy-active"), now
                p = now.get("progress") or {}
                if now["status"] == "postcopy-active" and (p.get("fault_rate_pps") or 0) > 0:
                    seen = now
                assert time.monotonic() < deadline, f"no fault rate while active: {now}"
                await asyncio.sleep(0.05)
            assert seen["progress"]["owed_pages"] > 0
            done = await ha["migration.wait"](id=rec["id"], timeout_s=PATIENCE_S)
            assert done["status"] == "completed", done
            assert done["stats"]["postcopy"]["fault_path"] == "native", done["stats"]
            assert done["stats"]["postcopy"]["urgent_requests"] > 0

    run(scenario())

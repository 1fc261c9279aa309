"""What `vm list` and `status` show beyond running/paused: a VM arriving in
post-copy (with the pages still owed) and a guest that found corruption."""
import asyncio

import numpy as np
import pytest

from livemig.cli.vm import format_vms
from livemig.native import PAGE_SIZE, postcopy
from livemig.service.daemon import Daemon, HostedVM
from support.oracle import Recipe, assert_matches_unmoved
from support.waiting import PATIENCE_S

LOCAL = "127.0.0.1"

# Incompressible memory, and a guest that touches few pages once it runs at
# the destination: the capped push, not the guest's faults, fetches the rest.
RECIPE = Recipe(memory="16MiB", vcpus=2, workload="uniform", dirty_rate="64KiB/s", seed=7,
                fill_seed=11)
PUSH_CAP_BPS = 256 << 10     # 16 MiB at 256 KiB/s: about a minute in post-copy unless lifted


async def _until(what: str, probe):
    """Await ``probe()`` until it returns something truthy; fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + PATIENCE_S
    while not (got := await probe()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return got


async def _pair(tmp_path):
    a = Daemon(listen=f"{LOCAL}:0", control_path=str(tmp_path / "a.sock"),
               state_dir=str(tmp_path / "state"))
    b = Daemon(listen=f"{LOCAL}:0", control_path=str(tmp_path / "b.sock"),
               state_dir=str(tmp_path / "state"))
    await a.start()
    await b.start()
    return a, b


@pytest.mark.skipif(not postcopy.probe().missing,
                    reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
def test_destination_lists_a_postcopy_arrival_with_the_pages_owed(run, tmp_path):
    async def scenario():
        a, b = await _pair(tmp_path)
        try:
            ha, hb = a._handlers(), b._handlers()
            vm = RECIPE.build()
            vm.start()
            a.vms["vm1"] = HostedVM("vm1", vm, origin="local")
            rec = await ha["migrate"](name="vm1", to=f"{LOCAL}:{b.listen_port}",
                                      mode="postcopy", max_bandwidth_bps=PUSH_CAP_BPS)

            async def arriving():
                return next((v for v in await hb["vm.list"]() if v["name"] == "vm1"), None)

            async def listed_in_postcopy():
                v = await arriving()
                return v if v is not None and v["state"] == "postcopy" else None

            seen = await _until("vm1 listed in post-copy at the destination",
                                listed_in_postcopy)
            npages = vm.memory.npages
            assert 0 < seen["owed_pages"] <= npages
            assert seen["owed_bytes"] == seen["owed_pages"] * PAGE_SIZE
            assert seen["running"] and seen["health"]["status"] == "ok"
            assert seen["origin"].startswith("migrating from")
            # The same in `status`, human and JSON, and in the incoming record.
            status = await hb["status"]()
            assert [v["state"] for v in status["vms"]] == ["postcopy"]
            (incoming,) = status["migrations"]
            assert incoming["status"] == "postcopy-active"
            assert incoming["progress"]["owed_pages"] > 0
            table = format_vms(status["vms"])
            assert "postcopy" in table and "pages (" in table and "still owed" in table
            # Commands that need the whole VM say why they must wait.
            with pytest.raises(Exception, match="post-copy"):
                await hb["vm.pause"](name="vm1")
            # Lift the cap: the push finishes and the VM is listed as running.
            await ha["migration.set"](key=rec["id"], unlimited_bandwidth=True)
            done = await ha["migration.wait"](id=rec["id"], timeout_s=PATIENCE_S)
            assert done["status"] == "completed", done

            async def whole():
                v = await arriving()
                return v if v is not None and v["state"] == "running" else None

            listed = await _until("vm1 listed whole at the destination", whole)
            assert listed["owed_pages"] is None and listed["owed_bytes"] is None
            assert await ha["vm.list"]() == []
            moved = b.vms["vm1"].vm
            await asyncio.get_running_loop().run_in_executor(
                None, assert_matches_unmoved, moved, RECIPE)
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_memtest_corruption_shows_in_the_listing_and_status(run, tmp_path):
    async def scenario():
        a = Daemon(listen=f"{LOCAL}:0", control_path=str(tmp_path / "a.sock"),
                   state_dir=str(tmp_path / "state"))
        await a.start()
        try:
            h = a._handlers()
            await h["vm.start"](name="mt", memory="8MiB", vcpus=2, workload="memtest")
            (v,) = await h["vm.list"]()
            assert v["health"] == {"status": "ok", "errors": 0, "since_step": None,
                                   "faults": [], "summary": "ok"}
            assert "HEALTH" in format_vms([v]) and "health:" not in format_vms([v])
            # Behind the guest's back: one word of every data page of vCPU 0.
            vm = a.vms["mt"].vm
            words = np.frombuffer(vm.memory.bytes, dtype=np.uint64)
            first = vm.layout.data_first_page(0)
            last = vm.layout.data_first_page(1)
            words[first * 512 + 5:last * 512:512] ^= 0x5A5A

            async def corrupt():
                (v,) = await h["vm.list"]()
                return v if v["health"]["status"] == "corrupt" else None

            got = await _until("the corruption to show in the listing", corrupt)
            health = got["health"]
            assert health["errors"] >= 1 and health["since_step"] > 0
            fault = next(f for f in health["faults"] if f["vcpu"] == 0)
            assert first * PAGE_SIZE <= fault["page"] < last * PAGE_SIZE
            assert health["summary"].startswith("corrupt (")
            assert f"since step {health['since_step']}" in health["summary"]
            status = await h["status"]()
            assert status["vms"][0]["health"]["status"] == "corrupt"
            table = format_vms(status["vms"])
            assert "corrupt" in table.splitlines()[1]
            assert f"health: {health['summary']}" in table
        finally:
            await a.close()

    run(scenario())


@pytest.mark.skipif(not postcopy.probe().missing,
                    reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
def test_a_recovered_postcopy_break_leaves_no_note_once_completed(run, tmp_path):
    from support.frameproxy import Fault, FrameProxy

    async def scenario():
        a, b = await _pair(tmp_path)
        # The 20th page batch towards the destination resets every connection:
        # a break in post-copy, which the peers recover from.
        proxy = await FrameProxy(LOCAL, b.listen_port,
                                 Fault("cut", "PageBatch", "up", occurrence=20)).start()
        try:
            ha, hb = a._handlers(), b._handlers()
            vm = RECIPE.build()
            vm.start()
            a.vms["vm1"] = HostedVM("vm1", vm, origin="local")
            rec = await ha["migrate"](name="vm1", to=f"{LOCAL}:{proxy.port}", mode="postcopy",
                                      max_bandwidth_bps=PUSH_CAP_BPS)

            async def recovered(handlers):
                (m,) = (await handlers["status"]())["migrations"]
                return m if m["status"] == "postcopy-active" \
                    and m["stats"]["postcopy"]["recoveries"] >= 1 else None

            # Reconnected, still in post-copy (the cap holds it there): the
            # note of the break is gone on both sides.
            for handlers in (ha, hb):
                m = await _until("a recovered post-copy", lambda: recovered(handlers))
                assert m["error"] is None and m["stats"]["error"] is None, m
            assert [v["state"] for v in await hb["vm.list"]()] == ["postcopy"]
            await ha["migration.set"](key=rec["id"], unlimited_bandwidth=True)
            done = await ha["migration.wait"](id=rec["id"], timeout_s=PATIENCE_S)
            assert proxy.fired.is_set()
            assert done["status"] == "completed", done
            assert done["stats"]["postcopy"]["recoveries"] >= 1
            assert done["error"] is None and done["stats"]["error"] is None

            async def incoming_done():
                ms = (await hb["status"]())["migrations"]
                return ms if ms and ms[0]["status"] == "completed" else None

            (incoming,) = await _until("the destination to complete", incoming_done)
            assert incoming["error"] is None and incoming["stats"]["error"] is None
            for daemon in (a, b):
                (row,) = daemon.history.read(None)
                assert row["status"] == "completed" and row["error"] is None, row
        finally:
            await proxy.close()
            await a.close()
            await b.close()

    run(scenario())

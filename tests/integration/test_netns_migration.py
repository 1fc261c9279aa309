"""Two hosts: daemons in their own network namespaces, mutual TLS, a shaped link.

The VM migrated across is checked against one that never moved: memory digest,
registers and console at the same step (and the memtest guest checks itself).
"""
import time

import pytest

from livemig.lab import netns
from livemig.lab.sweep import two_hosts
from support.oracle import Recipe

OK, WHY = netns.available(need_delay=True)
pytestmark = pytest.mark.skipif(not OK, reason=f"two-host link with delay unavailable: {WHY}")

RECIPE = Recipe("32MiB", 1, "memtest", seed=11, dirty_rate="4MiB/s")
RUN_AHEAD_STEPS = 20_000


def _reference(step: int) -> dict:
    """The never-moved twin at ``step``: built parked, run straight there."""
    with RECIPE.build(paced=False) as vm:
        vm.run_to(step, timeout_s=60)
        return {"digest": vm.digest().hex(), "cpus": [vm.registers(0)],
                "console": [vm.console(0).hex()]}


def test_migration_across_a_shaped_tls_link(tmp_path):
    with two_hosts(str(tmp_path), "netns", delay_ms=2.0, prefix="lmmig") as hosts:
        assert hosts.method == "netns" and hosts.tls
        hosts.set_bandwidth(200e6)        # 200 Mbit/s, 2 ms each way
        assert hosts.link.rate_bps == 200e6 and hosts.link.delay_ms == 2.0
        src, dst = hosts.src, hosts.dst
        src.call("vm.start", name="m", memory=RECIPE.memory, vcpus=RECIPE.vcpus,
                 workload=RECIPE.workload, dirty_rate=RECIPE.dirty_rate, seed=RECIPE.seed)
        time.sleep(0.2)   # the guest dirties memory; nothing below depends on how much
        rec = src.call("migrate", name="m", to=hosts.dst_addr, wait=True,
                       server_hostname=hosts.server_hostname)
        while rec["status"] in ("setup", "active"):
            rec = src.call("migration.wait", id=rec["id"], timeout_s=10)
        assert rec["status"] == "completed", rec.get("error")
        stats = rec["stats"]
        assert stats["converged"] and stats["downtime_ms"] > 4.0   # at least one RTT
        assert src.call("vm.list") == []
        [moved] = dst.call("vm.list")
        assert moved["origin"].startswith("migrated from") and moved["running"]
        # Paused first: a running guest could pass the target between reading
        # its steps and asking it to stop there.
        target = max(dst.call("vm.pause", name="m")["steps"]) + RUN_AHEAD_STEPS
        dst.call("vm.run_to", name="m", step=target, timeout_s=60)
        got = dst.call("vm.inspect", name="m")
        dst.call("vm.stop", name="m")
    ref = _reference(target)
    assert got["digest"] == ref["digest"]
    assert got["cpus"] == ref["cpus"] and got["console"] == ref["console"]
    assert not [ns for ns in netns.list_namespaces() if ns.startswith("lmmig-")]

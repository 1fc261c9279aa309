"""The fleet planner: destinations, modes, schedule; and the simulator."""
import math

import pytest

from livemig.fleet.planner import (HostState, VMState, choose_mode, plan_balance, plan_drain,
                                   rank_hosts)
from livemig.fleet.simulate import generate, simulate

GIB, MIB = 1 << 30, 1 << 20
LINK = 1e9 / 8


def _hosts(n, mem=64 * GIB, cpus=16):
    return [HostState(f"h{i}", mem, mem, cpus) for i in range(n)]


def _put(hosts, vms):
    by = {h.addr: h for h in hosts}
    for v in vms:
        by[v.host].memory_free_bytes -= v.memory_bytes
        by[v.host].vcpus_used += v.vcpus
    return vms


def test_drain_moves_every_vm_off_and_never_onto_the_drained_host():
    hosts = _hosts(4)
    vms = _put(hosts, [VMState(f"v{i}", "h0", (1 + i % 4) * GIB, 2) for i in range(12)])
    plan = plan_drain(hosts, vms, "h0", link_bps=LINK)
    assert {m.vm for m in plan.moves} == {v.name for v in vms} and not plan.unplaced
    assert all(m.source == "h0" and m.destination in ("h1", "h2", "h3") for m in plan.moves)
    # largest first, spread by headroom: each destination gets a share
    assert plan.moves[0].memory_bytes == 4 * GIB
    assert {m.destination for m in plan.moves} == {"h1", "h2", "h3"}


def test_drain_skips_lost_and_draining_hosts_and_says_what_does_not_fit():
    hosts = _hosts(3, mem=8 * GIB)
    hosts[1].live = False
    vms = _put(hosts, [VMState("big", "h0", 6 * GIB), VMState("huge", "h0", 2 * GIB)])
    hosts[2].memory_free_bytes = 7 * GIB
    plan = plan_drain(hosts, vms, "h0", link_bps=LINK)
    assert [m.vm for m in plan.moves] == ["big"] and plan.moves[0].destination == "h2"
    assert "huge" in plan.unplaced and "memory" in plan.unplaced["huge"]
    hosts = _hosts(3)
    vms = _put(hosts, [VMState("v", "h0", GIB)])
    plan = plan_drain(hosts, vms, {"h0", "h1"}, link_bps=LINK)
    assert plan.moves[0].destination == "h2"


def test_mode_follows_dirty_rate_against_the_link():
    assert choose_mode(GIB, 1 * MIB, LINK, 300).converges
    assert choose_mode(GIB, 1 * MIB, LINK, 300).recommended_mode == "precopy"
    fast = choose_mode(GIB, 2 * LINK, LINK, 300)
    assert fast.recommended_mode == "postcopy" and math.isfinite(fast.total_time_s)
    hosts = _hosts(2)
    vms = _put(hosts, [VMState("calm", "h0", GIB, 1, MIB), VMState("hot", "h0", GIB, 1, 2 * LINK)])
    modes = {m.vm: m.mode for m in plan_drain(hosts, vms, "h0", link_bps=LINK).moves}
    assert modes == {"calm": "precopy", "hot": "postcopy"}


def test_schedule_respects_the_per_host_limit():
    hosts = _hosts(5)
    vms = _put(hosts, [VMState(f"v{i}", "h0", GIB, 1, MIB) for i in range(8)])
    for limit in (1, 2, 4):
        plan = plan_drain([HostState(h.addr, h.memory_total_bytes, h.memory_free_bytes, h.cpus,
                                     h.vcpus_used) for h in hosts], vms, "h0",
                          link_bps=LINK, per_host_limit=limit)
        assert plan.peak_concurrent == limit
        for t in sorted({m.start_s for m in plan.moves}):
            at = [m for m in plan.moves if m.start_s <= t < m.end_s]
            assert len(at) <= limit
        assert plan.total_time_s == max(m.end_s for m in plan.moves)
        # a shared NIC: concurrency cannot beat the link, nor cost more than serial
        assert plan.total_time_s <= plan.sum_single_s * (1 + 1e-9) * limit
    with pytest.raises(ValueError):
        plan_drain(_hosts(2), [], "h0", link_bps=LINK, per_host_limit=0)


def test_balance_moves_cheap_vms_from_loaded_hosts_only_once():
    hosts = _hosts(4, mem=32 * GIB)
    vms = _put(hosts, [VMState(f"v{i}", "h0", 2 * GIB, 1, (i + 1) * MIB) for i in range(12)])
    plan = plan_balance(hosts, vms, link_bps=LINK, recently_moved={"v0"})
    moved = [m.vm for m in plan.moves]
    assert moved and len(moved) == len(set(moved)) and "v0" not in moved
    assert all(m.source == "h0" for m in plan.moves)
    assert moved[0] == "v1", "cheapest (lowest dirty rate) first"
    assert max(h.load() for h in hosts) < 24 / 32


def test_simulator_is_deterministic_and_reports_its_figures():
    hosts, vms = generate(50, 1000, seed=3)
    assert len(hosts) == 50 and len(vms) == 1000
    assert sum(h.memory_total_bytes - h.memory_free_bytes for h in hosts) == \
        sum(v.memory_bytes for v in vms)
    a = simulate(nhosts=50, nvms=1000, drain_hosts=3, seed=3)
    b = simulate(nhosts=50, nvms=1000, drain_hosts=3, seed=3)
    for k in ("moves", "predicted_total_time_s", "peak_concurrent", "bytes_moved"):
        assert a[k] == b[k]
    assert a["moves"] > 0 and a["unplaced"] == 0 and 1 <= a["peak_concurrent"] <= 3 * 2
    assert a["bytes_moved"] >= a["moves"] * GIB, "every VM's memory crosses at least once"
    bal = simulate(nhosts=50, nvms=1000, action="balance", seed=3)
    assert bal["moves"] > 0 and bal["planner_cpu_s"] >= 0


def test_a_new_vm_goes_to_the_most_headroom_never_a_draining_lost_or_full_host():
    hosts = _hosts(5)
    _put(hosts, [VMState("busy", "h0", 8 * GIB, 12), VMState("some", "h1", 8 * GIB, 4)])
    hosts[2].draining, hosts[3].live = True, False
    hosts[4].memory_free_bytes = GIB            # too full for an 8 GiB VM
    new = VMState("new", "", 8 * GIB, 2)
    assert [h.addr for h in rank_hosts(hosts, new)] == ["h1", "h0"]
    assert rank_hosts(hosts, VMState("huge", "", 100 * GIB, 2)) == []

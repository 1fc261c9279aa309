"""The balance controller's pure decisions (fleet/decision.py) and its fence."""
from livemig.fleet import keys
from livemig.fleet.controller import cmp_term
from livemig.fleet.decision import (REQUESTED, decide, held_by_window, log_entries,
                                    moved_record, settle, stale_hosts)
from livemig.fleet.etcd import b64
from livemig.fleet.planner import HostState, VMState

GIB, MIB = 1 << 30, 1 << 20
LINK = 1e9 / 8


def _fleet(on_h0=3, dirty=(1, 2, 3)):
    """h0 runs ``on_h0`` 1-vCPU VMs on 2 CPUs; h1 and h2 none."""
    hosts = [HostState(f"h{i}", 64 * GIB, 64 * GIB, 2) for i in range(3)]
    vms = [VMState(f"v{i}", "h0", 256 * MIB, 1, dirty[i] * MIB) for i in range(on_h0)]
    for v in vms:
        hosts[0].memory_free_bytes -= v.memory_bytes
        hosts[0].vcpus_used += v.vcpus
    return hosts, vms


def _decide(hosts, vms, **kw):
    args = {"held": set(), "pending": set(), "stale": [], "link_bps": LINK,
            "max_downtime_ms": 300.0, "per_host_limit": 2, **kw}
    return decide(hosts, vms, **args)


def test_an_imbalanced_fleet_moves_the_cheapest_vms_off_the_busiest_host():
    d = _decide(*_fleet())
    assert d.action == "move" and "h0" in d.reason
    assert [m.vm for m in d.plan.moves] == ["v0", "v1"]          # lowest dirty rate first
    assert {m.destination for m in d.plan.moves} == {"h1", "h2"}
    assert any("move v0 h0 -> " in line for line in d.lines())


def test_a_vm_in_the_window_is_never_moved_and_is_named():
    d = _decide(*_fleet(), held={"v0"})
    assert "v0" not in [m.vm for m in d.plan.moves] and d.plan.moves
    assert d.held == ["v0"] and "held by the window: v0" in d.lines()[-1]


def test_nothing_movable_is_balanced_with_the_reason():
    d = _decide(*_fleet(), held={"v0", "v1", "v2"})
    assert d.action == "balanced" and not d.plan.moves
    assert "nothing there may move" in d.reason and d.held == ["v0", "v1", "v2"]


def test_an_even_fleet_is_balanced():
    hosts = [HostState(f"h{i}", 64 * GIB, 64 * GIB, 2, vcpus_used=1) for i in range(3)]
    vms = [VMState(f"v{i}", f"h{i}", 256 * MIB) for i in range(3)]
    d = _decide(hosts, vms)
    assert d.action == "balanced" and "within 10%" in d.reason and not d.held


def test_pending_requests_and_stale_records_make_the_pass_wait():
    hosts, vms = _fleet()
    d = _decide(hosts, vms, pending={"h0"})
    assert d.action == "wait" and "still run at h0" in d.reason and not d.plan.moves
    d = _decide(hosts, vms, stale=["h1"])
    assert d.action == "wait" and "fresh records of h1" in d.reason


def test_one_live_host_has_nowhere_to_move():
    hosts, vms = _fleet()
    for h in hosts[1:]:
        h.live = False
    assert _decide(hosts, vms).action == "balanced"


def test_the_window_is_read_from_the_records():
    now = 1000.0
    records = {"old": {"until": 999.0}, "young": {"until": 1001.0},
               "oneshot": {"from": "a", "to": "b", "at": 10.0}}     # held while its key lives
    assert held_by_window(records, now) == {"young", "oneshot"}
    d = _decide(*_fleet())
    rec = moved_record(d.plan.moves[0], now=now, window_s=600, term=7)
    assert rec["until"] == 1600.0 and rec["term"] == 7 and rec["from"] == "h0"
    assert held_by_window({"v0": rec}, now + 599) == {"v0"}
    assert held_by_window({"v0": rec}, now + 600) == set()


def test_records_no_newer_than_the_moves_end_are_stale():
    assert stale_hosts({"a": 10, "b": 11, "c": 12}, 11) == ["a", "b"]
    assert stale_hosts({"a": 10}, 0) == []


def test_reports_settle_the_requested_moves():
    d = _decide(*_fleet())
    entries = log_entries(d, now=5.0, term=3)
    assert all(e["status"] == REQUESTED and e["term"] == 3 for e in entries)
    running = {"h0": {"state": "running", "vms": {"v0": {"status": "migrating"}}}}
    assert settle(entries, running) == entries
    done = {"h0": {"state": "done", "vms": {
        "v0": {"status": "completed", "mode": "precopy"},
        "v1": {"status": "failed", "error": "refused"}}}}
    got = {e["vm"]: e for e in settle(entries, done)}
    assert got["v0"]["status"] == "completed" and got["v0"]["mode"] == "precopy"
    assert got["v1"]["status"] == "failed" and got["v1"]["error"] == "refused"
    assert settle(entries, {"h0": {"state": "done", "vms": {}}})[0]["status"] == "unknown"
    # a settled entry is never changed again
    assert settle(settle(entries, done), {"h0": {"state": "done", "vms": {}}}) == \
        settle(entries, done)


def test_the_fence_compares_the_leader_keys_create_revision():
    assert cmp_term(42) == {"key": b64(keys.LEADER), "target": "CREATE", "result": "EQUAL",
                            "create_revision": "42"}

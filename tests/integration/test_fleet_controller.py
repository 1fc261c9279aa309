"""The always-on balance controller: a real etcd, candidate daemons as processes.

A deposed leader's fenced transaction fails (in-process, two candidates);
of three candidate daemons exactly one leads; the leader balances an
imbalanced fleet, every moved VM identical to a twin that never moved; a VM
it moved is not moved again within the window though its new host becomes
the busiest; SIGKILL of the leader hands the lead to another candidate, which
goes on from the state and window kept in etcd.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from livemig.fleet import keys
from livemig.fleet.controller import BalanceController, fenced, read_controller
from livemig.fleet.etcd import EtcdClient, op_put
from livemig.fleet.member import FleetMember
from support.daemons import assert_daemon_vm_matches_unmoved, livemig, start_vm
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import DaemonStub, etcd_call, fleet_daemon, fleet_rows, host, listed, vm_row
from support.oracle import Recipe
from support.waiting import wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
CANDIDATE = ("--balance-controller", "--balance-interval", "1", "--balance-window", "600")


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, etcd):
    """Three fleet daemons, each a candidate controller passing every second;
    the tests below share them in order (what one moved, the next relies on)."""
    tmp = tmp_path_factory.mktemp("candidates")
    daemons = []
    try:
        for label in ("ca", "cb", "cc"):
            daemons.append(fleet_daemon(tmp, label, "asyncio", etcd, *CANDIDATE))
        yield daemons
    finally:
        for d in daemons:
            d.close()


def _controller(etcd) -> dict:
    return json.loads(livemig("fleet", "controller", "--fleet", etcd.url, "--json").stdout)


def _leader_key(etcd):
    return etcd_call(etcd, lambda client: client.get(keys.LEADER))


def _roles(daemons) -> dict:
    """Each daemon's controller as it describes itself (None until it has
    joined the fleet: its control socket answers first)."""
    return {d.address: (d.client.call("ping")["fleet"] or {}).get("controller")
            for d in daemons}


def test_a_deposed_leaders_fenced_transaction_fails(tmp_path):
    """x leads; its lease is revoked (as when it expires while x is paused or
    cut off) and y takes over: x's next pass is refused by its fence, writes
    nothing, and x steps down; any write fenced by x's term fails."""
    async def main(url):
        mx, my = FleetMember(DaemonStub("127.0.0.1:1"), url, ttl_s=60), \
            FleetMember(DaemonStub("127.0.0.1:2"), url, ttl_s=60)
        await mx.join()
        await my.join()
        cx = BalanceController(mx, window_s=60)
        cy = BalanceController(my, window_s=60)
        client = EtcdClient(url)
        try:
            assert await cx.campaign() and cx.term > 0
            assert not await cy.campaign() and cy.leader == "127.0.0.1:1"
            assert await cx.run_pass() == "balanced"     # two empty hosts
            term_x = cx.term
            await client.lease_revoke(mx.lease_id)
            assert await cy.campaign() and cy.term > term_x
            assert await cx.run_pass() == "deposed" and cx.term == 0
            state = (await read_controller(client))["state"]
            assert (state["term"], state["passes"]) == (term_x, 1), "the deposed pass wrote"
            ok, leader = await fenced(client, term_x, [op_put(keys.CONTROLLER_STATE, "{}")])
            assert not ok and leader.create_revision == cy.term
            assert await cy.run_pass() == "balanced"
            info = await read_controller(client)
            assert info["leader"]["addr"] == "127.0.0.1:2" and info["leader"]["term"] == cy.term
            assert (info["state"]["term"], info["state"]["passes"]) == (cy.term, 2)
            await cy.close()           # resigns: the key goes at once
            assert await client.get(keys.LEADER) is None
        finally:
            await cx.close()
            await mx.close()
            await my.close()
            await client.close()

    with etcd_cluster(tmp_path, members=1) as own:
        asyncio.run(main(own.url))


def test_exactly_one_candidate_leads(candidates, etcd):
    kv = wait_for("a leader", lambda: _leader_key(etcd))
    leader = json.loads(kv.value)["addr"]
    assert leader in {d.address for d in candidates}

    def agreed():
        roles = _roles(candidates)
        return all(r is not None and r["leader"] == leader
                   and r["role"] == ("leader" if a == leader else "candidate")
                   for a, r in roles.items()) and roles
    roles = wait_for("every candidate to know the one leader", agreed)
    assert roles[leader]["term"] == kv.create_revision
    info = wait_for("the leader's first pass", lambda: (i := _controller(etcd))["state"] and i)
    assert info["leader"]["addr"] == leader and info["leader"]["term"] == kv.create_revision
    assert info["candidates"] == sorted(d.address for d in candidates)
    human = livemig("fleet", "controller", "--fleet", etcd.url).stdout
    assert f"leader      {leader} (term {kv.create_revision}" in human, human


def _settled_after(etcd, t_seen: float, names) -> dict | None:
    """The controller's state once a pass begun after ``t_seen`` found the
    fleet balanced with every move of ``names`` reported."""
    state = _controller(etcd)["state"]
    moves = [m for m in state.get("moves", []) if m["vm"] in names]
    done = all(m["status"] != "requested" for m in moves)
    return state if (done and state["last_pass_at"] > t_seen
                     and state["last_pass"]["action"] == "balanced") else None


def _seen_everywhere(etcd, names) -> float:
    """Wait until the host records list every VM of ``names``; the time then."""
    wait_for("the host records to list the VMs", lambda: set(names) <= {
        n for h in fleet_rows(etcd, "hosts") for n in h.get("vms", {})})
    return time.time()


def _check_moved(etcd, candidates, entries, recipes) -> None:
    by_addr = {d.address: d for d in candidates}
    for m in entries:
        assert m["status"] == "completed", m
        row = vm_row(etcd, m["vm"])
        assert (row["owner"], row["epoch"]) == (m["to"], 2), (row, m)
        assert_daemon_vm_matches_unmoved(by_addr[m["to"]], m["vm"], recipes[m["vm"]])


def test_the_controller_balances_an_imbalanced_fleet(candidates, etcd):
    """Three 1-vCPU VMs on a (2 CPUs), none elsewhere: the leader moves some
    off, each through the etcd commit, each identical to a twin."""
    a = candidates[0]
    recipes = {f"busy{i}": Recipe("16MiB", 1, "memtest", seed=60 + i, dirty_rate="4MiB/s")
               for i in range(3)}
    for name, recipe in recipes.items():
        start_vm(a, name, recipe)
    t_seen = _seen_everywhere(etcd, recipes)
    state = wait_for("the controller to balance the fleet",
                     lambda: _settled_after(etcd, t_seen, recipes))
    moved = [m for m in state["moves"] if m["vm"] in recipes]
    assert moved and all(m["from"] == a.address for m in moved), moved
    assert len({m["vm"] for m in moved}) == len(moved), "a VM moved twice"
    _check_moved(etcd, candidates, moved, recipes)
    assert set(listed(a)) == set(recipes) - {m["vm"] for m in moved}


def test_a_moved_vm_is_not_moved_again_within_the_window(candidates, etcd):
    """x was moved to b by the controller; three busier VMs started on b make
    b the busiest host (4 vCPUs on 2 CPUs) with x its cheapest VM: the
    controller moves others and leaves x, whose moved record holds it."""
    state = _controller(etcd)["state"]
    x = next(m for m in state["moves"] if m["status"] == "completed")
    b = next(d for d in candidates if d.address == x["to"])
    recipes = {f"newcomer{i}": Recipe("16MiB", 1, "memtest", seed=70 + i, dirty_rate="8MiB/s")
               for i in range(3)}
    for name, recipe in recipes.items():
        start_vm(b, name, recipe)
    t_seen = _seen_everywhere(etcd, recipes)
    state = wait_for("the controller to balance the fleet again",
                     lambda: _settled_after(etcd, t_seen, recipes))
    moved = [m for m in state["moves"] if m["vm"] in recipes]
    assert moved, "b was the busiest host, yet nothing moved: " + json.dumps(state)
    _check_moved(etcd, candidates, moved, recipes)
    assert [m["vm"] for m in state["moves"]].count(x["vm"]) == 1, state["moves"]
    row = vm_row(etcd, x["vm"])
    assert (row["owner"], row["epoch"]) == (b.address, 2)
    record = json.loads(etcd_call(etcd, lambda c: c.get(keys.moved_key(x["vm"]))).value)
    assert record["until"] > time.time() and record["to"] == b.address


def test_the_leader_killed_another_candidate_takes_over(candidates, etcd):
    """SIGKILL of the leading daemon: its lease expires, another candidate
    creates the key (a larger term) and goes on from the state in etcd."""
    old = _leader_key(etcd)
    old_addr = json.loads(old.value)["addr"]
    before = _controller(etcd)["state"]
    victim = next(d for d in candidates if d.address == old_addr)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    new = wait_for("another candidate to lead", lambda: (kv := _leader_key(etcd)) is not None
                   and kv.create_revision != old.create_revision and kv)
    new_addr = json.loads(new.value)["addr"]
    assert new_addr != old_addr and new_addr in {d.address for d in candidates}
    assert new.create_revision > old.create_revision
    state = wait_for("the new leader's pass", lambda: (s := _controller(etcd)["state"])
                     ["term"] == new.create_revision and s)
    assert state["leader"] == new_addr and state["passes"] > before["passes"]
    kept = [(m["vm"], m["term"]) for m in before["moves"]]
    assert kept and kept == [(m["vm"], m["term"]) for m in state["moves"]][:len(kept)]
    assert host(etcd, new_addr)["state"] == "live"

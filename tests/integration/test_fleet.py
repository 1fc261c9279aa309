"""A fleet on loopback: a real etcd, daemons as processes joined with --fleet.

Membership (live, then lost when a daemon dies and its lease expires), a
migration whose commit point is the etcd ownership transaction (the VM
arrives identical to a twin that never moved, and etcd names the new owner
with the next epoch), and a destination that etcd refuses: it never runs the
VM, and the source keeps its copy.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from livemig.cli.common import EXIT_ERROR
from livemig.fleet import keys
from livemig.fleet.etcd import EtcdClient
from support.daemons import (ENV, EXIT_FAILED, EXIT_OK, DaemonProcess,
                             assert_daemon_vm_matches_unmoved, livemig, start_vm, wait_hosted)
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import TTL_S, FleetHost
from support.fleet import etcd_call as _etcd
from support.fleet import fleet_daemon as _daemon
from support.fleet import fleet_rows as _fleet
from support.fleet import host as _host
from support.fleet import joined as _joined
from support.fleet import leader as _leader
from support.fleet import listed as _listed
from support.fleet import put as _put
from support.fleet import vm_row as _vm_row
from support.fleetfaults import incoming
from support.frameproxy import HOLD, Fault
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)


@pytest.fixture(scope="module")
def trio_daemons(tmp_path_factory, etcd):
    tmp = tmp_path_factory.mktemp("trio")
    daemons = []
    try:
        for label in ("ta", "tb", "tc"):
            daemons.append(_daemon(tmp, label, "asyncio", etcd))
        yield daemons
    finally:
        for d in daemons:
            d.close()


@pytest.fixture
def trio(trio_daemons, etcd):
    """Three fleet daemons shared by the tests that plan over the fleet (no
    other live host then), left as found: no VM, no drain mark."""
    yield trio_daemons
    for d in trio_daemons:
        for name in _listed(d):
            d.client.call("vm.stop", name=name)
        _etcd(etcd, lambda client: client.delete(keys.drain_key(d.address)))
    for d in trio_daemons:
        wait_for("the host's record to show it unmarked and empty", lambda: not (
            h := _host(etcd, d.address))["draining"] and not h["vms"])


def test_hosts_register_and_a_dead_host_is_shown_lost(tmp_path, etcd):
    a = _daemon(tmp_path, "a", "asyncio", etcd)
    b = _daemon(tmp_path, "b", "asyncio", etcd)
    try:
        assert a.client.call("ping")["fleet"]["state"] == "member"
        hosts = {h["addr"]: h for h in _fleet(etcd, "hosts")}
        for d in (a, b):
            h = hosts[d.address]
            assert h["state"] == "live" and h["cpus"] >= 1 and h["memory_available_bytes"] > 0
            assert h["pid"] == d.proc.pid and h["version"]
        start_vm(a, "member-vm", Recipe("16MiB", 1, "uniform", dirty_rate="1MiB/s"))
        row = wait_for("etcd to name a as the VM's owner", lambda: _vm_row(etcd, "member-vm"))
        assert (row["owner"], row["epoch"]) == (a.address, 1)
        wait_for("a's record to list its VM", lambda: "member-vm" in next(
            h for h in _fleet(etcd, "hosts") if h["addr"] == a.address)["vms"])
        os.kill(b.proc.pid, signal.SIGKILL)     # no goodbye: only the lease can tell
        b.proc.wait()
        lost = wait_for("b's lease to expire", lambda: next(
            (h for h in _fleet(etcd, "hosts") if h["addr"] == b.address
             and h["state"] == "lost"), None))
        assert lost == {"addr": b.address, "state": "lost", "drain_mark": False}
        human = livemig("fleet", "hosts", "--fleet", etcd.url).stdout
        assert f"{b.address}" in human and "lost" in human
        assert next(h for h in _fleet(etcd, "hosts") if h["addr"] == a.address)["state"] == "live"
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_commit_point_is_the_etcd_transaction(tmp_path, etcd, loop):
    name = f"owned-{loop}"
    a = _daemon(tmp_path, "a", loop, etcd)
    b = _daemon(tmp_path, "b", loop, etcd)
    try:
        recipe = Recipe("16MiB", 2, "memtest", seed=11, dirty_rate="8MiB/s")
        start_vm(a, name, recipe)
        wait_for("etcd to name a as the owner", lambda: (_vm_row(etcd, name) or {}).get("owner")
                 == a.address)
        rec = a.cli_json("migrate", name, "--to", b.address)
        assert rec["status"] == "completed", rec
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (b.address, 2)
        assert name not in [v["name"] for v in a.client.call("vm.list")]
        assert_daemon_vm_matches_unmoved(b, name, recipe)
        # and back: the epoch moves on again
        assert b.cli_json("migrate", name, "--to", a.address)["status"] == "completed"
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (a.address, 3)
        assert_daemon_vm_matches_unmoved(a, name, recipe)
    finally:
        b.close()
        a.close()


def test_a_destination_etcd_refuses_never_runs_the_vm(tmp_path, etcd):
    """etcd names a third host as the owner. Named so at the offer, the
    destination refuses it at once, naming that host: nothing moved, the VM
    runs on at the source. Named so only once the offer was accepted (Commit
    held on its way), the destination's commit transaction fails and it
    discards its copy; the source, told so, may not resume a VM etcd says is
    another's either: it keeps it paused, unresolved, until that owner is
    live and reports running it, then discards it."""
    name, third = "disputed", "192.0.2.1:7400"
    a = _daemon(tmp_path, "a", "asyncio", etcd)
    b = FleetHost(tmp_path, "b", etcd, ttl_s=TTL_S, fault=Fault(HOLD, "Commit", "up"))
    try:
        recipe = Recipe("16MiB", 2, "memtest", seed=12, dirty_rate="8MiB/s")
        start_vm(a, name, recipe)
        wait_for("etcd to know the VM", lambda: _vm_row(etcd, name))
        _put(etcd, keys.vm_key(name), keys.owner_record(third, 9))
        rec = a.cli_json("migrate", name, "--to", b.addr, check=EXIT_FAILED)
        assert rec["status"] == "failed" and "refused" in rec["error"], rec
        assert f"etcd names {third} (epoch 9)" in rec["error"], rec["error"]
        here = wait_hosted(a, name)
        assert here["running"] and not here["unresolved"], here
        assert name not in _listed(b.proc)

        _put(etcd, keys.vm_key(name), keys.owner_record(a.address, 10))
        mig = a.client.call("migrate", name=name, to=b.addr, ack_timeout_s=2)["id"]
        b.link.wait_fired("Commit to reach the proxy")
        _put(etcd, keys.vm_key(name), keys.owner_record(third, 11))
        b.link.release(True)
        rec = a.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)
        assert rec["status"] in ("failed", "in-doubt"), rec
        assert third in rec["error"], rec["error"]
        assert name not in _listed(b.proc)
        here = wait_hosted(a, name)
        assert not here["running"] and here["unresolved"], here
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (third, 11)
        # `vm resolve` asks etcd: never resume a VM it gives to another host,
        # and while that host is lost, keep the copy (it may be the only one).
        refused = a.cli("vm", "resolve", name, "--resume", check=EXIT_FAILED).stderr
        assert f"etcd names {third} (epoch 11)" in refused, refused
        doubt = a.cli("vm", "resolve", name, check=EXIT_FAILED).stderr
        assert "is lost" in doubt and "stays paused" in doubt, doubt
        assert not wait_hosted(a, name)["running"]
        # Once the owner etcd names is live and reports the VM running, the
        # paused copy here is stale: a discards it.
        _put(etcd, keys.host_key(third),
             json.dumps({"addr": third, "vms": {name: {"running": True}}}).encode())
        wait_for("a to discard its stale copy", lambda: name not in _listed(a))
    finally:
        b.close()
        a.close()


def test_refused_then_reclaimed_source_resumes_identical(tmp_path, etcd):
    """etcd refuses b's commit transaction, first for a drain mark b has not
    seen yet, then because b's lease was revoked: each time b never runs the
    VM, and a — still the owner in etcd — reclaims it with a new epoch and
    runs on, identical to a twin."""
    name = "fenced"
    a = _daemon(tmp_path, "a", "asyncio", etcd)
    # b renews (and so reads its drain mark, or rejoins) only every 100 s:
    # it knows nothing of what the test changes in etcd meanwhile.
    b = _joined(DaemonProcess(tmp_path, "b", "asyncio", "--fleet", etcd.url,
                              "--fleet-ttl", "300"))
    try:
        recipe = Recipe("16MiB", 2, "memtest", seed=13, dirty_rate="8MiB/s")
        start_vm(a, name, recipe)
        assert _vm_row(etcd, name)["owner"] == a.address
        # A drain mark b has not seen yet: the commit transaction checks it.
        _put(etcd, keys.drain_key(b.address), b'{"moves": []}')
        rec = a.cli_json("migrate", name, "--to", b.address, check=EXIT_FAILED)
        assert rec["status"] == "failed" and "marked for draining" in rec["error"], rec
        assert name not in _listed(b) and wait_hosted(a, name)["running"]
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (a.address, 2)
        _etcd(etcd, lambda client: client.delete(keys.drain_key(b.address)))
        lease = b.client.call("ping")["fleet"]["lease_id"]

        async def revoke():
            client = EtcdClient(etcd.url)
            try:
                await client.lease_revoke(lease)
            finally:
                await client.close()
        asyncio.run(revoke())
        rec = a.cli_json("migrate", name, "--to", b.address, check=EXIT_FAILED)
        assert rec["status"] == "failed" and "lease" in rec["error"], rec
        assert name not in [v["name"] for v in b.client.call("vm.list")]
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (a.address, 3)
        assert wait_hosted(a, name)["running"]
        assert_daemon_vm_matches_unmoved(a, name, recipe)
    finally:
        b.close()
        a.close()


def test_drain_empties_a_host_and_every_vm_arrives_identical(trio, etcd):
    """Three daemons; a hosts three small VMs. `fleet drain a` moves them to
    b and c (two at a time), each through the etcd commit; a ends empty and
    every VM matches a twin that never moved."""
    a = trio[0]
    recipes = {f"drain{i}": Recipe("16MiB", 1, "memtest", seed=20 + i, dirty_rate="4MiB/s")
               for i in range(3)}
    for name, recipe in recipes.items():
        start_vm(a, name, recipe)
    wait_for("a's record to list its three VMs",
             lambda: set(recipes) <= set(_host(etcd, a.address)["vms"]))
    dry = json.loads(livemig("fleet", "drain", a.address, "--fleet", etcd.url, "--dry-run",
                             "--json").stdout)
    assert {m["vm"] for m in dry["plan"]["moves"]} == set(recipes)
    assert {m["destination"] for m in dry["plan"]["moves"]} <= {d.address for d in trio[1:]}
    assert len(a.client.call("vm.list")) == 3, "a dry run moves nothing"
    out = json.loads(livemig("fleet", "drain", a.address, "--fleet", etcd.url,
                             "--per-host-limit", "2", "--json").stdout)
    assert out["result"]["left"] == [], out
    assert all(v["status"] == "completed" for v in out["result"]["vms"].values()), out
    assert a.client.call("vm.list") == []
    owners = {v["name"]: v for v in _fleet(etcd, "vms")}
    by_addr = {d.address: d for d in trio}
    for name, recipe in recipes.items():
        assert owners[name]["epoch"] == 2 and owners[name]["owner"] != a.address
        assert_daemon_vm_matches_unmoved(by_addr[owners[name]["owner"]], name, recipe)
    # The mark stays (nothing is planned onto a) until it is undrained.
    wait_for("a's record to say it is draining", lambda: _host(etcd, a.address)["draining"])
    livemig("fleet", "undrain", a.address, "--fleet", etcd.url)
    wait_for("a's record to drop the mark", lambda: not _host(etcd, a.address)["draining"])


def test_a_drain_waits_for_a_free_incoming_slot_at_its_destination(trio, etcd):
    """The per-host limit holds at the destination too: with every incoming
    slot of b and c taken (as by other sources' moves), `fleet drain a`
    (limit 1) reports its move waiting and the VM stays running at a; once
    the slots are free it moves, identical, and gives its slot back."""
    a, b, c = trio
    name = "patient"
    recipe = Recipe("16MiB", 1, "memtest", seed=40, dirty_rate="4MiB/s")
    start_vm(a, name, recipe)
    wait_for("a's record to list the VM", lambda: name in _host(etcd, a.address)["vms"])
    held = [keys.incoming_slot_key(d.address, 0) for d in (b, c)]
    for key in held:
        _put(etcd, key, b'{"source": "elsewhere", "vm": "other"}')
    drain = subprocess.Popen([sys.executable, "-m", "livemig", "fleet", "drain", a.address,
                              "--fleet", etcd.url, "--per-host-limit", "1", "--json"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def waiting():
            kv = _etcd(etcd, lambda client: client.get(keys.status_key(a.address)))
            row = json.loads(kv.value)["vms"].get(name, {}) if kv is not None else {}
            return row.get("status") == "waiting" and "incoming slot" in row["waiting_for"]
        wait_for("the drain to report its move waiting for a slot", waiting)
        assert wait_hosted(a, name)["running"]
        for key in held:
            _etcd(etcd, lambda client, key=key: client.delete(key))
        out, err = drain.communicate(timeout=120)
        assert drain.returncode == EXIT_OK, err
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.wait()
    result = json.loads(out)["result"]
    assert result["vms"][name]["status"] == "completed" and result["left"] == [], result
    owner = _vm_row(etcd, name)["owner"]
    assert owner in (b.address, c.address)
    assert_daemon_vm_matches_unmoved(b if owner == b.address else c, name, recipe)
    assert _etcd(etcd, lambda client: client.get_prefix(keys.INCOMING)) == []
    livemig("fleet", "undrain", a.address, "--fleet", etcd.url)


def test_a_host_marked_for_draining_takes_no_vm(trio, etcd):
    """`fleet drain b` marks b (empty: nothing to move) and `fleet hosts` says
    so; b then refuses a migration to it and a new VM, naming the drain,
    while the VM stays running at its source. Once undrained, b takes the VM,
    identical to a twin that never moved."""
    a, b, _ = trio
    name = "wanderer"
    recipe = Recipe("16MiB", 1, "memtest", seed=30, dirty_rate="4MiB/s")
    start_vm(a, name, recipe)
    out = json.loads(livemig("fleet", "drain", b.address, "--fleet", etcd.url, "--json").stdout)
    assert out["result"]["vms"] == {} and out["result"]["left"] == [], out
    assert _host(etcd, b.address)["drain_mark"]
    wait_for("b to see its mark", lambda: _host(etcd, b.address)["draining"])
    row = next(line for line in livemig("fleet", "hosts", "--fleet", etcd.url).stdout
               .splitlines() if line.startswith(b.address))
    assert row.endswith("marked, seen"), row
    rec = a.cli_json("migrate", name, "--to", b.address, check=EXIT_FAILED)
    assert "marked for draining" in rec["error"] and b.address in rec["error"], rec["error"]
    assert wait_hosted(a, name)["running"] and name not in _listed(b)
    refused = b.cli("vm", "start", "newcomer", "--memory", "16MiB", check=EXIT_FAILED)
    assert "marked for draining" in refused.stderr and "fleet undrain" in refused.stderr
    assert _vm_row(etcd, "newcomer") is None
    livemig("fleet", "undrain", b.address, "--fleet", etcd.url)
    wait_for("b to drop its mark", lambda: not _host(etcd, b.address)["draining"])
    assert "marked" not in next(line for line in livemig("fleet", "hosts", "--fleet", etcd.url)
                                .stdout.splitlines() if line.startswith(b.address))
    assert a.cli_json("migrate", name, "--to", b.address)["status"] == "completed"
    assert_daemon_vm_matches_unmoved(b, name, recipe)


def test_one_name_one_vm_in_the_fleet(trio, etcd):
    """`vm start NAME` registers NAME in etcd at once; another host refuses
    the same name while its owner is live, naming the owner. A name whose
    owner is lost is taken over at the next epoch."""
    a, b, _ = trio
    start_vm(a, "unique", Recipe("16MiB", 1, "uniform", dirty_rate="1MiB/s"))
    row = _vm_row(etcd, "unique")
    assert (row["owner"], row["epoch"]) == (a.address, 1), "registered before the answer"
    refused = b.cli("vm", "start", "unique", "--memory", "16MiB", check=EXIT_FAILED)
    assert a.address in refused.stderr and "choose another name" in refused.stderr.lower()
    assert "unique" not in _listed(b)
    assert (_vm_row(etcd, "unique")["owner"], _vm_row(etcd, "unique")["epoch"]) == (a.address, 1)
    _put(etcd, keys.vm_key("orphan"), keys.owner_record("192.0.2.7:7400", 4))   # a lost owner
    b.cli("vm", "start", "orphan", "--memory", "16MiB")
    row = _vm_row(etcd, "orphan")
    assert (row["owner"], row["epoch"]) == (b.address, 5)


def _place(etcd, name: str, recipe: Recipe, check: int = EXIT_OK):
    return livemig("vm", "start", name, "--fleet", etcd.url, "--memory", recipe.memory,
                   "--vcpus", recipe.vcpus, "--workload", recipe.workload, "--dirty-rate",
                   recipe.dirty_rate, "--seed", recipe.seed, "--json", check=check)


def test_vm_start_in_the_fleet_goes_where_there_is_room(trio, etcd):
    """`vm start NAME --fleet` names no daemon: the VM goes to the host with
    the most room (not a, whose CPUs two VMs take), never to one marked for
    draining, and is registered there at epoch 1; it runs as one started
    there would. A name the fleet has is refused."""
    a, b, c = trio
    by_addr = {d.address: d for d in trio}
    for i in range(2):
        start_vm(a, f"ballast{i}", Recipe("16MiB", 1, "uniform", dirty_rate="1MiB/s"))
    wait_for("a's record to list its VMs", lambda: len(_host(etcd, a.address)["vms"]) == 2)
    recipe = Recipe("16MiB", 1, "memtest", seed=40, dirty_rate="4MiB/s")
    out = json.loads(_place(etcd, "placed", recipe).stdout)
    assert out["host"] in (b.address, c.address), out
    row = _vm_row(etcd, "placed")
    assert (row["owner"], row["epoch"]) == (out["host"], 1)
    assert_daemon_vm_matches_unmoved(by_addr[out["host"]], "placed", recipe)
    taken = _place(etcd, "ballast0", recipe, check=EXIT_ERROR)
    assert a.address in taken.stderr and "choose another name" in taken.stderr.lower()
    for d in (b, c):    # marks b and c have not seen yet: the planner reads etcd's
        _put(etcd, keys.drain_key(d.address), b'{"moves": []}')
    out = json.loads(_place(etcd, "placed2", recipe).stdout)
    assert out["host"] == a.address, out
    assert_daemon_vm_matches_unmoved(a, "placed2", recipe)


def test_balance_moves_vms_off_the_busiest_host(trio, etcd):
    """a runs three 1-vCPU VMs on 2 CPUs, b and c none: `fleet balance` moves
    some to them, each through the etcd commit (epoch 2), every one identical
    to a twin that never moved; the next balance does not move them again."""
    a = trio[0]
    by_addr = {d.address: d for d in trio}
    recipes = {f"heavy{i}": Recipe("16MiB", 1, "memtest", seed=50 + i, dirty_rate="4MiB/s")
               for i in range(3)}
    for name, recipe in recipes.items():
        start_vm(a, name, recipe)
    wait_for("a's record to list its VMs", lambda: len(_host(etcd, a.address)["vms"]) == 3)
    dry = json.loads(livemig("fleet", "balance", "--fleet", etcd.url, "--dry-run",
                             "--json").stdout)
    assert dry["plan"]["moves"] and all(m["source"] == a.address for m in dry["plan"]["moves"])
    assert len(_listed(a)) == 3, "a dry run moves nothing"
    out = json.loads(livemig("fleet", "balance", "--fleet", etcd.url, "--json").stdout)
    moved = out["result"]["moves"]
    assert moved and out["result"]["failed"] == [], out
    assert all(v["status"] == "completed" and v["source"] == a.address for v in moved.values())
    for name, v in moved.items():
        row = _vm_row(etcd, name)
        assert (row["owner"], row["epoch"]) == (v["destination"], 2)
        assert_daemon_vm_matches_unmoved(by_addr[v["destination"]], name, recipes[name])
    assert set(_listed(a)) == set(recipes) - set(moved)
    again = json.loads(livemig("fleet", "balance", "--fleet", etcd.url, "--dry-run",
                               "--json").stdout)
    assert not {m["vm"] for m in again["plan"]["moves"]} & set(moved), again


def test_a_stopped_vm_frees_its_name_in_etcd(tmp_path, etcd):
    a = _daemon(tmp_path, "a", "asyncio", etcd)
    try:
        start_vm(a, "brief", Recipe("16MiB", 1, "uniform", dirty_rate="1MiB/s"))
        wait_for("etcd to know the VM", lambda: _vm_row(etcd, "brief"))
        a.cli("vm", "stop", "brief")
        wait_for("the owner key to go", lambda: _vm_row(etcd, "brief") is None)
    finally:
        a.close()


def test_without_etcd_no_side_runs_the_vm_until_it_is_settled(tmp_path):
    """etcd stops answering (SIGSTOP). Before a migration: the destination
    cannot read who owns the VM and refuses the offer, the VM runs on at the
    source. Just before a handover (Commit held on its way): the destination
    cannot prove it owns the VM and never runs it; the source cannot reclaim
    it and keeps it paused, in doubt. Once etcd answers again it still names
    the source, which settles from etcd at its next renewal: it resumes the
    VM after raising its epoch, identical to a twin."""
    name = "cutoff"
    with etcd_cluster(tmp_path, members=1) as own:
        a = _daemon(tmp_path, "a", "asyncio", own)
        b = FleetHost(tmp_path, "b", own, ttl_s=TTL_S, fault=Fault(HOLD, "Commit", "up"),
                      extra=("--fleet-commit-timeout", "1"))
        etcd_pid = own.members[0].proc.pid
        try:
            recipe = Recipe("16MiB", 2, "memtest", seed=14, dirty_rate="8MiB/s")
            start_vm(a, name, recipe)
            wait_for("etcd to name a", lambda: (_vm_row(own, name) or {}).get("owner")
                     == a.address)
            os.kill(etcd_pid, signal.SIGSTOP)
            try:
                rec = a.cli_json("migrate", name, "--to", b.addr, check=EXIT_FAILED)
                assert rec["status"] == "failed", rec
                assert "cannot read the owner" in rec["error"], rec["error"]
                assert wait_hosted(a, name)["running"]
            finally:
                os.kill(etcd_pid, signal.SIGCONT)
            mig = a.client.call("migrate", name=name, to=b.addr, ack_timeout_s=2)["id"]
            b.link.wait_fired("Commit to reach the proxy")
            os.kill(etcd_pid, signal.SIGSTOP)
            try:
                b.link.release(True)
                rec = a.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)
                assert rec["status"] == "in-doubt", rec
                assert "etcd" in rec["error"], rec["error"]
                arrived = wait_for("b to give up its commit", lambda: (r := incoming(b, name))
                                   and r["status"] == "failed" and r)
                assert "etcd" in arrived["error"], arrived
                assert name not in _listed(b.proc)
                here = wait_hosted(a, name)
                assert not here["running"] and here["unresolved"], here
            finally:
                os.kill(etcd_pid, signal.SIGCONT)
            # etcd answers again and names a (b gave up before it did; a
            # transaction b sent meanwhile may still be applied, naming b, who
            # then answers it never ran the VM): a settles the doubt from etcd
            # at a renewal, resuming the VM after raising its epoch.
            here = wait_for("a to resume the VM", lambda: (h := wait_hosted(a, name))["running"]
                            and h)
            assert here["unresolved"] is None, here
            row = _vm_row(own, name)
            assert row["owner"] == a.address and row["epoch"] >= 2, row
            assert name not in _listed(b.proc)
            assert_daemon_vm_matches_unmoved(a, name, recipe)
        finally:
            b.close()
            a.close()


def test_a_handover_commits_through_a_new_etcd_leader(tmp_path):
    """Three etcd members; the leader is killed (SIGKILL) just before the
    migration: the commit transaction goes through whichever member answers
    once a new leader is elected, and the VM arrives identical."""
    name = "leaderless"
    with etcd_cluster(tmp_path, members=3) as cluster:
        a = _daemon(tmp_path, "a", "asyncio", cluster)
        b = _daemon(tmp_path, "b", "asyncio", cluster)
        try:
            recipe = Recipe("16MiB", 2, "memtest", seed=15, dirty_rate="8MiB/s")
            start_vm(a, name, recipe)
            wait_for("etcd to name a", lambda: (_vm_row(cluster, name) or {}).get("owner")
                     == a.address)
            leader = wait_for("a leader", lambda: _leader(cluster) + 1) - 1
            cluster.members[leader].kill()
            rec = a.cli_json("migrate", name, "--to", b.address, check=None)
            row = wait_for("the fleet to answer", lambda: _vm_row(cluster, name))
            if rec["status"] == "completed":
                assert (row["owner"], row["epoch"]) == (b.address, 2)
                assert_daemon_vm_matches_unmoved(b, name, recipe)
            else:
                # etcd could not settle within the commit deadline: then the
                # VM never ran at b, and etcd still names a
                assert name not in [v["name"] for v in b.client.call("vm.list")], rec
                assert row["owner"] == a.address, (row, rec)
                pytest.fail(f"the commit did not go through a new leader: {rec['error']}")
        finally:
            b.close()
            a.close()


def test_a_daemon_that_cannot_join_does_not_start(tmp_path):
    proc = livemig("daemon", "--listen", "127.0.0.1:0", "--control", tmp_path / "x.sock",
                   "--state-dir", tmp_path / "state", "--fleet", "etcd://127.0.0.1:1",
                   check=4)
    assert "etcd://127.0.0.1:1 did not answer" in proc.stderr
    assert not (tmp_path / "x.sock").exists()

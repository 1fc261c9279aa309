"""A daemon cut off from one member of a three-member etcd, mid-migration.

Each daemon reaches each etcd member through a proxy of its own
(support.fleet.EtcdLink), so the link to exactly one member can be cut. Both
daemons' clients start on the first member; with Commit held on its way to
the destination, both are partitioned from that member, and Commit goes on.
The destination's commit transaction, the source's reads and both daemons'
lease keep-alives must move on to the other two members: the migration
completes, the VM runs once, at the destination, which etcd names at the next
epoch, identical to a twin that never moved, nothing in doubt; and both
daemons keep their leases past the TTL (no rejoin).
"""
from __future__ import annotations

import time

import pytest

from support.daemons import assert_daemon_vm_matches_unmoved
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import commit_held_on_links, membership, runs, vm_row
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
TTL_S = 2
NAME = "vm1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=67, dirty_rate="8MiB/s")
CUT = 0        # the member both clients start on


def test_a_daemon_partitioned_from_one_etcd_member_mid_migration(tmp_path):
    with etcd_cluster(tmp_path, members=3) as cluster, \
            commit_held_on_links(tmp_path, cluster, NAME, RECIPE, ttl_s=TTL_S,
                                 first_member=CUT) as (src, dst, links, row, mig):
        leases = {h: membership(h)["lease_id"] for h in (src, dst)}
        before = [[link.forwarded(i)["up"] for i in (1, 2)] for link in links]
        for link in links:
            link.partition(CUT)
        dst.link.release(True)
        rec = src.proc.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)
        assert rec["status"] == "completed", rec
        wait_for("the VM to run at the destination", lambda: runs(dst, NAME))
        assert not any(v["name"] == NAME for v in src.proc.client.call("vm.list"))
        row2 = vm_row(cluster, NAME)
        assert (row2["owner"], row2["epoch"]) == (dst.addr, row["epoch"] + 1), row2
        # The other members carry the traffic from here on (a daemon's next
        # request, at the latest its next keep-alive), and the leases hold
        # past the TTL: keep-alives went there too.
        wait_for("both daemons to reach the other members",
                 lambda: all(sum(link.forwarded(i)["up"] for i in (1, 2)) > sum(b)
                             for link, b in zip(links, before)))
        time.sleep(2 * TTL_S)
        for h in (src, dst):
            f = membership(h)
            assert (f["state"], f["lease_id"]) == ("member", leases[h]), f
        assert runs(dst, NAME)
        assert not any(m["status"] == "in-doubt"
                       for h in (src, dst) for m in h.proc.client.call("status")["migrations"])
        assert_daemon_vm_matches_unmoved(dst.proc, NAME, RECIPE)

"""A daemon whose first etcd endpoint is a member cut off from both its peers.

Three etcd members, each in a network namespace of its own
(support.etcdnetns): the daemons (in the root namespace) reach every member,
and the members reach each other over a bridge in a fourth namespace. Member
0 leads; both daemons' first endpoint is member 0. With Commit held on its
way to the destination, member 0 is cut off from its peers — the minority
side of a partition, a stale leader until it notices — and Commit goes on.

(1) Reads: member 0 really is stale (a serializable read there still names
the source after the majority has moved on), yet a linearizable read there
fails rather than answer, and what the daemons and the CLI read names the
owner the majority holds. (2) The commit: whichever way the migration ends,
the VM runs at exactly one host, the one the majority names, bit-identical
to a twin that never moved; nothing is in doubt. (3) Leases: a daemon that
can reach only member 0 does not believe its lease renewed: it says ``lost``
and, after healing, joins with a new lease; the majority lets the old one
expire.
"""
from __future__ import annotations

import asyncio
import base64
import types
import urllib.error

import pytest

from livemig.fleet import keys
from livemig.fleet.etcd import EtcdClient, EtcdError
from support.daemons import assert_daemon_vm_matches_unmoved
from support.etcdnetns import available, netns_etcd_cluster
from support.fleet import commit_held_on_links, membership, runs, vm_row
from support.oracle import Recipe
from support.waiting import PATIENCE_S, wait_for

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"etcd members in namespaces unavailable: {WHY}")
TTL_S = 2
NAME = "vm1"
RECIPE = Recipe("16MiB", 2, "memtest", seed=71, dirty_rate="8MiB/s")
CUT = 0        # the member cut off; first endpoint of both daemons


def _owner(answer: dict) -> tuple[str, int] | None:
    kvs = answer.get("kvs") or []
    if not kvs:
        return None
    return keys.parse_owner(base64.b64decode(kvs[0]["value"]), what=NAME)


def _lease_ttl_s(majority_url: str, lease_id: int) -> int:
    async def main():
        client = EtcdClient(majority_url)
        try:
            return int((await client.call("lease/timetolive", {"ID": lease_id})).get("TTL", -1))
        finally:
            await client.close()
    return asyncio.run(main())


def _linearizable_read_through(endpoint: str) -> str:
    """A linearizable read through one member alone, by the daemon's client:
    what it returned, or the error it raised."""
    async def main():
        client = EtcdClient(f"etcd://{endpoint}", timeout_s=8)
        try:
            return f"value {await client.get(keys.vm_key(NAME))!r}"
        except EtcdError as exc:
            return f"error {exc}"
        finally:
            await client.close()
    return asyncio.run(main())


def test_a_daemon_on_the_minority_member_of_a_partitioned_etcd(tmp_path):
    with netns_etcd_cluster(tmp_path, members=3) as cluster:
        cluster.make_leader(CUT)
        majority = types.SimpleNamespace(url="etcd://" + ",".join(cluster.endpoints[1:]))
        with commit_held_on_links(tmp_path, cluster, NAME, RECIPE, ttl_s=TTL_S,
                                  first_member=CUT) as (src, dst, links, row, mig):
            before = sum(links[1].forwarded(i)["up"] for i in (1, 2))
            cluster.isolate(CUT)
            wait_for("the majority to elect a leader", lambda: cluster.leader([1, 2]) > 0)
            dst.link.release(True)
            rec = src.proc.client.call("migration.wait", id=mig, timeout_s=PATIENCE_S)
            assert rec["status"] in ("completed", "failed"), rec

            # (2) One owner, the majority's, running the VM; the other has none.
            truth = vm_row(majority, NAME)
            if rec["status"] == "completed":
                at, away = dst, src
                assert (truth["owner"], truth["epoch"]) == (dst.addr, row["epoch"] + 1), truth
                # The commit went to the majority: the destination's client moved on.
                assert sum(links[1].forwarded(i)["up"] for i in (1, 2)) > before
            else:
                at, away = src, dst
                assert truth["owner"] == src.addr, (rec, truth)
            wait_for("the VM to run where the majority names it", lambda: runs(at, NAME))
            assert not any(v["name"] == NAME for v in away.proc.client.call("vm.list"))
            assert not any(m["status"] == "in-doubt"
                           for h in (src, dst) for m in h.proc.client.call("status")["migrations"])

            # (1) Member 0 is stale, but nobody reads the stale owner from it.
            if rec["status"] == "completed":
                stale = _owner(cluster.range_key(CUT, keys.vm_key(NAME), serializable=True))
                assert stale == (src.addr, row["epoch"]), stale
            with pytest.raises(urllib.error.HTTPError):
                cluster.range_key(CUT, keys.vm_key(NAME), serializable=False)
            got = _linearizable_read_through(cluster.endpoints[CUT])
            assert got.startswith("error "), got
            seen = vm_row(cluster, NAME)          # the CLI, member 0 first
            assert (seen["owner"], seen["epoch"]) == (truth["owner"], truth["epoch"]), seen

            # (3) The source can now reach member 0 only: its keep-alives go
            # nowhere, and it must not believe its lease renewed.
            old = membership(src)["lease_id"]
            assert _lease_ttl_s(majority.url, old) > 0
            links[0].partition(1)
            links[0].partition(2)
            wait_for("the source to say its lease is lost", lambda: membership(src)["state"] == "lost")
            wait_for("the majority to expire that lease",
                     lambda: _lease_ttl_s(majority.url, old) == -1)
            links[0].heal(1)
            links[0].heal(2)
            f = wait_for("the source to rejoin",
                         lambda: (f := membership(src))["state"] == "member" and f)
            assert f["lease_id"] != old, f

            # Healed: member 0 catches up; still one VM, in one place.
            cluster.heal(CUT)
            wait_for("member 0 to catch up", lambda: _owner(cluster.range_key(
                CUT, keys.vm_key(NAME), serializable=True)) == (truth["owner"], truth["epoch"]))
            assert runs(at, NAME)
            assert not any(v["name"] == NAME for v in away.proc.client.call("vm.list"))
            assert_daemon_vm_matches_unmoved(at.proc, NAME, RECIPE)

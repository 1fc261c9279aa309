"""The destination's commit point (FleetMember.take_ownership) against an
etcd whose answers get lost: it commits only at the epoch it first read. And
a source that cannot ask its destination settles from etcd (SourceArbiter).

The fake etcd applies transactions as etcd would (compares on the key's
revision, on its absence, on the lease) and can lose an answer — before or
after applying the transaction — and let the source reclaim the VM in the
gap, as a source that settled the broken handover from etcd does."""
import asyncio

import pytest

from livemig.errors import LivemigError, MigrationError
from livemig.fleet import keys
from livemig.fleet.etcd import EtcdUnavailable, KeyValue, b64, unb64
from livemig.fleet.member import FleetMember, SourceArbiter, next_epoch

SRC, DST, NAME = "10.0.0.1:7400", "10.0.0.2:7400", "vm1"
KEY = keys.vm_key(NAME)
LEASE = 77


class FakeEtcd:
    def __init__(self):
        self.revision = 10
        self.store: dict[str, KeyValue] = {}
        self.lease_ok = True
        self.lose = []          # per txn: None (answer), "before" or "after" applying it
        self.in_gap = None      # called when an answer is lost (after the loss)
        self.txns = 0

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.store.get(key)
        self.store[key] = KeyValue(key, value, self.revision,
                                   old.create_revision if old else self.revision, 0)

    async def get(self, key: str):
        return self.store.get(key)

    def _holds(self, cmp: dict) -> bool:
        kv = self.store.get(unb64(cmp["key"]).decode())
        if cmp["target"] == "LEASE":
            return self.lease_ok and int(cmp["lease"]) == LEASE
        if cmp["target"] == "CREATE":
            return kv is None
        if cmp["target"] == "VALUE":
            return kv is not None and kv.value == unb64(cmp["value"])
        return kv is not None and kv.mod_revision == int(cmp["mod_revision"])

    async def txn(self, compare, success, failure=None, *, timeout_s=None):
        self.txns += 1
        loss = self.lose.pop(0) if self.lose else None
        if loss == "before":
            self._gap()
            raise EtcdUnavailable("the answer was lost")
        ok = all(self._holds(c) for c in compare)
        ops = success if ok else (failure or [])
        responses = []
        for op in ops:
            if "request_put" in op:
                req = op["request_put"]
                self.put(unb64(req["key"]).decode(), unb64(req["value"]))
                responses.append({"response_put": {}})
            else:
                kv = self.store.get(unb64(op["request_range"]["key"]).decode())
                kvs = [] if kv is None else [{"key": b64(kv.key), "value": b64(kv.value),
                                              "mod_revision": str(kv.mod_revision),
                                              "create_revision": str(kv.create_revision)}]
                responses.append({"response_range": {"kvs": kvs}})
        if loss == "after":
            self._gap()
            raise EtcdUnavailable("the answer was lost")
        return ok, {"succeeded": ok, "responses": responses}

    def _gap(self):
        if self.in_gap is not None:
            self.in_gap(self)
            self.in_gap = None


def _member(etcd: FakeEtcd) -> FleetMember:
    m = FleetMember.__new__(FleetMember)
    m.addr, m.client, m.commit_timeout_s, m.lease_id = DST, etcd, 5.0, LEASE
    return m


def _owner(etcd):
    return keys.parse_owner(etcd.store[KEY].value, what=KEY)


def _source_reclaims(etcd):
    owner, epoch = _owner(etcd)
    assert owner == SRC
    etcd.put(KEY, keys.owner_record(SRC, epoch + 1))


def _take(etcd):
    """The commit point as a destination runs it: the key read at the offer,
    then the ownership transaction."""
    first = asyncio.run(etcd.get(KEY))
    return asyncio.run(_member(etcd).take_ownership(NAME, SRC, first,
                                                    next_epoch(first, NAME, SRC)))


def _etcd_with_source_owner(epoch=3):
    etcd = FakeEtcd()
    etcd.put(KEY, keys.owner_record(SRC, epoch))
    return etcd


def test_a_clean_commit_takes_the_next_epoch():
    etcd = _etcd_with_source_owner()
    assert _take(etcd) == 4 and _owner(etcd) == (DST, 4)


def test_a_lost_answer_of_an_applied_commit_counts_as_committed():
    etcd = _etcd_with_source_owner()
    etcd.lose = ["after"]
    assert _take(etcd) == 4 and _owner(etcd) == (DST, 4) and etcd.txns == 1


def test_a_lost_request_is_sent_again_while_the_key_is_as_first_read():
    etcd = _etcd_with_source_owner()
    etcd.lose = ["before"]
    assert _take(etcd) == 4 and _owner(etcd) == (DST, 4) and etcd.txns == 2


def test_a_source_that_reclaimed_in_the_gap_is_never_overridden():
    """The split brain this guards against: the commit's request is lost,
    the source (settling from etcd) reclaims — owner source, epoch 4 — and
    resumes the VM. The destination reads owner = source again: committing
    at epoch 5 would run the VM here too. It must refuse."""
    etcd = _etcd_with_source_owner()
    etcd.lose, etcd.in_gap = ["before"], _source_reclaims
    with pytest.raises(MigrationError, match="refused the ownership transaction"):
        _take(etcd)
    assert _owner(etcd) == (SRC, 4) and etcd.txns == 1


def test_a_reclaim_before_the_commit_refuses_it_too():
    etcd = _etcd_with_source_owner()
    first = asyncio.run(etcd.get(KEY))
    _source_reclaims(etcd)

    with pytest.raises(MigrationError, match="refused the ownership transaction"):
        asyncio.run(_member(etcd).take_ownership(NAME, SRC, first, 4))
    assert _owner(etcd) == (SRC, 4)


def test_a_lost_lease_refuses_without_a_second_try():
    etcd = _etcd_with_source_owner()
    etcd.lease_ok = False
    with pytest.raises(MigrationError, match="lease is gone"):
        _take(etcd)
    assert _owner(etcd) == (SRC, 3) and etcd.txns == 1


def test_a_new_name_is_created_once_and_never_over_a_source_claim():
    etcd = FakeEtcd()
    assert _take(etcd) == 1 and _owner(etcd) == (DST, 1)
    etcd = FakeEtcd()
    etcd.lose, etcd.in_gap = ["before"], lambda e: e.put(KEY, keys.owner_record(SRC, 1))
    with pytest.raises(MigrationError):
        _take(etcd)
    assert _owner(etcd) == (SRC, 1)


def _arbiter(etcd: FakeEtcd, *, member_dst=True):
    m = FleetMember.__new__(FleetMember)
    m.addr, m.client, m.lease_id = SRC, etcd, LEASE
    if member_dst:
        etcd.put(keys.known_key(DST), b'{"addr": "%s"}' % DST.encode())
    return SourceArbiter(m, NAME, DST)


def test_a_source_that_cannot_ask_settles_from_etcd():
    """After Commit, the destination silent: etcd naming the source means no
    destination committed — reclaimed at a new epoch (fencing a late commit);
    naming the destination, or a destination outside the fleet, the VM stays
    paused."""
    etcd = _etcd_with_source_owner()
    assert asyncio.run(_arbiter(etcd).settle()) is None
    assert _owner(etcd) == (SRC, 4)
    etcd = _etcd_with_source_owner()
    etcd.put(KEY, keys.owner_record(DST, 4))
    assert "etcd names 10.0.0.2:7400 (epoch 4)" in asyncio.run(_arbiter(etcd).settle())
    assert _owner(etcd) == (DST, 4)
    etcd = _etcd_with_source_owner()
    assert "not a host of this fleet" in asyncio.run(_arbiter(etcd, member_dst=False).settle())
    assert _owner(etcd) == (SRC, 3)


def test_a_reclaim_refuses_a_key_that_moved_to_owned_after_settle_read_it():
    """settle reads the key ``committed`` by the destination and reclaims;
    if the key says ``owned`` by the time of the reclaim's own read (the
    destination took the VM again, in a later handover), the guest may run
    there: the reclaim must refuse (the VM would otherwise run in both
    places). A destination that said itself that it never resumed the VM
    may still be taken back from."""
    class Racing(FakeEtcd):
        reads = 0

        async def get(self, key):
            self.reads += key == KEY
            if key == KEY and self.reads == 2:     # after settle's read: owned again
                self.put(KEY, keys.owner_record(DST, 4))
            return await super().get(key)
    etcd = Racing()
    etcd.put(KEY, keys.owner_record(DST, 4, keys.COMMITTED))
    why = asyncio.run(_arbiter(etcd).settle())
    assert why is not None and "resumed" in why, why
    assert _owner(etcd) == (DST, 4)
    etcd = FakeEtcd()
    etcd.put(KEY, keys.owner_record(DST, 4))
    assert asyncio.run(_arbiter(etcd).reclaim()) is None      # on the destination's word
    assert _owner(etcd) == (SRC, 5)


def _gate(etcd: FakeEtcd):
    m = _member(etcd)
    m.fast_commit, m._fast_conn = False, None
    return m.commit_gate(NAME, SRC)


def test_the_epoch_is_fixed_before_the_offer_is_accepted():
    """The split brain a late read allows: the destination reads the key only
    at the commit point, after the source — its Commit unanswered — took the
    VM back (owner source, epoch 4) and resumed it; committing at epoch 5
    would run it here too. The gate's epoch comes from ``admit`` (before
    Accept, so before any Commit): the reclaim fails its compare."""
    etcd = _etcd_with_source_owner()
    gate = _gate(etcd)

    async def run():
        await gate.admit()
        _source_reclaims(etcd)
        await gate()
    with pytest.raises(MigrationError, match="refused the ownership transaction"):
        asyncio.run(run())
    assert _owner(etcd) == (SRC, 4)


def test_a_gate_never_admitted_refuses():
    etcd = _etcd_with_source_owner()
    with pytest.raises(MigrationError, match="before the offer was accepted"):
        asyncio.run(_gate(etcd)())
    assert _owner(etcd) == (SRC, 3) and etcd.txns == 0


def test_admit_refuses_an_offer_the_source_does_not_own_or_that_etcd_cannot_tell():
    etcd = _etcd_with_source_owner()
    etcd.put(KEY, keys.owner_record("10.0.0.9:7400", 5))
    with pytest.raises(LivemigError, match="etcd names 10.0.0.9:7400 .epoch 5."):
        asyncio.run(_gate(etcd).admit())

    class Unreachable(FakeEtcd):
        async def get(self, key):
            raise EtcdUnavailable("no member answered")
    gate = _gate(Unreachable())
    gate.member.commit_timeout_s = 0.2        # asked until then
    with pytest.raises(LivemigError, match="cannot read the owner .*no member answered"):
        asyncio.run(gate.admit())


def test_an_admitted_gate_commits_in_one_transaction():
    """The commit point inside the guest's pause is one transaction, and its
    record says the guest may run here (``owned``)."""
    etcd = _etcd_with_source_owner()
    gate = _gate(etcd)

    async def run():
        await gate.admit()
        await gate()
    asyncio.run(run())
    assert _owner(etcd) == (DST, 4) and etcd.txns == 1
    assert keys.owner_state(etcd.store[KEY].value, what=KEY)[0] == keys.OWNED

"""`livemig vm resolve` on a fleet daemon: the decision table etcd drives
(fleet/resolve.py), against a member whose etcd answers are given."""
import asyncio

import pytest

from livemig.engine.source.handover import (ABANDONED, COMMITTED, NOT_COMMITTED, POSTCOPY,
                                             UNKNOWN, UNREACHABLE, Learned)
from livemig.errors import ControlError
from livemig.fleet import resolve as resolve_mod
from livemig.fleet import keys
from livemig.fleet.etcd import EtcdUnavailable, KeyValue

HERE, PEER, THIRD = "10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"


class _Member:
    """What resolve reads: the owner key, and whether a host runs the VM."""

    def __init__(self, owner, epoch, *, live=(), running=(), etcd_down=False,
                 members=(HERE, PEER, THIRD), state=keys.OWNED):
        self.addr, self.owner, self.epoch, self.state = HERE, owner, epoch, state
        self.marked_lost = []
        self.live, self.running, self.etcd_down = set(live), set(running), etcd_down
        self.members = set(members)
        self.reclaims = 0

    async def is_member(self, addr):
        return addr in self.members

    async def owner_of(self, name):
        if self.etcd_down:
            raise EtcdUnavailable("no endpoint answered")
        if self.owner is None:
            return None, 0, None
        value = keys.owner_record(self.owner, self.epoch, self.state)
        return self.owner, self.epoch, KeyValue(keys.vm_key(name), value, 1, 1, 0)

    async def mark_lost(self, name, why, *, owner_addr=None):
        self.marked_lost.append(owner_addr)
        self.state = keys.LOST
        return True

    async def runs_at(self, owner, name):
        return owner in self.live, owner in self.running


@pytest.fixture(autouse=True)
def reclaim(monkeypatch):
    """SourceArbiter.reclaim as etcd would do it: owner here, next epoch."""
    async def fake(self):
        m = self.member
        m.owner, m.epoch, m.reclaims = m.addr, m.epoch + 1, m.reclaims + 1
        m.state = keys.OWNED
        return None
    monkeypatch.setattr(resolve_mod.SourceArbiter, "reclaim", fake)


def _resolve(member, action=None, peer_says=UNREACHABLE):
    asked = []

    async def ask():
        asked.append(True)
        return Learned(peer_says, "what the peer said")
    verdict = asyncio.run(resolve_mod.resolve(member, "vm1", PEER, action, ask))
    return verdict, bool(asked)


@pytest.mark.parametrize("owner", [HERE, None])
def test_owned_here_or_by_nobody_resumes_after_raising_the_epoch(owner):
    m = _Member(owner, 4 if owner else 0)
    verdict, asked = _resolve(m)
    assert verdict.resume and m.reclaims == 1 and not asked
    assert (verdict.owner, verdict.epoch) == (HERE, m.epoch)
    with pytest.raises(ControlError, match="etcd names this host") as e:
        _resolve(_Member(owner, 4), "discard")
    assert e.value.error_type == "Refused"


def test_owned_by_a_host_that_runs_it_discards_and_refuses_resume():
    m = _Member(THIRD, 7, live={THIRD}, running={THIRD})
    verdict, asked = _resolve(m)
    assert not verdict.resume and verdict.owner == THIRD and THIRD in verdict.reason
    assert m.reclaims == 0 and not asked
    with pytest.raises(ControlError, match=f"etcd names {THIRD} \\(epoch 7\\)"):
        _resolve(m, "resume")


@pytest.mark.parametrize("live", [False, True])
def test_an_owner_that_is_lost_or_does_not_run_it_leaves_the_copy_paused(live):
    m = _Member(THIRD, 7, live={THIRD} if live else ())
    with pytest.raises(ControlError, match="stays paused") as e:
        _resolve(m)
    assert e.value.error_type == "InDoubt"
    assert ("does not report running it" if live else "is lost") in str(e.value)
    verdict, _ = _resolve(m, "discard")       # the operator's word, etcd agrees
    assert not verdict.resume and m.reclaims == 0


def test_the_destination_owner_is_asked():
    committed, asked = _resolve(_Member(PEER, 2, live={PEER}), peer_says=COMMITTED)
    assert asked and not committed.resume and committed.destination_says == COMMITTED
    with pytest.raises(ControlError, match="post-copy"):
        _resolve(_Member(PEER, 2, live={PEER}), peer_says=POSTCOPY)
    m = _Member(PEER, 2, live={PEER})
    verdict, _ = _resolve(m, peer_says=NOT_COMMITTED)
    assert verdict.resume and m.reclaims == 1 and (verdict.owner, verdict.epoch) == (HERE, 3)
    with pytest.raises(ControlError, match="only one"):
        _resolve(_Member(PEER, 2, live={PEER}), "discard", peer_says=NOT_COMMITTED)
    with pytest.raises(ControlError, match="stays paused"):
        _resolve(_Member(PEER, 2, live={PEER}), peer_says=UNREACHABLE)


def test_a_silent_destination_whose_record_lists_it_running_leaves_the_copy_paused():
    """The destination's host record still lists the VM running (its lease
    outlives a killed daemon): only its own answer releases the copy here,
    which is the rollback if that host died."""
    m = _Member(PEER, 2, live={PEER}, running={PEER})
    with pytest.raises(ControlError, match="lists it running but does not answer") as e:
        _resolve(m, peer_says=UNREACHABLE)
    assert e.value.error_type == "InDoubt" and m.reclaims == 0
    verdict, asked = _resolve(m, peer_says=COMMITTED)
    assert asked and not verdict.resume and verdict.destination_says == COMMITTED


@pytest.mark.parametrize("says", [ABANDONED, UNKNOWN])
def test_a_destination_that_resumed_it_and_lost_it_leaves_a_stale_copy(says):
    """etcd says the guest resumed there (state owned); its restarted daemon
    runs nothing of it: the VM was lost with it. The copy here is stale —
    never resumed by the fleet; etcd is told it is lost."""
    m = _Member(PEER, 2, live={PEER})
    verdict, _ = _resolve(m, peer_says=says)
    assert verdict.lost and not verdict.resume and m.reclaims == 0
    assert m.marked_lost == [PEER] and "lost with its host" in verdict.reason


def test_a_lost_destination_host_that_had_resumed_it_leaves_a_stale_copy():
    m = _Member(PEER, 2)
    verdict, asked = _resolve(m)
    assert verdict.lost and not asked and m.reclaims == 0 and m.marked_lost == []


def test_a_destination_that_committed_but_never_resumed_is_reclaimed_from():
    """state committed (its restarted daemon proved it never resumed the
    guest): whether that host is live or lost, the copy here is reclaimed."""
    for live in ((), {PEER}):
        m = _Member(PEER, 2, live=live, state=keys.COMMITTED)
        verdict, asked = _resolve(m)
        assert verdict.resume and not asked and m.reclaims == 1


def test_a_rollback_of_a_lost_vm_only_on_the_operators_word():
    m = _Member(PEER, 2, live={PEER}, state=keys.LOST)
    verdict, _ = _resolve(m)
    assert verdict.lost and m.reclaims == 0
    verdict, _ = _resolve(m, "resume")
    assert verdict.resume and m.reclaims == 1 and "WARNING" in verdict.warning
    with pytest.raises(ControlError, match="only that host may run it"):
        _resolve(_Member(PEER, 2, live={PEER}), "resume")     # not lost: no rollback


def test_etcd_unreachable_decides_nothing():
    for action in (None, "resume", "discard"):
        with pytest.raises(ControlError, match="cannot ask etcd") as e:
            _resolve(_Member(HERE, 1, etcd_down=True), action)
        assert e.value.error_type == "InDoubt"


def test_a_destination_outside_the_fleet_leaves_the_copy_paused_unless_told():
    """etcd names this host, but the destination never joined the fleet: its
    commit went nowhere near etcd, so etcd's word proves nothing about it."""
    m = _Member(HERE, 4, members=(HERE,))
    with pytest.raises(ControlError, match="not a host of this fleet") as e:
        _resolve(m)
    assert e.value.error_type == "InDoubt" and m.reclaims == 0
    verdict, _ = _resolve(m, "resume")
    assert verdict.resume and m.reclaims == 1

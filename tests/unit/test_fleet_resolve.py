"""`livemig vm resolve` on a fleet daemon: the decision table etcd drives
(fleet/resolve.py), against a member whose etcd answers are given."""
import asyncio

import pytest

from livemig.engine.source.handover import (ABANDONED, COMMITTED, NOT_COMMITTED, POSTCOPY,
                                             UNREACHABLE, Learned)
from livemig.errors import ControlError
from livemig.fleet import resolve as resolve_mod
from livemig.fleet.etcd import EtcdUnavailable

HERE, PEER, THIRD = "10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"


class _Member:
    """What resolve reads: the owner key, and whether a host runs the VM."""

    def __init__(self, owner, epoch, *, live=(), running=(), etcd_down=False,
                 members=(HERE, PEER, THIRD)):
        self.addr, self.owner, self.epoch = HERE, owner, epoch
        self.live, self.running, self.etcd_down = set(live), set(running), etcd_down
        self.members = set(members)
        self.reclaims = 0

    async def is_member(self, addr):
        return addr in self.members

    async def owner_of(self, name):
        if self.etcd_down:
            raise EtcdUnavailable("no endpoint answered")
        return self.owner, self.epoch, None

    async def runs_at(self, owner, name):
        return owner in self.live, owner in self.running


@pytest.fixture(autouse=True)
def reclaim(monkeypatch):
    """SourceArbiter.reclaim as etcd would do it: owner here, next epoch."""
    async def fake(self):
        m = self.member
        m.owner, m.epoch, m.reclaims = m.addr, m.epoch + 1, m.reclaims + 1
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
    for says in (NOT_COMMITTED, ABANDONED):
        m = _Member(PEER, 2, live={PEER})
        verdict, _ = _resolve(m, peer_says=says)
        assert verdict.resume and m.reclaims == 1 and (verdict.owner, verdict.epoch) == (HERE, 3)
        with pytest.raises(ControlError, match="only one"):
            _resolve(_Member(PEER, 2), "discard", peer_says=says)
    with pytest.raises(ControlError, match="stays paused"):
        _resolve(_Member(PEER, 2), peer_says=UNREACHABLE)


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

"""``livemig vm resolve`` on a fleet daemon: etcd says where the VM lives.

Theory of operation
-------------------
A VM paused here after a handover that could not be settled (in doubt) has
one owner in etcd, ``/livemig/vms/<name>``, and only that host may run it.
Resolving reads the key and acts on it:

* **etcd names this host** (or no host: no destination ever committed, its
  transaction would have created the key): the destination never took the
  VM — if it is a host of the fleet (one that never joined commits nothing
  in etcd: then only ``--resume`` resumes). Resume it here, after a
  transaction that raises the epoch (``SourceArbiter.reclaim``) — a
  destination transaction still in flight compares the old revision and
  fails, so it can never run the VM too.
  ``--discard`` is refused: this paused copy is the one the fleet owns.
* **etcd names another host**: ``--resume`` is refused, naming the owner.
  The copy here is discarded once that owner is live and reports the VM
  running, or, when the owner is the destination of the broken handover,
  once it answers that it runs it: its record alone is not enough, since it
  lags by up to a renewal and outlives a killed daemon until the lease
  expires, and this copy is the rollback if that host died. A
  destination that answers it does *not* run the VM (its transaction went
  through but it gave up, or it abandoned a post-copy) leaves this copy the
  only one: the key is taken back from it (a new epoch) and the VM resumes
  here. An owner that is lost, or live without the VM, leaves the copy
  paused: it may be the only one. ``--discard`` then is the operator's word.
* **etcd names the destination of the broken handover** — then its
  ``state`` says whether the guest may have run there. ``committed``: the
  destination's restarted daemon proved it never resumed the guest (its
  session journal, engine/destination/outcomes.py), so this paused copy is
  the VM: reclaimed (a new epoch) and resumed. ``owned`` or ``lost``: the
  guest may have run there, and may have written its disk or answered
  clients; unless the destination says otherwise, this paused copy is
  stale. It is discarded once that host runs the VM; if the host
  says nothing of it runs there (its daemon restarted: ABANDONED or
  UNKNOWN; or a post-copy it gave up), or etcd says ``lost``, or the host
  is lost, the VM is **lost with its host**: this copy stays paused, marked
  lost (``Verdict.lost``), never resumed by the fleet; etcd's key says
  ``lost``. ``--resume`` then is an explicit rollback, allowed only once etcd
  says lost (a reclaim at a new epoch), and ``--discard`` drops it.
* **etcd cannot be asked**: nothing is decided; the VM stays paused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ..engine.source.handover import (ABANDONED, COMMITTED, NOT_COMMITTED, POSTCOPY, UNKNOWN,
                                      Learned)
from ..errors import ControlError
from . import keys
from .etcd import EtcdError
from .member import FleetMember, SourceArbiter


@dataclass
class Verdict:
    resume: bool                  # True: resume the copy here; False: discard it
    owner: str | None             # etcd's owner when asked (after a reclaim: this host)
    epoch: int
    reason: str
    destination_says: str | None = None   # when the destination was asked too
    lost: bool = False            # the VM ran at ``owner`` and died there: keep this copy paused
    warning: str | None = None    # an operator's rollback


def _refused(text: str) -> ControlError:
    return ControlError(text, error_type="Refused")


def _in_doubt(text: str) -> ControlError:
    return ControlError(text, error_type="InDoubt")


async def _lost(member: FleetMember, name: str, owner: str, epoch: int, why: str,
                says: str | None = None, *, mark: bool) -> Verdict:
    """The guest ran at ``owner`` and died there: this copy is stale."""
    if mark:
        await member.mark_lost(name, why, owner_addr=owner)
    return Verdict(False, owner, epoch,
                   f"VM {name!r} was lost with its host {owner} (epoch {epoch}): {why}. The "
                   "guest had resumed there, so the copy paused here is stale (rolled back to "
                   "the handover) and stays paused: `livemig vm resolve "
                   f"{name} --resume` runs it as a rollback, --discard drops it", says,
                   lost=True)


async def _reclaimed(member: FleetMember, name: str, peer: str, why: str,
                     says: str | None = None) -> Verdict:
    """Make etcd name this host (a new epoch), then the VM may resume here."""
    refusal = await SourceArbiter(member, name, peer).reclaim()
    if refusal is not None:
        raise _in_doubt(f"{refusal}. VM {name!r} stays paused here; resolve again")
    _, epoch, _ = await member.owner_of(name)
    return Verdict(True, member.addr, epoch, f"{why}; etcd now names this host (epoch {epoch})",
                   says)


async def resolve(member: FleetMember, name: str, peer: str, action: str | None,
                  ask: Callable[[], Awaitable[Learned]]) -> Verdict:
    """What to do with the paused copy of ``name`` here, as etcd decides.
    ``peer`` is the destination of the broken handover; ``ask()`` asks it
    what became of the session. Raises ControlError when nothing may be done."""
    try:
        owner, epoch, kv = await member.owner_of(name)
        if owner is None or owner == member.addr:
            if action == "discard":
                raise _refused(
                    f"refusing to discard VM {name!r}: etcd names this host ({member.addr}, "
                    f"epoch {epoch}) as its owner; this paused copy is the one the fleet has. "
                    f"Use `livemig vm resolve {name}` or --resume")
            if action is None and not await member.is_member(peer):
                raise _in_doubt(
                    f"etcd names this host as the owner of VM {name!r}, but the destination "
                    f"{peer} is not a host of this fleet, so etcd cannot say whether it resumed "
                    f"the VM; it stays paused here. --resume if you know it does not run it")
            return await _reclaimed(member, name, peer,
                                    "etcd names no other owner: the destination never took it")
        state, lost_why = keys.owner_state(kv.value, what=kv.key)
        if owner == peer and state == keys.COMMITTED:
            return await _reclaimed(member, name, peer, f"the destination {owner} committed "
                                    "but never resumed it (etcd's key says committed)")
        if owner == peer and state == keys.LOST and action == "resume":
            verdict = await _reclaimed(member, name, peer, "by the operator, as a rollback")
            verdict.warning = (f"WARNING: VM {name!r} had run at {owner} and was lost there "
                               "(etcd said so); it resumed here from its state at the "
                               "handover: whatever it did at the destination is undone")
            return verdict
        if action == "resume":
            raise _refused(f"refusing to resume VM {name!r} here: etcd names {owner} (epoch "
                           f"{epoch}) as its owner, and only that host may run it")
        live, runs = await member.runs_at(owner, name)
        if runs and owner != peer:
            return Verdict(False, owner, epoch, f"etcd names {owner} (epoch {epoch}), which "
                           "reports running it")
        if owner == peer and action is None and state == keys.LOST:
            return await _lost(member, name, owner, epoch, lost_why or "etcd says so",
                               mark=False)
        if owner == peer and action is None and not live:
            return await _lost(member, name, owner, epoch, "that host is lost (its lease "
                               "expired) after it resumed the guest", mark=False)
        if owner == peer:
            learned = await ask()
            if learned.kind == COMMITTED:
                return Verdict(False, owner, epoch, f"etcd names the destination {owner} "
                               f"(epoch {epoch}), which runs it", learned.kind)
            if learned.kind == POSTCOPY:
                raise _refused(
                    f"the destination {owner} runs VM {name!r} in post-copy and still lacks "
                    "pages only this host holds; nothing was changed: resolve again once it "
                    "completes or gives up")
            if learned.kind in (ABANDONED, UNKNOWN) and action is None:
                return await _lost(member, name, owner, epoch, learned.reason or
                                   "it has no record of the session", learned.kind, mark=True)
            if learned.kind == NOT_COMMITTED:
                if action == "discard":
                    raise _refused(
                        f"refusing to discard VM {name!r}: the destination {owner} reports it "
                        f"does not run it ({learned.reason}); this paused copy is the only one")
                return await _reclaimed(member, name, peer, f"the destination {owner} does "
                                        f"not run it ({learned.reason})", learned.kind)
        if action == "discard":
            return Verdict(False, owner, epoch, f"by the operator; etcd names {owner} (epoch "
                           f"{epoch})")
        where = ("is lost (its lease expired)" if not live else
                 "lists it running but does not answer" if runs else "does not report running it")
        raise _in_doubt(
            f"etcd names {owner} (epoch {epoch}) as the owner of VM {name!r}, but that host "
            f"{where}: the copy paused here may be the only one, so it stays paused. It is "
            f"discarded once {owner} reports running it; --discard if you know it has it")
    except (EtcdError, ValueError) as exc:
        raise _in_doubt(f"cannot ask etcd who owns VM {name!r} ({exc}); it stays paused here: "
                        "resolve again once etcd answers") from exc

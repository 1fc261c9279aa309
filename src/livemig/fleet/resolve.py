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
  once it answers that it runs it (its record lags by up to a renewal). A
  destination that answers it does *not* run the VM (its transaction went
  through but it gave up, or it abandoned a post-copy) leaves this copy the
  only one: the key is taken back from it (a new epoch) and the VM resumes
  here. An owner that is lost, or live without the VM, leaves the copy
  paused: it may be the only one. ``--discard`` then is the operator's word.
* **etcd cannot be asked**: nothing is decided; the VM stays paused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ..engine.source.handover import ABANDONED, COMMITTED, NOT_COMMITTED, POSTCOPY, Learned
from ..errors import ControlError
from .etcd import EtcdError
from .member import FleetMember, SourceArbiter


@dataclass
class Verdict:
    resume: bool                  # True: resume the copy here; False: discard it
    owner: str | None             # etcd's owner when asked (after a reclaim: this host)
    epoch: int
    reason: str
    destination_says: str | None = None   # when the destination was asked too


def _refused(text: str) -> ControlError:
    return ControlError(text, error_type="Refused")


def _in_doubt(text: str) -> ControlError:
    return ControlError(text, error_type="InDoubt")


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
        owner, epoch, _ = await member.owner_of(name)
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
        if action == "resume":
            raise _refused(f"refusing to resume VM {name!r} here: etcd names {owner} (epoch "
                           f"{epoch}) as its owner, and only that host may run it")
        live, runs = await member.runs_at(owner, name)
        if runs:
            return Verdict(False, owner, epoch, f"etcd names {owner} (epoch {epoch}), which "
                           "reports running it")
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
            if learned.kind in (NOT_COMMITTED, ABANDONED):
                if action == "discard":
                    raise _refused(
                        f"refusing to discard VM {name!r}: the destination {owner} reports it "
                        f"does not run it ({learned.reason}); this paused copy is the only one")
                return await _reclaimed(member, name, peer, f"the destination {owner} does "
                                        f"not run it ({learned.reason})", learned.kind)
        if action == "discard":
            return Verdict(False, owner, epoch, f"by the operator; etcd names {owner} (epoch "
                           f"{epoch})")
        where = "does not report running it" if live else "is lost (its lease expired)"
        raise _in_doubt(
            f"etcd names {owner} (epoch {epoch}) as the owner of VM {name!r}, but that host "
            f"{where}: the copy paused here may be the only one, so it stays paused. It is "
            f"discarded once {owner} reports running it; --discard if you know it has it")
    except (EtcdError, ValueError) as exc:
        raise _in_doubt(f"cannot ask etcd who owns VM {name!r} ({exc}); it stays paused here: "
                        "resolve again once etcd answers") from exc

"""The fleet's keys in etcd and the records stored under them (JSON).

``/livemig/hosts/<addr>``  a live host's record, under its lease (gone when
                           the lease expires)
``/livemig/known/<addr>``  every host that ever joined (no lease): a host
                           known but without a live record is *lost*
``/livemig/vms/<name>``    ``{"owner": addr, "epoch": n[, "state", "why"]}``: the one host that
                           may run the VM. Only ever changed by a transaction
                           that compares its ``mod_revision`` (the epoch makes
                           every change visible in the value as well)
``/livemig/drain/<addr>``  the host's drain mark (the plan); nothing is placed
                           on a marked host, and it takes ownership of no VM
``/livemig/drain/<addr>/status``  the drain's progress, then its report
``/livemig/moves/<addr>``  moves a balance asked the host to make (one-shot:
                           deleted once run); ``…/status`` their progress
``/livemig/moved/<name>``  the VM was moved by a balance: not again while this
                           key lives (under a lease of the balance window)
``/livemig/incoming/<addr>/<i>``  one of the ``per_host_limit`` slots of
                           migrations into the host that drains and balances
                           may use at a time; held under the source's lease
"""
from __future__ import annotations

import json

ROOT = "/livemig/"
HOSTS = ROOT + "hosts/"
KNOWN = ROOT + "known/"
VMS = ROOT + "vms/"
DRAIN = ROOT + "drain/"
MOVES = ROOT + "moves/"
MOVED = ROOT + "moved/"
INCOMING = ROOT + "incoming/"
CONTROLLER = ROOT + "controller/"
LEADER = CONTROLLER + "leader"
CANDIDATES = CONTROLLER + "candidates/"
CONTROLLER_STATE = CONTROLLER + "state"
STATUS_SUFFIX = "/status"
MAX_RECORD_BYTES = 64 << 10


def host_key(addr: str) -> str:
    return HOSTS + addr


def known_key(addr: str) -> str:
    return KNOWN + addr


def vm_key(name: str) -> str:
    return VMS + name


def drain_key(addr: str) -> str:
    return DRAIN + addr


def status_key(addr: str) -> str:
    return DRAIN + addr + STATUS_SUFFIX


def moves_key(addr: str) -> str:
    return MOVES + addr


def moves_status_key(addr: str) -> str:
    return MOVES + addr + STATUS_SUFFIX


def moved_key(name: str) -> str:
    return MOVED + name


def incoming_slot_key(addr: str, slot: int) -> str:
    return f"{INCOMING}{addr}/{slot}"


def candidate_key(addr: str) -> str:
    return CANDIDATES + addr


# An owner key's ``state`` (absent in keys written before it existed: OWNED).
OWNED = "owned"            # the owner runs the VM, or may have run it
COMMITTED = "committed"    # the owner took it in a handover but never ran it (restarted first)
LOST = "lost"              # the VM died with the owner's daemon (or its post-copy): runs nowhere


def owner_record(owner: str, epoch: int, state: str = OWNED, why: str | None = None) -> bytes:
    record = {"owner": owner, "epoch": int(epoch)}
    if state != OWNED:
        record["state"] = state
    if why:
        record["why"] = why
    return json.dumps(record, sort_keys=True).encode()


def owner_state(value: bytes, *, what: str) -> tuple[str, str | None]:
    """(state, why) of an owner key."""
    record = parse_record(value, what=what)
    state = record.get("state", OWNED)
    if state not in (OWNED, COMMITTED, LOST):
        raise ValueError(f"{what}: unknown owner state {state!r}")
    why = record.get("why")
    return state, why if isinstance(why, str) else None


def parse_record(value: bytes, *, what: str) -> dict:
    """A JSON object from etcd, or ValueError naming what it was."""
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"{what}: record of {len(value)} bytes, more than {MAX_RECORD_BYTES}")
    record = json.loads(value)
    if not isinstance(record, dict):
        raise ValueError(f"{what}: record is not a JSON object")
    return record


def parse_owner(value: bytes, *, what: str) -> tuple[str, int]:
    record = parse_record(value, what=what)
    owner, epoch = record.get("owner"), record.get("epoch")
    if not isinstance(owner, str) or not isinstance(epoch, int):
        raise ValueError(f"{what}: owner record without owner/epoch: {record}")
    return owner, epoch

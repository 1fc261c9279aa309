"""Admission of incoming VMs: the guest memory a destination agrees to host.

Theory of operation
-------------------
Guest memory is mapped MAP_NORESERVE, so a mapping of any size "succeeds"
and the kernel's OOM killer settles the bill later, by killing the daemon
and every VM it runs. An offer is therefore checked before anything is
allocated, against two bounds:

* the daemon's **incoming budget** (``max_incoming_memory_bytes``): the sum
  of the guest memory of every migration currently arriving. Each accepted
  offer holds a :class:`Reservation` until its session ends (the VM then
  either runs here, and the host's available memory shows it, or it was
  discarded and the reservation frees the budget);
* the host's **available memory now** (``MemAvailable`` in /proc/meminfo,
  which already counts the VMs this daemon runs): an offer larger than what
  the host can give, less a margin for everything else, is refused whatever
  the budget says. A VM larger than RAM is never accepted.

The default budget is half of ``MemAvailable`` when the daemon starts. A
refusal is a ``Refuse(RESOURCES)`` naming the numbers, sent before a single
page travels; the source keeps running its VM.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...units import format_size
from ...vm.isa import ISA_REVISION, VCPU_FEATURES

# Of the memory available now, the share one offer may take: the rest is for
# the page cache, the daemon itself and the VMs' own growth.
AVAILABLE_SHARE = 0.75
DEFAULT_BUDGET_SHARE = 0.5
MEMINFO_PATH = "/proc/meminfo"


def available_memory_bytes(path: str = MEMINFO_PATH) -> int:
    """``MemAvailable`` of this host, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable in {path}")


def default_max_incoming_memory_bytes() -> int:
    """Half of the memory available now: the daemon's default budget."""
    return int(available_memory_bytes() * DEFAULT_BUDGET_SHARE)


def compatibility_problem(config: dict) -> str | None:
    """Why this host's vCPU cannot run the offered VM, or None. An offer that
    names no ISA revision or features comes from a source of revision 1."""
    revision, features = config.get("isa_revision", 1), config.get("features", [])
    if not isinstance(revision, int) or not isinstance(features, list) \
            or not all(isinstance(f, str) for f in features):
        return f"malformed ISA revision {revision!r} or features {features!r}"
    if revision > ISA_REVISION:
        return (f"the VM needs ISA revision {revision}; this host's vCPU implements revision "
                f"{ISA_REVISION}. The VM keeps running on the source; move it to a host "
                "running a newer livemig")
    missing = sorted(set(features) - VCPU_FEATURES)
    if missing:
        return (f"the VM needs vCPU features this host lacks: {', '.join(missing)} (it has "
                f"{', '.join(sorted(VCPU_FEATURES))}). The VM keeps running on the source; "
                "move it to a host whose vCPU has them")
    return None


class AdmissionRefused(Exception):
    """An offer this host will not take; the message is the Refuse reason."""


@dataclass
class Reservation:
    """Guest memory promised to one arriving migration, until released."""

    memory_bytes: int
    _budget: "MemoryBudget"
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._budget.reserved_bytes -= self.memory_bytes


class MemoryBudget:
    """The incoming budget of one destination (one daemon's listener)."""

    def __init__(self, max_incoming_memory_bytes: int, *,
                 available=available_memory_bytes):
        if max_incoming_memory_bytes <= 0:
            raise ValueError("max_incoming_memory_bytes must be positive")
        self.max_incoming_memory_bytes = max_incoming_memory_bytes
        self.reserved_bytes = 0
        self._available = available

    def admit(self, name: str, memory_bytes: int) -> Reservation:
        """Reserve ``memory_bytes`` for VM ``name``, or raise AdmissionRefused."""
        want = format_size(memory_bytes)
        usable = int(self._available() * AVAILABLE_SHARE)
        if memory_bytes > usable:
            raise AdmissionRefused(
                f"VM {name!r} needs {want} but this host can give at most {format_size(usable)} "
                f"now ({int(AVAILABLE_SHARE * 100)}% of its available memory); the VM keeps "
                "running on the source. Free memory here or choose another destination")
        if self.reserved_bytes + memory_bytes > self.max_incoming_memory_bytes:
            raise AdmissionRefused(
                f"VM {name!r} needs {want} but this daemon's incoming memory limit is "
                f"{format_size(self.max_incoming_memory_bytes)} with "
                f"{format_size(self.reserved_bytes)} already promised to arriving VMs; "
                "the VM keeps running on the source. Retry once they have arrived, or start "
                "the destination daemon with a larger --max-incoming-memory")
        self.reserved_bytes += memory_bytes
        return Reservation(memory_bytes, self)

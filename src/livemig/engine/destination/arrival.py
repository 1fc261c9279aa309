"""What a host is told about an incoming migration and what it answers
(an :class:`Arrival`, returned by the host's hook), and whether this host can
receive post-copy at all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ...native import postcopy
from ...stats import MigrationStats
from ...vm.machine import VM


@dataclass
class Arrival:
    """What a host is told about an incoming migration, and what it returns."""

    name: str
    peer: str
    stats: MigrationStats
    status: str = "setup"
    error: str | None = None
    on_resumed: Callable[[VM], None] | None = None
    on_status: Callable[[], None] | None = None
    vm: VM | None = None                         # the guest, once it runs here in post-copy
    owed_pages: Callable[[], int] | None = None  # pages it still lacks, while in post-copy
    # Awaited before the offer is accepted; raising LivemigError refuses the offer.
    admit: Callable[[], Awaitable[None]] | None = None
    # Awaited between Commit and resume; raising refuses the VM (fleet ownership).
    commit_gate: Callable[[], Awaitable[None]] | None = None


# host policy: (name, peer, stats) -> Arrival, or raise to refuse
IncomingHook = Callable[[str, str, MigrationStats], Arrival]


def default_hook(name: str, peer: str, stats: MigrationStats) -> Arrival:
    return Arrival(name, peer, stats)


def postcopy_unavailable_reason() -> str | None:
    """Why this host cannot receive post-copy, or None if it can (probed once)."""
    global _POSTCOPY_REASON
    if _POSTCOPY_REASON is None:
        found = postcopy.probe()
        _POSTCOPY_REASON = ("" if found.missing else
                            f"post-copy is unavailable here: userfaultfd MISSING: {found.reason}")
    return _POSTCOPY_REASON or None


_POSTCOPY_REASON: str | None = None

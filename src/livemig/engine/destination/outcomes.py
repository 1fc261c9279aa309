"""What became of the sessions that ended here: the destination's short memory.

Theory of operation
-------------------
A source that loses its connection after sending ``Commit`` cannot know
whether the destination received it. It reconnects with ``Hello(resume=True)``
and the same session id; if the session still lives here (post-copy), it goes
on; if it has ended, the destination answers ``Outcome`` from this book::

    COMMITTED       the VM was resumed here and is this host's: release yours
    NOT_COMMITTED   Commit never arrived; the copy here was discarded unresumed:
                    resume yours
    ABANDONED       resumed here in post-copy, then stopped because owed pages
                    never came: yours is the only copy

A record is written by the session itself as it ends, in the same loop step
that removes it from the live sessions, so a resumed Hello always finds one
or the other. The book is bounded in count and in age: a daemon that receives
many migrations keeps memory proportional to ``MAX_RECORDS``, and a source
learns its outcome within seconds of the link coming back, so
``RECORD_TTL_S`` leaves ample room. A source that asks later than that (or a
destination that restarted) gets "unknown", which keeps its VM in doubt until
the operator resolves it.

The book lives in the daemon's process, and so does every VM it hosts: a
destination daemon killed during a session takes both along. So that a
source can still learn something definite, a daemon keeps a
``SessionJournal`` in its state dir: lines when a session's offer is
accepted (with the kernel's boot id; flushed to disk before the source sends
a page), a line just before the guest resumes here (written, not flushed to
disk: it costs the pause microseconds), and one when the session ends or the
VM starts to migrate on from here. A daemon restarted with that state dir
finds the sessions that were under way when it died:

* no ``resuming`` line and the same boot id (the daemon died, the kernel did
  not, so every line it wrote is there): the guest never ran here. It
  answers ``NOT_COMMITTED`` ("restarted before it resumed the VM"), and
  ``never_resumed()`` names the VM, so that a fleet daemon hands its etcd
  key back (fleet/member.py);
* otherwise (it resumed, or the host rebooted and an unflushed line may be
  gone) ``ABANDONED`` ("nothing of it runs here"): the source's paused copy
  is the only one, and ``livemig vm resolve`` resumes it on that word.

A session whose VM had begun to move on is not claimed: it may run
elsewhere now.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field

from ...errors import MigrationError
from ...protocol import OutcomeCode

MAX_RECORDS = 1024
RECORD_TTL_S = 3600.0


@dataclass(frozen=True)
class OutcomeRecord:
    code: OutcomeCode
    digest: bytes
    reason: str
    vm_name: str
    ended_at_s: float = field(default_factory=time.monotonic)


JOURNAL_FILE_FORMAT = "sessions-{port}.journal"
RESTARTED_REASON = ("the destination daemon was restarted during this migration (it was "
                    "killed or crashed): nothing of the VM runs here; the source's copy is the "
                    "only one")
RESTARTED_UNRUN_REASON = ("the destination daemon was restarted during this migration, before "
                          "it resumed the VM (it was killed or crashed): the VM never ran here; "
                          "the source's copy is the VM")
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot of the kernel ("" where it cannot be told: then no journal
    line left unflushed can be counted on)."""
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass
class JournalEntry:
    """One session under way, as the journal has it."""

    started_at: float          # wall time of its begin line
    name: str
    boot: str = ""             # the boot id it began under ("" unknown)
    resuming: bool = False     # a line says the guest was about to resume here

    def never_resumed(self, boot_now: str) -> bool:
        """Proven: no resuming line, and the kernel that would hold it is
        still the one running (only a daemon died)."""
        return not self.resuming and bool(boot_now) and self.boot == boot_now


class SessionJournal:
    """Sessions under way, on disk (see the module docstring). Lines are
    ``begin <session id hex> <wall time> <vm name>``, ``boot <session id
    hex> <boot id>``, ``resuming <session id hex>`` and ``end <session id
    hex>``; the file is rewritten with only the open sessions when it opens
    and whenever it has grown past a few times ``max_records`` lines."""

    def __init__(self, path: str, *, max_records: int = MAX_RECORDS,
                 ttl_s: float = RECORD_TTL_S):
        self.path = path
        self.max_records = max_records
        self.ttl_s = ttl_s
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.boot = boot_id()
        self.interrupted = self._load()     # {session id: JournalEntry} of a past life
        self._live: dict[bytes, JournalEntry] = {}
        self._lines = 0
        self._compact()

    def begin(self, session_id: bytes, name: str) -> None:
        entry = JournalEntry(time.time(), name, self.boot)
        self._live[session_id] = entry
        self._append(_entry_lines(session_id, entry), durable=True)

    def resuming(self, session_id: bytes) -> None:
        """The guest is about to resume here: written before it does (and
        not flushed to disk — a kill of the daemon leaves it in the page
        cache; a crash of the kernel changes the boot id)."""
        entry = self._live.get(session_id)
        if entry is not None:
            entry.resuming = True     # inside the guest's pause: never a compaction here
            self._append(f"resuming {session_id.hex()}\n", durable=False, compact=False)

    def never_resumed(self) -> set[str]:
        """Names of the VMs whose sessions of a past life provably never
        resumed them here (and none of whose such sessions might have)."""
        unrun = {e.name for e in self.interrupted.values() if e.never_resumed(self.boot)}
        return unrun - {e.name for e in self.interrupted.values()
                        if not e.never_resumed(self.boot)}

    def end(self, session_id: bytes) -> None:
        if self._live.pop(session_id, None) is not None:
            self._append(f"end {session_id.hex()}\n", durable=False)

    def end_name(self, name: str) -> None:
        for sid in [sid for sid, e in self._live.items() if e.name == name]:
            self._live.pop(sid)
            self._append(f"end {sid.hex()}\n", durable=True)

    def _append(self, lines: str, *, durable: bool, compact: bool = True) -> None:
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        self._lines += lines.count("\n")
        if compact and self._lines > 4 * self.max_records:
            self._compact()

    def _load(self) -> dict[bytes, JournalEntry]:
        found: dict[bytes, JournalEntry] = {}
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.rstrip("\n").split(" ", 3)
                    try:
                        sid = bytes.fromhex(parts[1])
                        if parts[0] == "begin" and len(parts) == 4:
                            found[sid] = JournalEntry(float(parts[2]), parts[3])
                        elif parts[0] == "boot" and len(parts) == 3 and sid in found:
                            found[sid].boot = parts[2]
                        elif parts[0] == "resuming" and sid in found:
                            found[sid].resuming = True
                        elif parts[0] == "end":
                            found.pop(sid, None)
                    except (IndexError, ValueError):
                        continue        # a line torn by the death: skip it
        except FileNotFoundError:
            pass
        cutoff = time.time() - self.ttl_s
        kept = [(sid, e) for sid, e in found.items() if e.started_at >= cutoff]
        return dict(kept[-self.max_records:])

    def _compact(self) -> None:
        """Rewrite the file with the sessions of a past life and the live ones."""
        keep = {**self.interrupted, **self._live}
        text = "".join(_entry_lines(sid, entry) for sid, entry in keep.items())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = text.count("\n")


def _entry_lines(sid: bytes, entry: JournalEntry) -> str:
    lines = f"begin {sid.hex()} {entry.started_at:.3f} {entry.name}\n"
    if entry.boot:
        lines += f"boot {sid.hex()} {entry.boot}\n"
    if entry.resuming:
        lines += f"resuming {sid.hex()}\n"
    return lines


class OutcomeBook:
    """Records of ended sessions by session id, oldest dropped first; with a
    journal, also the sessions a killed daemon left unfinished."""

    def __init__(self, *, max_records: int = MAX_RECORDS, ttl_s: float = RECORD_TTL_S,
                 journal: SessionJournal | None = None):
        self.max_records = max_records
        self.ttl_s = ttl_s
        self._records: collections.OrderedDict[bytes, OutcomeRecord] = collections.OrderedDict()
        self.journal = journal
        for sid, entry in (journal.interrupted.items() if journal else ()):
            if entry.never_resumed(journal.boot):
                self._records[sid] = OutcomeRecord(OutcomeCode.NOT_COMMITTED, bytes(16),
                                                   RESTARTED_UNRUN_REASON, entry.name)
            else:
                self._records[sid] = OutcomeRecord(OutcomeCode.ABANDONED, bytes(16),
                                                   RESTARTED_REASON, entry.name)

    def begin(self, session_id: bytes, name: str) -> None:
        """A session's offer was accepted: it is under way here."""
        if self.journal is not None:
            self.journal.begin(session_id, name)

    def resuming(self, session_id: bytes) -> None:
        """The session's guest is about to resume here."""
        if self.journal is not None:
            self.journal.resuming(session_id)

    def never_resumed(self) -> set[str]:
        """VMs a past life of this daemon received but provably never ran."""
        return self.journal.never_resumed() if self.journal is not None else set()

    def moving_on(self, vm_name: str) -> None:
        """VM ``vm_name`` starts to migrate away from this host: a session
        that brought it here is no longer claimed after a restart."""
        if self.journal is not None:
            self.journal.end_name(vm_name)

    def record(self, session_id: bytes, record: OutcomeRecord) -> None:
        if self.journal is not None:
            self.journal.end(session_id)
        self._expire(record.ended_at_s)
        self._records[session_id] = record
        self._records.move_to_end(session_id)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def get(self, session_id: bytes) -> OutcomeRecord | None:
        self._expire(time.monotonic())
        return self._records.get(session_id)

    def __len__(self) -> int:
        return len(self._records)

    def _expire(self, now_s: float) -> None:
        while self._records:
            oldest = next(iter(self._records.values()))
            if now_s - oldest.ended_at_s <= self.ttl_s:
                return
            self._records.popitem(last=False)


class RecoveryExpired(MigrationError):
    """A post-copy source did not come back within the recovery timeout: the
    one failure that ends a post-copy session here. Every other failure of
    its channel set is a break to wait out."""


__all__ = ["JOURNAL_FILE_FORMAT", "MAX_RECORDS", "RECORD_TTL_S", "JournalEntry", "OutcomeBook",
           "OutcomeRecord", "RecoveryExpired", "SessionJournal", "boot_id"]

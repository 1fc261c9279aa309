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
``SessionJournal`` in its state dir: a line when a session's offer is
accepted (flushed to disk before the source sends a page), one when the
session ends or the VM starts to migrate on from here. A daemon restarted
with that state
dir finds the sessions that were under way when it died and answers for
them ``ABANDONED`` ("this daemon restarted during the migration: nothing of
it runs here"): the source's paused copy is the only one, and ``livemig vm
resolve`` resumes it on that word. A session whose VM had begun to move on
is not claimed: it may run elsewhere now.
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


class SessionJournal:
    """Sessions under way, on disk (see the module docstring). Lines are
    ``begin <session id hex> <wall time> <vm name>`` and ``end <session id
    hex>``; the file is rewritten with only the open sessions when it opens
    and whenever it has grown past a few times ``max_records`` lines."""

    def __init__(self, path: str, *, max_records: int = MAX_RECORDS,
                 ttl_s: float = RECORD_TTL_S):
        self.path = path
        self.max_records = max_records
        self.ttl_s = ttl_s
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.interrupted = self._load()     # {session id: (wall time, name)} of a past life
        self._live: dict[bytes, tuple[float, str]] = {}
        self._lines = 0
        self._compact()

    def begin(self, session_id: bytes, name: str) -> None:
        now = time.time()
        self._live[session_id] = (now, name)
        self._append(f"begin {session_id.hex()} {now:.3f} {name}\n", durable=True)

    def end(self, session_id: bytes) -> None:
        if self._live.pop(session_id, None) is not None:
            self._append(f"end {session_id.hex()}\n", durable=False)

    def end_name(self, name: str) -> None:
        for sid in [sid for sid, (_, n) in self._live.items() if n == name]:
            self._live.pop(sid)
            self._append(f"end {sid.hex()}\n", durable=True)

    def _append(self, line: str, *, durable: bool) -> None:
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        self._lines += 1
        if self._lines > 4 * self.max_records:
            self._compact()

    def _load(self) -> dict[bytes, tuple[float, str]]:
        found: dict[bytes, tuple[float, str]] = {}
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.rstrip("\n").split(" ", 3)
                    try:
                        sid = bytes.fromhex(parts[1])
                        if parts[0] == "begin" and len(parts) == 4:
                            found[sid] = (float(parts[2]), parts[3])
                        elif parts[0] == "end":
                            found.pop(sid, None)
                    except (IndexError, ValueError):
                        continue        # a line torn by the death: skip it
        except FileNotFoundError:
            pass
        cutoff = time.time() - self.ttl_s
        kept = [(sid, v) for sid, v in found.items() if v[0] >= cutoff]
        return dict(kept[-self.max_records:])

    def _compact(self) -> None:
        """Rewrite the file with the sessions of a past life and the live ones."""
        keep = {**self.interrupted, **self._live}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for sid, (t, name) in keep.items():
                f.write(f"begin {sid.hex()} {t:.3f} {name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(keep)


class OutcomeBook:
    """Records of ended sessions by session id, oldest dropped first; with a
    journal, also the sessions a killed daemon left unfinished."""

    def __init__(self, *, max_records: int = MAX_RECORDS, ttl_s: float = RECORD_TTL_S,
                 journal: SessionJournal | None = None):
        self.max_records = max_records
        self.ttl_s = ttl_s
        self._records: collections.OrderedDict[bytes, OutcomeRecord] = collections.OrderedDict()
        self.journal = journal
        for sid, (_, name) in (journal.interrupted.items() if journal else ()):
            self._records[sid] = OutcomeRecord(OutcomeCode.ABANDONED, bytes(16),
                                               RESTARTED_REASON, name)

    def begin(self, session_id: bytes, name: str) -> None:
        """A session's offer was accepted: it is under way here."""
        if self.journal is not None:
            self.journal.begin(session_id, name)

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


__all__ = ["JOURNAL_FILE_FORMAT", "MAX_RECORDS", "RECORD_TTL_S", "OutcomeBook", "OutcomeRecord",
           "RecoveryExpired", "SessionJournal"]

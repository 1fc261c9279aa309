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
"""
from __future__ import annotations

import collections
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


class OutcomeBook:
    """Records of ended sessions by session id, oldest dropped first."""

    def __init__(self, *, max_records: int = MAX_RECORDS, ttl_s: float = RECORD_TTL_S):
        self.max_records = max_records
        self.ttl_s = ttl_s
        self._records: collections.OrderedDict[bytes, OutcomeRecord] = collections.OrderedDict()

    def record(self, session_id: bytes, record: OutcomeRecord) -> None:
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


__all__ = ["MAX_RECORDS", "RECORD_TTL_S", "OutcomeBook", "OutcomeRecord", "RecoveryExpired"]

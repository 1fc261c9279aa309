"""A daemon killed during a session learns at its restart that nothing of it runs there."""
from livemig.engine.destination.outcomes import (RESTARTED_REASON, OutcomeBook, OutcomeRecord,
                                                 SessionJournal)
from livemig.protocol import OutcomeCode

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def test_sessions_under_way_at_a_death_are_abandoned_after_the_restart(tmp_path):
    path = str(tmp_path / "state" / "sessions-7400.journal")
    book = OutcomeBook(journal=SessionJournal(path))
    for sid in (A, B, C):
        book.begin(sid, f"vm-{sid[:1].decode()}")
    book.record(A, OutcomeRecord(OutcomeCode.COMMITTED, bytes(16), "resumed here", "vm-a"))
    book.moving_on("vm-b")    # B's VM starts to migrate on: it may run elsewhere
    # the process dies here; a new one opens the same journal
    again = OutcomeBook(journal=SessionJournal(path))
    assert again.get(A) is None and again.get(B) is None
    record = again.get(C)
    assert record.code is OutcomeCode.ABANDONED and record.reason == RESTARTED_REASON
    assert record.vm_name == "vm-c"
    # still claimed after a second restart, and the file holds only that one
    third = OutcomeBook(journal=SessionJournal(path))
    assert third.get(C).code is OutcomeCode.ABANDONED
    assert open(path).read().count("\n") == 1


def test_a_torn_last_line_is_skipped(tmp_path):
    path = str(tmp_path / "j")
    journal = SessionJournal(path)
    journal.begin(A, "vm1")
    with open(path, "a") as f:
        f.write("begin 6262")            # cut short by the death
    assert set(SessionJournal(path).interrupted) == {A}


def test_the_journal_stays_bounded(tmp_path):
    path = str(tmp_path / "j")
    journal = SessionJournal(path, max_records=4)
    for i in range(100):
        sid = i.to_bytes(16, "little")
        journal.begin(sid, "vm")
        journal.end(sid)
    assert open(path).read().count("\n") <= 4 * 4 + 1
    assert SessionJournal(path).interrupted == {}

"""A daemon killed during a session learns at its restart that nothing of it runs there."""
from livemig.engine.destination import outcomes
from livemig.engine.destination.outcomes import (RESTARTED_REASON, RESTARTED_UNRUN_REASON,
                                                 OutcomeBook, OutcomeRecord, SessionJournal,
                                                 boot_id)
from livemig.protocol import OutcomeCode

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def test_sessions_under_way_at_a_death_are_abandoned_after_the_restart(tmp_path):
    path = str(tmp_path / "state" / "sessions-7400.journal")
    book = OutcomeBook(journal=SessionJournal(path))
    for sid in (A, B, C):
        book.begin(sid, f"vm-{sid[:1].decode()}")
    book.record(A, OutcomeRecord(OutcomeCode.COMMITTED, bytes(16), "resumed here", "vm-a"))
    book.moving_on("vm-b")    # B's VM starts to migrate on: it may run elsewhere
    book.resuming(C)          # C's guest was about to run here
    # the process dies here; a new one opens the same journal
    again = OutcomeBook(journal=SessionJournal(path))
    assert again.get(A) is None and again.get(B) is None
    record = again.get(C)
    assert record.code is OutcomeCode.ABANDONED and record.reason == RESTARTED_REASON
    assert record.vm_name == "vm-c"
    assert again.never_resumed() == set()
    # still claimed after a second restart, and the file holds only that one
    third = OutcomeBook(journal=SessionJournal(path))
    assert third.get(C).code is OutcomeCode.ABANDONED
    assert open(path).read().splitlines() == [
        f"begin {C.hex()} {third.journal.interrupted[C].started_at:.3f} vm-c",
        f"boot {C.hex()} {boot_id()}", f"resuming {C.hex()}"]


def test_a_session_killed_before_its_guest_resumed_says_it_never_ran(tmp_path, monkeypatch):
    """No resuming line and the same kernel: the VM provably never ran here
    (NOT_COMMITTED, and named by never_resumed); after a reboot the line may
    have been lost with the page cache, so only ABANDONED can be said."""
    path = str(tmp_path / "j")
    book = OutcomeBook(journal=SessionJournal(path))
    book.begin(A, "vm1")
    again = OutcomeBook(journal=SessionJournal(path))
    record = again.get(A)
    assert record.code is OutcomeCode.NOT_COMMITTED and record.reason == RESTARTED_UNRUN_REASON
    assert again.never_resumed() == {"vm1"}
    monkeypatch.setattr(outcomes, "boot_id", lambda: "another-boot")
    rebooted = OutcomeBook(journal=SessionJournal(path))
    assert rebooted.get(A).code is OutcomeCode.ABANDONED and rebooted.never_resumed() == set()


def test_a_name_with_one_session_that_may_have_run_is_not_called_unrun(tmp_path):
    path = str(tmp_path / "j")
    book = OutcomeBook(journal=SessionJournal(path))
    book.begin(A, "vm1")
    book.begin(B, "vm1")
    book.resuming(B)
    assert OutcomeBook(journal=SessionJournal(path)).never_resumed() == set()


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

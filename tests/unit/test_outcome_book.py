"""The destination's record of ended sessions is bounded in count and in age."""
import time

from livemig.engine.destination.outcomes import OutcomeBook, OutcomeRecord
from livemig.protocol import OutcomeCode


def _record(ended_at_s: float) -> OutcomeRecord:
    return OutcomeRecord(OutcomeCode.COMMITTED, bytes(16), "resumed here", "vm",
                         ended_at_s=ended_at_s)


def test_oldest_records_go_first_past_the_count():
    book = OutcomeBook(max_records=3, ttl_s=3600)
    now = time.monotonic()
    for i in range(5):
        book.record(bytes([i]) * 16, _record(now))
    assert len(book) == 3
    assert book.get(bytes([0]) * 16) is None and book.get(bytes([1]) * 16) is None
    assert book.get(bytes([4]) * 16).code is OutcomeCode.COMMITTED


def test_records_expire_after_their_age():
    book = OutcomeBook(max_records=10, ttl_s=60)
    now = time.monotonic()
    book.record(b"o" * 16, _record(now - 61))
    book.record(b"n" * 16, _record(now))
    assert book.get(b"o" * 16) is None
    assert book.get(b"n" * 16) is not None and len(book) == 1


def test_a_session_recorded_again_is_the_newest():
    book = OutcomeBook(max_records=2, ttl_s=3600)
    now = time.monotonic()
    book.record(b"a" * 16, _record(now))
    book.record(b"b" * 16, _record(now))
    book.record(b"a" * 16, _record(now))
    book.record(b"c" * 16, _record(now))
    assert book.get(b"a" * 16) is not None and book.get(b"b" * 16) is None

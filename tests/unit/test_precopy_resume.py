"""Resumable pre-copy bookkeeping: what the destination reports, what the source
resends, and that a hostile or confused report is refused.

The model test plays rounds against a simulated guest and a destination that
may lose the tail of any round, with writes landing between and during rounds,
and checks that after the resume the destination's memory equals the guest's
while fewer pages than a full resend went again."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from livemig.engine.destination.resume import RoundProgress
from livemig.engine.source.resume import UnackedRounds
from livemig.errors import RemoteProtocolError
from livemig.protocol import ResumeReport
from livemig.protocol.spec import NO_ROUND

NPAGES = 64


def _report(acked: int, landed=()) -> ResumeReport:
    progress = RoundProgress(NPAGES)
    if acked != NO_ROUND:
        progress.acked(acked)
    progress.landed(np.array(landed, dtype=np.int64))
    return progress.report()


def test_a_break_in_round_zero_resends_only_what_did_not_land():
    rounds = UnackedRounds(NPAGES)
    rounds.start(0)
    rounds.sent(0, np.arange(40))
    todo = rounds.resend(_report(NO_ROUND, range(30)), dirtied_since=np.array([3]))
    assert todo.tolist() == [3] + list(range(30, 40))


def test_a_lost_round_ack_counts_as_acked():
    rounds = UnackedRounds(NPAGES)
    rounds.start(0)
    rounds.sent(0, np.arange(NPAGES))
    rounds.start(1)
    rounds.sent(1, np.array([5, 6]))
    todo = rounds.resend(_report(0, [5]), dirtied_since=np.array([], dtype=np.int64))
    assert todo.tolist() == [6]
    assert rounds.last_acked == 0 and rounds.held_bytes == NPAGES


@pytest.mark.parametrize("report, why", [
    (ResumeReport(NO_ROUND, NPAGES * 2, bytes(NPAGES // 4)), "covers 128 pages"),
    (_report(7), "round 7, which was never sent"),
    (_report(NO_ROUND, [50]), "claims pages of round 0"),
])
def test_a_report_that_does_not_add_up_is_refused(report, why):
    rounds = UnackedRounds(NPAGES)
    rounds.start(0)
    rounds.sent(0, np.arange(40))
    with pytest.raises(RemoteProtocolError, match=why):
        rounds.resend(report, dirtied_since=np.array([], dtype=np.int64))


def test_an_ack_going_backwards_is_refused():
    rounds = UnackedRounds(NPAGES)
    for r in range(3):
        rounds.start(r)
        rounds.sent(r, np.arange(4))
    rounds.acked(2)
    with pytest.raises(RemoteProtocolError, match="round 2 was acked before"):
        rounds.resend(_report(1), dirtied_since=np.array([], dtype=np.int64))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_resume_leaves_the_destination_equal_to_the_guest(data):
    """A model: guest pages hold versions; rounds send pages; writes happen
    between reads; a break loses the tail of one round; resume must fix it."""
    npages = 32
    guest = np.zeros(npages, dtype=np.int64)
    dest = np.full(npages, -1, dtype=np.int64)
    dirty = np.ones(npages, dtype=bool)            # the tracker: everything at start
    rounds = UnackedRounds(npages)
    progress = RoundProgress(npages)
    nrounds = data.draw(st.integers(1, 4))
    break_round = data.draw(st.integers(0, nrounds - 1))
    version = 1
    for r in range(nrounds):
        pages = np.flatnonzero(dirty)
        dirty[:] = False                           # collect and re-arm
        rounds.start(r)
        in_flight = []
        for p in pages:
            if data.draw(st.booleans()):           # the guest writes somewhere
                w = data.draw(st.integers(0, npages - 1))
                guest[w] = version
                version += 1
                dirty[w] = True
            in_flight.append((p, guest[p]))        # read for sending
            rounds.sent(r, np.array([p]))
        if r == break_round:
            keep = data.draw(st.integers(0, len(in_flight)))
            for p, v in in_flight[:keep]:
                dest[p] = v
                progress.landed(np.array([p]))
            break
        for p, v in in_flight:
            dest[p] = v
        progress.acked(r)
        if data.draw(st.booleans()):               # the ack reaches the source
            rounds.acked(r)
    for _ in range(data.draw(st.integers(0, 3))):  # writes while the link is down
        w = data.draw(st.integers(0, npages - 1))
        guest[w] = version
        version += 1
        dirty[w] = True
    todo = rounds.resend(progress.report(), dirtied_since=np.flatnonzero(dirty))
    dirty[:] = False
    for p in todo:                                 # the guest is paused from here on
        dest[int(p)] = guest[int(p)]
    assert (dest == guest).all()


def test_a_report_settles_what_it_says_and_the_pages_owed_survive_a_second_break():
    rounds = UnackedRounds(NPAGES)
    progress = RoundProgress(NPAGES)
    rounds.start(0, np.arange(40))
    progress.landed(np.arange(30))
    todo = rounds.resend(progress.report(), dirtied_since=np.array([50]))
    assert todo.tolist() == list(range(30, 40)) + [50]
    assert (rounds.resent_pages, rounds.avoided_pages) == (10, 30)
    # The link breaks again before the next round starts: nothing new landed
    # (the destination forgot what it reported), and nothing owed is lost.
    again = rounds.resend(progress.report(), dirtied_since=np.array([3]))
    assert again.tolist() == [3] + todo.tolist()
    rounds.start(1, again)
    progress.landed(again[:5].astype(np.int64))
    last = rounds.resend(progress.report(), dirtied_since=np.array([], dtype=np.int64))
    assert last.tolist() == again[5:].tolist()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_repeated_breaks_leave_the_destination_equal_to_the_guest(data):
    """The model above with any number of breaks, in any round (the resumed
    ones included), lost acks, lost reports, and breaks before a resumed round
    could start; then the final round with the guest paused."""
    npages = 24
    guest = np.zeros(npages, dtype=np.int64)
    dest = np.full(npages, -1, dtype=np.int64)
    dirty = np.zeros(npages, dtype=bool)
    rounds = UnackedRounds(npages)
    progress = RoundProgress(npages)
    version = 1
    pages = np.arange(npages)

    def write():
        nonlocal version
        w = data.draw(st.integers(0, npages - 1))
        guest[w] = version
        version += 1
        dirty[w] = True

    def resume():
        report = progress.report()
        if data.draw(st.booleans()):               # that report was lost: ask again
            report = progress.report()
        todo = rounds.resend(report, dirtied_since=np.flatnonzero(dirty))
        dirty[:] = False
        return todo

    for r in range(data.draw(st.integers(1, 6))):
        rounds.start(r, pages)
        in_flight = []
        for p in pages:
            if data.draw(st.booleans()):
                write()
            in_flight.append((int(p), guest[p]))
        keep = data.draw(st.integers(0, len(in_flight)))
        broken = keep < len(in_flight) or data.draw(st.booleans())   # or the ack is lost
        for p, v in in_flight[:keep]:
            dest[p] = v
            progress.landed(np.array([p]))
        if not broken:
            progress.acked(r)
            rounds.acked(r)
            pages = np.flatnonzero(dirty)
            dirty[:] = False
            continue
        if keep == len(in_flight):
            progress.acked(r)                      # applied in full, the ack lost
        for _ in range(data.draw(st.integers(0, 2))):
            write()                                # while the link is down
        pages = resume()
        while data.draw(st.booleans()):            # broken again before the next round
            write()
            pages = resume()
    final = np.union1d(pages, np.flatnonzero(dirty))
    for p in final:                                # the guest is paused from here on
        dest[int(p)] = guest[int(p)]
    assert (dest == guest).all()

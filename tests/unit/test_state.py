"""Transition tables: the valid conversations pass, everything else raises in one place."""
import pytest

from livemig.protocol import events as ev
from livemig.protocol.state import (EVENT_WORDS, STATE_WORDS, TABLES, Conversation, Role, State,
                                    TransitionError, transition_text)
from support import conversations as conv

S, D = Role.SOURCE, Role.DESTINATION


@pytest.mark.parametrize("name", sorted(conv.ALL))
def test_valid_conversations_reach_their_end(name):
    c = Conversation()
    for sender, event in conv.ALL[name]():
        c.process(sender, event)
    if name.startswith("control"):
        assert c.state is State.DONE
    else:
        assert c.state is State.OPEN
    assert c.process_eof(S) is State.CLOSED


def test_tables_only_name_real_events_and_roles():
    for kind, table in TABLES.items():
        for (state, sender, cls, variant), nxt in table.items():
            assert cls in ev.ALL_EVENTS and isinstance(sender, Role)
            assert isinstance(state, State) and isinstance(nxt, State)
            assert not state.terminal


def _prefix_states(conversation):
    """Yield (conversation so far, sender, event) for every step."""
    c = Conversation()
    for sender, event in conversation:
        yield c, sender, event
        c.process(sender, event)


@pytest.mark.parametrize("name", sorted(conv.ALL))
def test_wrong_sender_is_always_illegal(name):
    # Replaying any step with the roles swapped must raise (no message is
    # sendable by both sides except Abort).
    for c, sender, event in _prefix_states(conv.ALL[name]()):
        if isinstance(event, ev.Abort):
            continue
        probe = Conversation(c.kind)
        probe.state = c.state
        with pytest.raises(TransitionError):
            probe.process(sender.peer, event)


def test_nothing_before_hello():
    for event in (ev.Ping(1), ev.Abort(ev.Phase.HANDSHAKE), ev.Accept(), ev.RoundStart(0)):
        for role in Role:
            with pytest.raises(TransitionError):
                Conversation(ev.ChannelKind.CONTROL).process(role, event)


def test_pages_outside_a_round_and_wrong_variants():
    c = Conversation()
    for sender, event in conv.control_precopy()[:4]:  # through Accept
        c.process(sender, event)
    with pytest.raises(TransitionError, match="PageBatch"):
        c.process(S, ev.PageBatch(0, 1, b"x"))
    c.process(S, ev.RoundStart(0))
    with pytest.raises(TransitionError, match="urgent"):
        c.process(S, ev.PageBatch(0, 1, b"x", ev.BATCH_URGENT))
    with pytest.raises(TransitionError, match="Switchover"):
        c.process(S, ev.Switchover(b"", bytes(16)))


def test_precopy_switchover_has_no_postcopy_traffic():
    c = Conversation()
    steps = conv.control_precopy()
    for sender, event in steps[:-4]:   # up to Switchover(precopy)
        c.process(sender, event)
    assert c.state is State.SWITCHOVER
    c.process(D, ev.Verified())
    c.process(S, ev.Commit())
    c.process(D, ev.Resumed())
    with pytest.raises(TransitionError):
        c.process(D, ev.PageRequest(1, (1,)))


def test_handover_needs_verified_then_commit():
    """The destination may not resume before the source committed, and the
    source may not commit before the destination verified."""
    c = Conversation()
    for sender, event in conv.control_precopy()[:-4]:
        c.process(sender, event)
    with pytest.raises(TransitionError):
        c.process(D, ev.Resumed())
    c = Conversation()
    for sender, event in conv.control_precopy()[:-4]:
        c.process(sender, event)
    with pytest.raises(TransitionError):
        c.process(S, ev.Commit())


def test_abort_from_either_side_then_terminal():
    for role in Role:
        c = Conversation()
        for sender, event in conv.control_precopy()[:5]:
            c.process(sender, event)
        c.process(role, ev.Abort(c.phase, "stop"))
        assert c.state is State.ABORTED and c.state.terminal
        with pytest.raises(TransitionError, match=r"sent a liveness check after the migration had "
                           r"been aborted \[protocol: Ping in state aborted .*; the "
                           r"conversation is over\]"):
            c.process(role, ev.Ping(1))
        assert c.process_eof(role) is State.CLOSED


def test_early_eof_is_an_error_on_control_but_not_on_bulk():
    c = Conversation()
    for sender, event in conv.control_precopy()[:4]:
        c.process(sender, event)
    with pytest.raises(TransitionError, match="closed"):
        c.process_eof(S)
    b = Conversation()
    for sender, event in conv.bulk()[:2]:
        b.process(sender, event)
    with pytest.raises(TransitionError, match="destination closed"):
        b.process_eof(D)     # the destination vanished
    assert b.process_eof(S) is State.CLOSED


def test_hello_kind_must_match_expected_kind():
    c = Conversation(ev.ChannelKind.BULK)
    with pytest.raises(TransitionError, match="control"):
        c.process(S, ev.Hello(1, 1, ev.ChannelKind.CONTROL, bytes(16)))


def test_phases_follow_the_migration():
    c = Conversation()
    seen = []
    for sender, event in conv.control_hybrid():
        c.process(sender, event)
        if not seen or seen[-1] != c.phase:
            seen.append(c.phase)
    assert seen == [ev.Phase.HANDSHAKE, ev.Phase.PRECOPY, ev.Phase.SWITCHOVER,
                    ev.Phase.POSTCOPY, ev.Phase.COMPLETE]


def test_no_pages_after_an_invalidation_and_only_a_postcopy_switchover():
    """Once the destination registered for post-copy (first PageInvalidate)
    no page batch or pre-copy switchover may come: either would write memory
    registered for MISSING faults."""
    steps = conv.control_hybrid_invalidating()
    first = next(i for i, (_, e) in enumerate(steps) if isinstance(e, ev.PageInvalidate))
    for bad in (ev.RoundStart(5), ev.PageBatch(5, 1, b"x"), ev.Switchover(b"", bytes(16))):
        c = Conversation()
        for sender, event in steps[:first + 1]:
            c.process(sender, event)
        assert c.state is State.INVALIDATING
        with pytest.raises(TransitionError):
            c.process(S, bad)
    with pytest.raises(TransitionError):
        Conversation(ev.ChannelKind.BULK).process(S, ev.PageInvalidate(0))


def _after(steps, cls, nth=1):
    """The conversation just after the ``nth`` event of class ``cls``."""
    c = Conversation()
    for sender, event in steps:
        c.process(sender, event)
        if type(event) is cls:
            nth -= 1
            if nth == 0:
                return c
    raise AssertionError(f"no {cls.__name__} in the conversation")


def _ready(resume=False):
    return _after(conv.handshake(ev.ChannelKind.CONTROL, resume), ev.Welcome)


def _open(kind):
    return _after(conv.handshake(kind), ev.Welcome)


PRECOPY, HYBRID = conv.control_precopy(), conv.control_hybrid_invalidating()

# (where, sender, event, state named in the error, what it expects there): every
# point where an engine waits for one message, and one that may not come there.
OUT_OF_ORDER = [
    # the source waits for the answer to its offer
    ("offer", lambda: _after(PRECOPY, ev.MigrationOffer), D, ev.Ping(1), "offered",
     "Accept or Refuse from the destination"),
    ("offer", lambda: _after(PRECOPY, ev.MigrationOffer), D, ev.RoundAck(0, 0), "offered",
     "Accept or Refuse"),
    # the source waits for a round's ack
    ("round ack", lambda: _after(PRECOPY, ev.RoundEnd), D, ev.PresentReport(0, b""), "precopy",
     "RoundAck from the destination"),
    ("round ack", lambda: _after(PRECOPY, ev.RoundEnd), D, ev.Verified(), "precopy",
     "RoundAck"),
    # the source waits for the verdict, then for Resumed
    ("verdict", lambda: _after(PRECOPY, ev.Switchover), D, ev.Resumed(), "switchover",
     "Verified or VerifyFailed from the destination"),
    ("resumed", lambda: _after(PRECOPY, ev.Commit), D, ev.Verified(), "committed",
     "Resumed from the destination"),
    # the source waits for an invalidation round's ack
    ("invalidation ack", lambda: _after(HYBRID, ev.PageInvalidate), D,
     ev.PresentReport(20, bytes(3)), "invalidating", "RoundAck from the destination"),
    # the source waits for a PresentReport on a resumed control channel
    ("present report", lambda: _ready(resume=True), D, ev.Accept(), "resumed",
     "PresentReport or Outcome or ResumeReport from the destination"),
    ("present report", lambda: _ready(resume=True), S,
     ev.MigrationOffer({}, ev.Mode.PRECOPY, 1), "resumed", "nothing from the source"),
    # a PresentReport belongs to a resumed channel only
    ("present report", _ready, D, ev.PresentReport(1, b"\x01"), "ready",
     "ProbeResult from the destination"),
    # the destination waits for an offer (probes and Pings aside)
    ("offer wait", _ready, S, ev.RoundStart(0), "ready", "MigrationOffer"),
    ("offer wait", _ready, S, ev.Pong(1), "ready", "MigrationOffer"),
    # the destination receives rounds until a Switchover
    ("rounds", lambda: _after(PRECOPY, ev.Accept), S, ev.Commit(), "precopy",
     "RoundStart or Switchover(precopy)"),
    ("rounds", lambda: _after(PRECOPY, ev.Accept), S, ev.Pong(1), "precopy", "RoundStart"),
    # the destination waits for Commit
    ("commit", lambda: _after(PRECOPY, ev.Verified), S, ev.Ping(1), "verified",
     "Commit from the source"),
    ("commit", lambda: _after(PRECOPY, ev.Verified), S, ev.Complete(), "verified", "Commit"),
    # post-copy control: pages and requests travel on the bulk and urgent channels
    ("postcopy control", lambda: _after(HYBRID, ev.Resumed), S,
     ev.PageBatch(0, 1, b"x", ev.BATCH_POSTCOPY), "postcopy", "Ping from the source"),
    ("postcopy control", lambda: _after(HYBRID, ev.Resumed), D, ev.PageRequest(1, (1,)),
     "postcopy", "PostcopyComplete from the destination"),
    ("postcopy control", lambda: _after(HYBRID, ev.Resumed), D,
     ev.VerifyFailed(bytes(16), bytes(16)), "postcopy", "PostcopyComplete"),
    ("postcopy control", lambda: _after(HYBRID, ev.Resumed), S, ev.Complete(), "postcopy",
     "expected Ping from the source"),
    ("postcopy done", lambda: _after(HYBRID, ev.PostcopyComplete), S, ev.Ping(1),
     "postcopy-done", "Complete from the source"),
    # bulk and urgent channels carry pages (and liveness) only
    ("bulk", lambda: _open(ev.ChannelKind.BULK), S, ev.Commit(), "open", "PageBatch"),
    ("bulk", lambda: _open(ev.ChannelKind.BULK), D, ev.Ping(1), "open",
     "StreamAck from the destination"),
    ("bulk", lambda: _open(ev.ChannelKind.BULK), D, ev.RoundAck(0, 0), "open", "StreamAck"),
    ("bulk", lambda: _open(ev.ChannelKind.BULK), S, ev.StreamAck(0, 0), "open",
     "StreamEnd"),
    ("urgent", lambda: _open(ev.ChannelKind.URGENT), S, ev.RoundEnd(0, 0, 0), "open",
     "Ping or PageBatch(urgent) from the source"),
    # the probe's Pongs and result answer a question
    ("pong", _ready, D, ev.Pong(1), "ready", "answers no Ping"),
    ("probe result", _ready, D, ev.ProbeResult(0, 0, 0), "ready", "answers no ProbeEnd"),
]


@pytest.mark.parametrize("where, make, sender, event, state, expected", OUT_OF_ORDER,
                         ids=[f"{row[0]}-{type(row[3]).__name__}" for row in OUT_OF_ORDER])
def test_out_of_order_messages_are_refused_by_the_table(where, make, sender, event, state,
                                                        expected):
    c = make()
    assert c.state.value[0] == state
    with pytest.raises(TransitionError) as info:
        c.process(sender, event)
    text = str(info.value)
    assert text.startswith(f"the {sender.value} sent {EVENT_WORDS[type(event)]} ")
    assert f"[protocol: {type(event).__name__}" in text
    assert f" in state {state} " in text and expected in text
    assert c.state.value[0] == state   # nothing changed


def test_a_pong_answers_one_ping_and_may_cross_later_messages():
    c = _after(PRECOPY, ev.Accept)
    c.process(S, ev.Ping(1))
    c.process(S, ev.RoundStart(0))
    assert c.process(D, ev.Pong(1)) is State.IN_ROUND
    with pytest.raises(TransitionError, match="answers no Ping"):
        c.process(D, ev.Pong(1))


def test_a_probe_result_answers_one_probe_end():
    c = _ready()
    c.process(S, ev.ProbeEnd(0, 0))
    c.process(D, ev.ProbeResult(0, 0, 0))
    with pytest.raises(TransitionError, match="answers no ProbeEnd"):
        c.process(D, ev.ProbeResult(0, 0, 0))


def test_only_the_source_pings():
    for c in (_ready(), _after(PRECOPY, ev.Accept), _open(ev.ChannelKind.URGENT)):
        with pytest.raises(TransitionError, match=r"the destination sent a liveness check .*"
                           r"\[protocol: Ping in state"):
            c.process(D, ev.Ping(1))


def test_a_resumed_precopy_goes_on_with_its_rounds():
    c = _ready(resume=True)
    assert c.process(D, ev.ResumeReport(2, 8, b"\x0f")) is State.PRECOPY
    assert c.process(S, ev.RoundStart(3)) is State.IN_ROUND
    # a ResumeReport answers a resumed Hello only
    fresh = _after(PRECOPY, ev.Accept)
    with pytest.raises(TransitionError, match="sent a report of what it holds of an interrupted pre-copy"):
        fresh.process(D, ev.ResumeReport(0, 8, b"\x00"))


def test_a_resumed_control_channel_goes_straight_to_postcopy():
    c = _ready(resume=True)
    assert c.state is State.RESUMED
    assert c.process(D, ev.PresentReport(8, b"\xff")) is State.POSTCOPY
    refused = Conversation()
    refused.process(S, ev.Hello(1, 1, ev.ChannelKind.CONTROL, bytes(16), resume=True))
    assert refused.process(D, ev.Refuse(ev.RefuseCode.SESSION)) is State.REFUSED


def test_every_message_and_state_has_words_for_users():
    from livemig.protocol.events import WIRE_IDS

    assert set(WIRE_IDS.values()) <= set(EVENT_WORDS)
    assert set(State) == set(STATE_WORDS)


def test_a_refused_transition_reads_in_the_users_terms_first():
    text = transition_text(Role.DESTINATION, ev.RoundAck, "", State.ABORTED, "control",
                           "the conversation is over")
    assert text == ("the destination sent a round acknowledgement after the migration had been "
                    "aborted [protocol: RoundAck in state aborted on the control channel; the "
                    "conversation is over]")
    eof = transition_text(Role.DESTINATION, None, "", State.COMMITTED_POSTCOPY, "control", "")
    assert eof == ("the destination closed the connection after the commit, before the "
                   "destination confirmed the VM runs there [protocol: end of stream in state "
                   "committed-postcopy on the control channel]")
    # One phase per message: the detail names the state, never a second phase.
    assert "phase" not in eof


def test_an_early_end_of_stream_names_what_was_cut_short():
    c = _after(PRECOPY, ev.Accept)
    with pytest.raises(TransitionError, match=r"^the destination closed the connection during "
                       r"pre-copy \[protocol: end of stream in state precopy on the control "
                       r"channel\]$"):
        c.process_eof(D)

"""Transition tables: the valid conversations pass, everything else raises in one place."""
import pytest

from livemig.protocol import events as ev
from livemig.protocol.state import TABLES, Conversation, Role, State, TransitionError
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
    # sendable by both sides except Abort, Ping and Pong).
    for c, sender, event in _prefix_states(conv.ALL[name]()):
        if isinstance(event, (ev.Ping, ev.Pong, ev.Abort)):
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
        with pytest.raises(TransitionError):
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

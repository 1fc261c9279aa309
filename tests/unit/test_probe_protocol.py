"""The bandwidth probe: allowed only in READY of a control channel, strict payloads."""
import struct

import pytest

from livemig.protocol import events as ev
from livemig.protocol.events import PayloadError, decode_event
from livemig.protocol.state import Conversation, Role, State, TransitionError

S, D = Role.SOURCE, Role.DESTINATION


def ready() -> Conversation:
    c = Conversation()
    c.process(S, ev.Hello(1, 1, ev.ChannelKind.CONTROL, bytes(16)))
    c.process(D, ev.Welcome(1))
    assert c.state is State.READY
    return c


def test_probe_then_hang_up_is_a_normal_ending():
    c = ready()
    for i in range(3):
        assert c.process(S, ev.ProbeData(i, b"x" * 10)) is State.READY
    assert c.process(S, ev.ProbeEnd(3, 30)) is State.READY
    assert c.process(D, ev.ProbeResult(2, 20, 1000)) is State.READY
    assert c.process_eof(S) is State.CLOSED


def test_probe_then_offer_still_migrates():
    c = ready()
    c.process(S, ev.ProbeData(0, b""))
    c.process(S, ev.ProbeEnd(1, 0))
    c.process(D, ev.ProbeResult(0, 0, 0))
    assert c.process(S, ev.MigrationOffer({"name": "vm"}, ev.Mode.PRECOPY, 1)) is State.OFFERED


@pytest.mark.parametrize("sender,event", [
    (D, ev.ProbeData(0, b"")), (D, ev.ProbeEnd(0, 0)), (S, ev.ProbeResult(0, 0, 0))])
def test_probe_events_have_one_sender(sender, event):
    with pytest.raises(TransitionError):
        ready().process(sender, event)


def test_no_probe_once_a_migration_is_offered():
    c = ready()
    c.process(S, ev.MigrationOffer({"name": "vm"}, ev.Mode.PRECOPY, 1))
    c.process(D, ev.Accept())
    with pytest.raises(TransitionError, match="ProbeData"):
        c.process(S, ev.ProbeData(0, b""))


def test_probe_not_on_bulk_channels():
    c = Conversation()
    c.process(S, ev.Hello(1, 1, ev.ChannelKind.BULK, bytes(16)))
    c.process(D, ev.Welcome(1))
    with pytest.raises(TransitionError):
        c.process(S, ev.ProbeData(0, b""))


def test_destination_hanging_up_in_ready_is_still_an_error():
    with pytest.raises(TransitionError, match="destination closed"):
        ready().process_eof(D)


@pytest.mark.parametrize("cls,payload", [
    (ev.ProbeData, struct.pack("<II", 0, 1)),                  # reserved
    (ev.ProbeEnd, struct.pack("<IIQ", 1, 7, 0)),                # reserved
    (ev.ProbeEnd, struct.pack("<IIQ", 1, 0, (1 << 30) + 1)),    # over the cap
    (ev.ProbeResult, struct.pack("<IIQQ", 1, 1, 0, 0)),         # reserved
])
def test_malformed_probe_payloads(cls, payload):
    with pytest.raises(PayloadError):
        decode_event(cls.WIRE_ID, 0, memoryview(payload))


def test_probe_data_is_not_copied():
    filler = bytearray(4096)
    _, parts = ev.ProbeData(5, filler).encode()
    assert parts[1].obj is filler


def test_stream_probe_questions_and_answers_leave_ready():
    c = ready()
    assert c.process(S, ev.StreamProbe(2, 500, 8 << 20)) is State.READY
    assert c.process(D, ev.StreamProbeGrant(2, 500, 8 << 20)) is State.READY
    assert c.process(S, ev.StreamProbeEnd(10, 40960)) is State.READY
    assert c.process(D, ev.StreamProbeResult(10, 40960, 1000, 500)) is State.READY
    assert c.process(S, ev.MigrationOffer({"name": "vm"}, ev.Mode.PRECOPY, 1)) is State.OFFERED


@pytest.mark.parametrize("answer", [ev.StreamProbeGrant(1, 1, 4096),
                                    ev.StreamProbeResult(0, 0, 0, 0)])
def test_a_stream_probe_answer_must_answer_something(answer):
    with pytest.raises(TransitionError, match="answers no"):
        ready().process(D, answer)


@pytest.mark.parametrize("sender,event", [
    (D, ev.StreamProbe(1, 1, 4096)), (D, ev.StreamProbeEnd(0, 0)),
    (S, ev.StreamProbeGrant(1, 1, 4096)), (S, ev.StreamProbeResult(0, 0, 0, 0))])
def test_stream_probe_events_have_one_sender(sender, event):
    c = ready()
    if sender is S:     # an answer from the wrong side, while its question is open
        c.process(S, ev.StreamProbe(1, 1, 4096) if isinstance(event, ev.StreamProbeGrant)
                  else ev.StreamProbeEnd(0, 0))
    with pytest.raises(TransitionError):
        c.process(sender, event)


def test_no_stream_probe_once_a_migration_is_offered():
    c = ready()
    c.process(S, ev.MigrationOffer({"name": "vm"}, ev.Mode.PRECOPY, 1))
    c.process(D, ev.Accept())
    with pytest.raises(TransitionError, match="StreamProbe"):
        c.process(S, ev.StreamProbe(1, 1, 4096))


def test_stream_probe_ids_sit_in_the_probe_group():
    from livemig.protocol import spec
    for name in ("StreamProbe", "StreamProbeGrant", "StreamProbeEnd", "StreamProbeResult"):
        assert 112 <= spec.MESSAGE_IDS[name] <= 127

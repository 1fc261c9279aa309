"""The conversation state machines of both peers, per channel kind, as data.

Rules
-----
1. A channel is one conversation between a SOURCE and a DESTINATION. Its
   state is shared: both peers run the same table, one as the sender of an
   event and the other as its receiver, so the table models both peers at
   once (who may say what, when). A row is
   ``(state, sender role, event class, variant) -> next state``.
2. The source always opens a channel with Hello; the destination answers
   Welcome or Refuse. Nothing else may precede the handshake. On a control
   channel a Hello with resume=1 (variant "resume") opens a recovery
   conversation: the destination's PresentReport, then post-copy goes on, or,
   for a session that has ended there, its Outcome.
3. Anything not in the table is illegal. :meth:`Conversation.process` is the
   one place that raises for it (TransitionError, naming the state, the
   message and what the state expects); the connection turns that into
   LocalProtocolError when we were the sender and RemoteProtocolError when
   the peer was. Users read that text: it says what happened in their terms
   (``EVENT_WORDS``, ``STATE_WORDS``), the table's names only in brackets.
   The engines therefore never check which message came: at each point they
   wait, the table leaves only the answer they wait for (and Abort, and end
   of stream).
4. Abort may be sent by either side from any state after Hello until a
   terminal state, and leads to ABORTED.
5. Questions and answers: Ping is the source's liveness question, allowed
   where the destination is waiting for the source's next message (READY,
   the pre-copy states, an open bulk or urgent channel) and, as a keepalive,
   on a quiet post-copy control channel; the destination's
   Pong answers it and may come in any later state (the source may have
   moved on meanwhile), but only while a Ping is unanswered. Likewise a
   ProbeResult only answers a ProbeEnd, a StreamProbeGrant a StreamProbe and
   a StreamProbeResult a StreamProbeEnd. None of them changes the state.
6. End of stream is an input too: accepted in terminal states (and, on bulk
   and urgent channels, while open if the source closed: those channels end
   when the source closes them), an error anywhere else (the peer vanished
   mid-conversation).
7. Terminal states accept nothing but end of stream.

Control channel (source S, destination D)::

    IDLE --S Hello(new)--> HELLO_SENT --D Welcome--> READY --S MigrationOffer--> OFFERED
    READY --S ProbeData--> READY --S ProbeEnd--> READY --D ProbeResult--> READY
                         (a bandwidth probe; the source may then offer, or close:
                          end of stream from the source is normal in READY)
    READY --S StreamProbe--> READY --D StreamProbeGrant--> READY  (capability
    READY --S StreamProbeEnd--> READY --D StreamProbeResult--> READY  "stream-probe":
                          the probe's pages travel on bulk streams meanwhile)
                         |D Refuse                            OFFERED --D Refuse--> REFUSED
                         v                                    OFFERED --D Accept--> PRECOPY
                      REFUSED
    PRECOPY --S RoundStart--> IN_ROUND --S PageBatch(precopy)--> IN_ROUND
    IN_ROUND --S RoundEnd--> PRECOPY
    PRECOPY --D RoundAck--> PRECOPY (the destination applied a round)
    PRECOPY --S Switchover(precopy)--> SWITCHOVER --D Verified--> VERIFIED
                                                  --D VerifyFailed--> VERIFY_FAILED
    VERIFIED --S Commit--> COMMITTED --D Resumed--> RELEASING --S Complete--> DONE
    PRECOPY --S PageInvalidate--> INVALIDATING   (hybrid / post-copy, guest still running
    INVALIDATING --S PageInvalidate--> INVALIDATING   at the source: no page batch
    INVALIDATING --D RoundAck--> INVALIDATING          follows, only a post-copy
    INVALIDATING --S Switchover(postcopy)--> SWITCHOVER_POSTCOPY   switchover)
    PRECOPY --S Switchover(postcopy)--> SWITCHOVER_POSTCOPY --D Verified--> VERIFIED_POSTCOPY
    SWITCHOVER_POSTCOPY --D VerifyFailed--> VERIFY_FAILED
    VERIFIED_POSTCOPY --S Commit--> COMMITTED_POSTCOPY --D Resumed--> POSTCOPY
    POSTCOPY --D PostcopyComplete--> POSTCOPY_DONE --S Complete--> DONE
    (pages and page requests travel on the bulk and urgent channels)

    Recovery, a control channel reopened during post-copy:
    IDLE --S Hello(resume)--> RESUME_SENT --D Welcome--> RESUMED
    RESUMED --D PresentReport--> POSTCOPY      RESUME_SENT --D Refuse--> REFUSED
    RESUMED --D Outcome--> DONE    (the session has ended here: what became of it)
    RESUMED --D ResumeReport--> PRECOPY   (pre-copy rounds a link break cut short:
                                            what is held; the rounds go on)

Bulk channel: IDLE -Hello-> HELLO_SENT -Welcome-> OPEN, then S PageBatch
(precopy or postcopy) any number of times; Refuse -> REFUSED. A bulk stream
(wire version 2, native threads on both ends) also closes each round with
S StreamEnd, answered by D StreamAck; both leave the state OPEN.
Urgent channel: the same handshake, then D PageRequest and S PageBatch(urgent).
"""
from __future__ import annotations

from enum import Enum

from .events import (Abort, Accept, ChannelKind, Commit, Complete, Event, Hello, MigrationOffer,
                     PageBatch, PageInvalidate, PageRequest, Phase, Ping, Pong, PostcopyComplete,
                     PresentReport, ProbeData, ResumeReport, ProbeEnd, ProbeResult, Refuse, Resumed, RoundAck,
                     RoundEnd, RoundStart, StreamAck, StreamEnd, Switchover, Verified,
                     VerifyFailed, Welcome, Outcome, StreamProbe, StreamProbeEnd,
                     StreamProbeGrant, StreamProbeResult)


class Role(Enum):
    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> "Role":
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class State(Enum):
    # (name, phase)
    IDLE = ("idle", Phase.HANDSHAKE)
    HELLO_SENT = ("hello-sent", Phase.HANDSHAKE)
    READY = ("ready", Phase.HANDSHAKE)
    OFFERED = ("offered", Phase.HANDSHAKE)
    RESUME_SENT = ("resume-sent", Phase.HANDSHAKE)
    RESUMED = ("resumed", Phase.HANDSHAKE)
    PRECOPY = ("precopy", Phase.PRECOPY)
    IN_ROUND = ("in-round", Phase.PRECOPY)
    INVALIDATING = ("invalidating", Phase.PRECOPY)
    SWITCHOVER = ("switchover", Phase.SWITCHOVER)
    SWITCHOVER_POSTCOPY = ("switchover-postcopy", Phase.SWITCHOVER)
    VERIFIED = ("verified", Phase.SWITCHOVER)
    VERIFIED_POSTCOPY = ("verified-postcopy", Phase.SWITCHOVER)
    COMMITTED = ("committed", Phase.SWITCHOVER)
    COMMITTED_POSTCOPY = ("committed-postcopy", Phase.SWITCHOVER)
    RELEASING = ("releasing", Phase.COMPLETE)
    POSTCOPY = ("postcopy", Phase.POSTCOPY)
    POSTCOPY_DONE = ("postcopy-done", Phase.COMPLETE)
    OPEN = ("open", Phase.PRECOPY)
    # terminal
    DONE = ("done", Phase.COMPLETE)
    REFUSED = ("refused", Phase.HANDSHAKE)
    VERIFY_FAILED = ("verify-failed", Phase.SWITCHOVER)
    ABORTED = ("aborted", Phase.COMPLETE)
    CLOSED = ("closed", Phase.COMPLETE)

    @property
    def phase(self) -> Phase:
        return self.value[1]

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({State.DONE, State.REFUSED, State.VERIFY_FAILED, State.ABORTED,
                       State.CLOSED})
S, D = Role.SOURCE, Role.DESTINATION
_ANY = "*"   # any variant


def _pings(*states: State) -> dict:
    """Rule 5: where the source may ask Ping (the state stays)."""
    return {(state, S, Ping, _ANY): state for state in states}


# Before Hello names the channel kind only a Refuse can be judged (rule 2).
_HANDSHAKE = {
    (State.HELLO_SENT, D, Refuse, _ANY): State.REFUSED,
}

CONTROL = {
    **_HANDSHAKE,
    (State.IDLE, S, Hello, "new"): State.HELLO_SENT,
    (State.HELLO_SENT, D, Welcome, _ANY): State.READY,
    (State.READY, S, MigrationOffer, _ANY): State.OFFERED,
    (State.READY, S, ProbeData, _ANY): State.READY,
    (State.READY, S, ProbeEnd, _ANY): State.READY,
    (State.READY, D, ProbeResult, _ANY): State.READY,
    (State.READY, S, StreamProbe, _ANY): State.READY,
    (State.READY, D, StreamProbeGrant, _ANY): State.READY,
    (State.READY, S, StreamProbeEnd, _ANY): State.READY,
    (State.READY, D, StreamProbeResult, _ANY): State.READY,
    (State.OFFERED, D, Accept, _ANY): State.PRECOPY,
    (State.OFFERED, D, Refuse, _ANY): State.REFUSED,
    (State.PRECOPY, S, RoundStart, _ANY): State.IN_ROUND,
    (State.IN_ROUND, S, PageBatch, "precopy"): State.IN_ROUND,
    (State.IN_ROUND, S, RoundEnd, _ANY): State.PRECOPY,
    (State.PRECOPY, D, RoundAck, _ANY): State.PRECOPY,
    (State.IN_ROUND, D, RoundAck, _ANY): State.IN_ROUND,
    (State.PRECOPY, S, Switchover, "precopy"): State.SWITCHOVER,
    (State.PRECOPY, S, Switchover, "postcopy"): State.SWITCHOVER_POSTCOPY,
    (State.PRECOPY, S, PageInvalidate, _ANY): State.INVALIDATING,
    (State.INVALIDATING, S, PageInvalidate, _ANY): State.INVALIDATING,
    (State.INVALIDATING, D, RoundAck, _ANY): State.INVALIDATING,
    (State.INVALIDATING, S, Switchover, "postcopy"): State.SWITCHOVER_POSTCOPY,
    (State.SWITCHOVER, D, Verified, _ANY): State.VERIFIED,
    (State.SWITCHOVER, D, VerifyFailed, _ANY): State.VERIFY_FAILED,
    (State.VERIFIED, S, Commit, _ANY): State.COMMITTED,
    (State.COMMITTED, D, Resumed, _ANY): State.RELEASING,
    (State.SWITCHOVER_POSTCOPY, D, Verified, _ANY): State.VERIFIED_POSTCOPY,
    (State.VERIFIED_POSTCOPY, S, Commit, _ANY): State.COMMITTED_POSTCOPY,
    (State.COMMITTED_POSTCOPY, D, Resumed, _ANY): State.POSTCOPY,
    (State.SWITCHOVER_POSTCOPY, D, VerifyFailed, _ANY): State.VERIFY_FAILED,
    (State.RELEASING, S, Complete, _ANY): State.DONE,
    (State.POSTCOPY, D, PostcopyComplete, _ANY): State.POSTCOPY_DONE,
    (State.POSTCOPY_DONE, S, Complete, _ANY): State.DONE,
    # recovery: a control channel opened with Hello(resume=True) for a session
    # in post-copy; the destination reports what it holds and post-copy goes on
    (State.IDLE, S, Hello, "resume"): State.RESUME_SENT,
    (State.RESUME_SENT, D, Welcome, _ANY): State.RESUMED,
    (State.RESUME_SENT, D, Refuse, _ANY): State.REFUSED,
    (State.RESUMED, D, PresentReport, _ANY): State.POSTCOPY,
    # a resumed control channel of a session that has ended here: its outcome
    (State.RESUMED, D, Outcome, _ANY): State.DONE,
    # a resumed control channel of a session held in pre-copy (capability
    # "resume-precopy"): what the destination holds, then the rounds go on
    (State.RESUMED, D, ResumeReport, _ANY): State.PRECOPY,
    # POSTCOPY: the source's keepalive on a quiet control channel
    **_pings(State.READY, State.PRECOPY, State.IN_ROUND, State.INVALIDATING, State.POSTCOPY),
}

_OPENED = {
    **_HANDSHAKE,
    (State.IDLE, S, Hello, _ANY): State.HELLO_SENT,
    (State.HELLO_SENT, D, Welcome, _ANY): State.OPEN,
    **_pings(State.OPEN),
}

BULK = {
    **_OPENED,
    (State.OPEN, S, PageBatch, "precopy"): State.OPEN,
    (State.OPEN, S, PageBatch, "postcopy"): State.OPEN,
    (State.OPEN, S, StreamEnd, _ANY): State.OPEN,
    (State.OPEN, D, StreamAck, _ANY): State.OPEN,
}

URGENT = {
    **_OPENED,
    (State.OPEN, D, PageRequest, _ANY): State.OPEN,
    (State.OPEN, S, PageBatch, "urgent"): State.OPEN,
}

TABLES = {ChannelKind.CONTROL: CONTROL, ChannelKind.BULK: BULK, ChannelKind.URGENT: URGENT}

# Rule 5: an answer is legal only while its question is unanswered.
ANSWERS = {Pong: Ping, ProbeResult: ProbeEnd, StreamProbeGrant: StreamProbe,
           StreamProbeResult: StreamProbeEnd}
_QUESTIONS = frozenset(ANSWERS.values())
# Before Welcome no Pong can be due; after it, a Pong may cross the source's
# next messages, so it is allowed in any later state that is not terminal.
_NO_PONG = frozenset({State.IDLE, State.HELLO_SENT, State.RESUME_SENT})

# States where end of stream is a normal ending, per channel kind and per
# role that closed. Bulk and urgent channels end when the source closes them;
# the destination closing one that is open means it went away.
_EOF_ALWAYS = _TERMINAL | {State.IDLE}
EOF_OK = {
    ChannelKind.CONTROL: {S: _EOF_ALWAYS | {State.READY}, D: _EOF_ALWAYS},
    ChannelKind.BULK: {S: _EOF_ALWAYS | {State.OPEN}, D: _EOF_ALWAYS},
    ChannelKind.URGENT: {S: _EOF_ALWAYS | {State.OPEN}, D: _EOF_ALWAYS},
}


class TransitionError(Exception):
    """An event (or end of stream) the current state does not allow."""


# What each message and state means to someone running a migration: the first
# half of every TransitionError. The table's names follow, as the detail.
EVENT_WORDS = {
    Hello: "a connection request", Welcome: "a welcome", Refuse: "a refusal",
    MigrationOffer: "a migration offer", Accept: "an acceptance of the offer",
    RoundStart: "the start of a pre-copy round", PageBatch: "pages",
    RoundEnd: "the end of a pre-copy round", RoundAck: "a round acknowledgement",
    StreamEnd: "the end of a stream's round", StreamAck: "a stream acknowledgement",
    PageInvalidate: "a page invalidation", Switchover: "the paused VM's state (switchover)",
    Verified: "its verification of the VM", VerifyFailed: "a verification failure",
    Commit: "the commit of the handover", Resumed: "its confirmation that the VM runs there",
    PageRequest: "a page request", PresentReport: "the list of pages it holds",
    PostcopyComplete: "the end of post-copy", Complete: "the completion of the migration",
    Abort: "an abort", Ping: "a liveness check", Pong: "a liveness answer",
    ProbeData: "bandwidth probe data", ProbeEnd: "the end of a bandwidth probe",
    ProbeResult: "a bandwidth probe result", Outcome: "the outcome of a session",
    ResumeReport: "a report of what it holds of an interrupted pre-copy",
    StreamProbe: "a request for a stream probe", StreamProbeGrant: "a stream probe's grant",
    StreamProbeEnd: "the end of a stream probe", StreamProbeResult: "a stream probe result",
}

STATE_WORDS = {
    State.IDLE: "before the connection was set up",
    State.HELLO_SENT: "while the connection was being set up",
    State.READY: "before any migration was offered",
    State.OFFERED: "while the migration offer awaited its answer",
    State.RESUME_SENT: "while reconnecting", State.RESUMED: "while reconnecting",
    State.PRECOPY: "during pre-copy", State.IN_ROUND: "in the middle of a pre-copy round",
    State.INVALIDATING: "while pages were invalidated ahead of post-copy",
    State.SWITCHOVER: "while the destination verified the paused VM",
    State.SWITCHOVER_POSTCOPY: "while the destination verified the paused VM",
    State.VERIFIED: "while the source had yet to commit the handover",
    State.VERIFIED_POSTCOPY: "while the source had yet to commit the handover",
    State.COMMITTED: "after the commit, before the destination confirmed the VM runs there",
    State.COMMITTED_POSTCOPY: "after the commit, before the destination confirmed the VM "
                              "runs there",
    State.RELEASING: "after the destination confirmed the VM runs there",
    State.POSTCOPY: "during post-copy", State.POSTCOPY_DONE: "after post-copy had ended",
    State.OPEN: "while the channel was open",
    State.DONE: "after the migration had completed",
    State.REFUSED: "after the migration had been refused",
    State.VERIFY_FAILED: "after the verification had failed",
    State.ABORTED: "after the migration had been aborted",
    State.CLOSED: "after the connection was closed",
}


def transition_text(sender: Role, event: type | None, variant: str, state: State,
                    kind_name: str, why: str) -> str:
    """A refused transition as users read it: who did what, when, in their
    words; the protocol's names only in brackets. ``event`` None is an end of
    stream."""
    if event is None:
        what, detail = "closed the connection", "end of stream"
    else:
        what = f"sent {EVENT_WORDS.get(event, event.__name__)}"
        detail = event.__name__ + (f" ({variant})" if variant else "")
    return (f"the {sender.value} {what} {STATE_WORDS[state]} [protocol: {detail} in state "
            f"{state.value[0]} on the {kind_name} channel{'; ' + why if why else ''}]")


def _expected(table: dict, state: State, sender: Role) -> str:
    """What ``state`` allows ``sender``, in words: "Accept or Refuse from the destination"."""
    names = [cls.__name__ if variant == _ANY else f"{cls.__name__}({variant})"
             for (st, role, cls, variant) in table if st is state and role is sender]
    if not names:
        return f"nothing from the {sender.value} here but Abort"
    return " or ".join(names) + f" from the {sender.value}"


class Conversation:
    """The state of one channel; ``kind`` may stay None until Hello names it."""

    def __init__(self, kind: ChannelKind | None = None):
        self.kind = kind
        self.state = State.IDLE
        self._unanswered = dict.fromkeys(_QUESTIONS, 0)

    @property
    def phase(self) -> Phase:
        return self.state.phase

    def process(self, sender: Role, event: Event) -> State:
        """Apply ``event`` sent by ``sender``; the new state, or TransitionError."""
        kind = self.kind
        if isinstance(event, Hello) and self.state is State.IDLE:
            if kind is None:
                kind = event.channel_kind
            elif kind is not event.channel_kind:
                raise TransitionError(
                    f"Hello names a {event.channel_kind.name.lower()} channel on a "
                    f"{kind.name.lower()} channel")
        table = TABLES[kind] if kind is not None else _HANDSHAKE
        cls = type(event)
        key = (self.state, sender, cls)
        nxt = table.get(key + (_ANY,)) or table.get(key + (event.variant,))
        if nxt is None and not self.state.terminal:
            if cls is Abort and self.state is not State.IDLE:
                nxt = State.ABORTED
            elif cls is Pong and sender is D and self.state not in _NO_PONG:
                nxt = self.state
        question = ANSWERS.get(cls)
        if nxt is None or (question is not None and not self._unanswered[question]):
            kind_name = kind.name.lower() if kind else "unnamed"
            if nxt is not None:
                why = f"it answers no {question.__name__}"
            elif self.state.terminal:
                why = "the conversation is over"
            else:
                why = f"expected {_expected(table, self.state, sender)}"
            raise TransitionError(transition_text(sender, cls, event.variant, self.state,
                                                  kind_name, why))
        if cls in self._unanswered:
            self._unanswered[cls] += 1
        elif question is not None:
            self._unanswered[question] -= 1
        self.kind = kind
        self.state = nxt
        return nxt

    def process_eof(self, closer: Role) -> State:
        """``closer`` ended the stream; CLOSED, or TransitionError if early."""
        ok = EOF_OK[self.kind][closer] if self.kind is not None else {State.IDLE}
        if self.state not in ok:
            kind_name = self.kind.name.lower() if self.kind is not None else "unnamed"
            raise TransitionError(transition_text(closer, None, "", self.state, kind_name, ""))
        self.state = State.CLOSED
        return self.state

"""The migration wire protocol, sans-IO: frames, messages, state machines.

Nothing in this package performs I/O or reads a clock; livemig.aio adapts it
to asyncio. See docs/protocol.md for the wire format.
"""
from .connection import CLOSED, NEED_DATA, SUPPORTED_VERSIONS, Connection, answer_hello
from .events import (ALL_EVENTS, BATCH_POSTCOPY, BATCH_URGENT, WIRE_IDS, Abort, Accept,
                     ChannelKind, Complete, Event, Hello, MigrationOffer, Mode, PageBatch,
                     PageInvalidate, PageRequest, Phase, Ping, Pong, PostcopyComplete, PresentReport, Refuse,
                     RefuseCode, Resumed, RoundAck, RoundEnd, RoundStart, StreamAck, StreamEnd, Switchover,
                     Verified, Commit, VerifyFailed, Welcome, ProbeData, ProbeEnd, ProbeResult, Outcome,
                     OutcomeCode, ResumeReport, StreamProbe, StreamProbeGrant, StreamProbeEnd,
                     StreamProbeResult)
from .state import Role, State

__all__ = [
    "CLOSED", "NEED_DATA", "SUPPORTED_VERSIONS", "Connection", "answer_hello",
    "ALL_EVENTS", "BATCH_POSTCOPY", "BATCH_URGENT", "WIRE_IDS", "Abort", "Accept",
    "ChannelKind", "Complete", "Event", "Hello", "MigrationOffer", "Mode", "PageBatch",
    "PageInvalidate", "PageRequest", "Phase", "Ping", "Pong", "PostcopyComplete", "PresentReport", "Refuse",
    "RefuseCode", "Resumed", "RoundAck", "RoundEnd", "RoundStart", "StreamAck", "StreamEnd", "Switchover", "Verified", "Commit",
    "VerifyFailed", "Welcome", "Role", "State", "ProbeData", "ProbeEnd", "ProbeResult",
    "Outcome", "OutcomeCode", "ResumeReport", "StreamProbe", "StreamProbeGrant",
    "StreamProbeEnd", "StreamProbeResult",
]

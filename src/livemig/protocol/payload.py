"""What every protocol message is built on: the Event base class, whose
encode and decode are derived from the message's field table (fields.py).

A message subclass declares ``FIELDS`` (its payload in wire order) and gets
``encode() -> (flags, parts)`` and ``decode(flags, payload)`` from here.
Hooks cover what a field table cannot say: ``_frame_flags`` for a message
whose flags carry meaning, ``_build`` for checks across fields. The messages
themselves are in events.py.
"""
from __future__ import annotations

from typing import ClassVar

from .fields import Layout, PayloadError, Reader


class Event:
    """Base of every protocol message."""

    WIRE_ID: ClassVar[int] = 0
    FLAGS: ClassVar[int] = 0        # flag bits this message defines
    FIELDS: ClassVar[tuple] = ()    # the payload, in wire order
    LAYOUT: ClassVar[Layout]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.LAYOUT = Layout(cls.__name__, cls.FIELDS)

    def encode(self) -> tuple[int, list]:
        """(frame flags, payload buffers)."""
        values = {name: getattr(self, name) for name in self.LAYOUT.attrs}
        return self._frame_flags(), self.LAYOUT.encode(values)

    @classmethod
    def decode(cls, flags: int, payload) -> "Event":
        """The message from a frame's flags and payload; PayloadError if malformed."""
        cls._check_flags(flags)
        reader = Reader(payload, cls.__name__)
        values = cls.LAYOUT.decode(reader)
        reader.end()
        return cls._build(flags, values)

    def _frame_flags(self) -> int:
        return 0

    @classmethod
    def _build(cls, flags: int, values: dict) -> "Event":
        return cls(**values)

    @classmethod
    def _check_flags(cls, flags: int) -> None:
        if flags & ~cls.FLAGS:
            defined = f"defines flags {cls.FLAGS:#x}" if cls.FLAGS else "defines no flags"
            raise PayloadError(f"{cls.__name__} {defined}, got flags {flags:#x}")

    @property
    def variant(self) -> str | None:
        """Sub-kind the state machine distinguishes (None for most)."""
        return None

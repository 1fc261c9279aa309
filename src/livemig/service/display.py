"""How the CLI shows a running migration: a bar on a terminal, lines in a pipe.

Both read the ``progress`` object the daemon adds to a migration record while
it is active (:func:`livemig.stats.progress`): the bar redraws one line in
place a few times a second; a pipe (a log, ``| tee``) gets one plain line per
``PLAIN_INTERVAL_S`` so that it stays readable. Every number carries its unit;
a field that does not apply (the round in post-copy, the dirty rate before
round 0 ends) is left out rather than shown as zero.
"""
from __future__ import annotations

import time

from ..units import format_rate, format_size

BAR_WIDTH = 24
PLAIN_INTERVAL_S = 1.0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def progress_fields(rec: dict) -> list[str]:
    """The parts of a progress line, without the bar."""
    p = rec.get("progress") or {}
    parts = [f"{rec['vm']} #{rec['id']} {rec['status']}"]
    if not p:
        return parts
    if p.get("round") is not None:
        parts.append(f"round {p['round']}")
    parts.append(f"{format_size(p['transferred_bytes'])} sent")
    if p.get("owed_pages") is not None:
        parts.append(f"{p['owed_pages']:,} pages owed")
    elif p.get("remaining_bytes") is not None:
        parts.append(f"{format_size(p['remaining_bytes'])} left")
    parts.append(format_rate(p["throughput_bps"]))
    if p.get("dirty_rate_bps") is not None:
        parts.append(f"dirty {format_rate(p['dirty_rate_bps'])}")
    if p.get("expected_downtime_ms") is not None:
        parts.append(f"expected downtime {p['expected_downtime_ms']:.0f} ms")
    if p.get("throttle_pct"):
        parts.append(f"throttle {p['throttle_pct']:g} %")
    if p.get("fault_rate_pps") is not None:
        parts.append(f"{p['fault_rate_pps']:,.0f} faults/s")
    parts.append(f"elapsed {_eta(p['elapsed_s'])}")
    parts.append(f"ETA {_eta(p.get('eta_s'))}")
    return parts


def bar(percent: float | None) -> str:
    filled = 0 if percent is None else int(round(BAR_WIDTH * max(0.0, min(percent, 100.0)) / 100))
    shown = "  ?" if percent is None else f"{percent:3.0f}"
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {shown}%"


class ProgressView:
    """Draws successive migration records to ``out`` (a terminal or not)."""

    def __init__(self, out, *, tty: bool, now=time.monotonic):
        self.out = out
        self.tty = tty
        self._now = now
        self._printed_at: float | None = None
        self._lines = 0

    def show(self, recs: list[dict]) -> None:
        if self.tty:
            # One line per migration, redrawn in place: back up over the
            # previous drawing, erase it, write the new one.
            if self._lines:
                self.out.write(f"\x1b[{self._lines}F\x1b[J")
            for r in recs:
                self.out.write(f"{bar((r.get('progress') or {}).get('percent'))} "
                               + "  ".join(progress_fields(r)) + "\n")
            self._lines = len(recs)
            self.out.flush()
            return
        now = self._now()
        if self._printed_at is not None and now - self._printed_at < PLAIN_INTERVAL_S:
            return
        self._printed_at = now
        for r in recs:
            pct = (r.get("progress") or {}).get("percent")
            prefix = f"{pct:5.1f}% " if pct is not None else ""
            self.out.write(prefix + "  ".join(progress_fields(r)) + "\n")
        self.out.flush()

    def done(self) -> None:
        """Leave the last drawing on screen; what follows goes below it."""
        self._lines = 0

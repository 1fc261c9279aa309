"""Migration history: one JSON object per finished migration, appended to a
file in the daemon's state directory, so it outlives the daemon.

A line is written once, when a migration ends (completed, failed or
cancelled), and never rewritten; a torn last line (the daemon killed while
writing) is skipped on reading. Fields that do not apply to a row are null:
an incoming migration has no rounds or convergence of its own, and a
post-copy migration does not converge (it switches over on purpose), so
``converged`` is null there rather than false.
"""
from __future__ import annotations

import json
import os
import time

HISTORY_FILE_FORMAT = "history-{port}.jsonl"


def default_state_dir() -> str:
    """$XDG_STATE_HOME/livemig, else ~/.local/state/livemig."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".local", "state")
    return os.path.join(base, "livemig")


def history_entry(described: dict, *, host: str, started_wall_s: float) -> dict:
    """The row for a finished migration, from ``MigrationRecord.describe()``."""
    stats = described.get("stats") or {}
    outgoing = described["direction"] == "outgoing"
    mode = stats.get("mode")
    return {
        "id": described["id"], "vm": described["vm"], "direction": described["direction"],
        "host": host, "peer": described["peer"], "mode": mode, "status": described["status"],
        "started_at": _iso(started_wall_s), "finished_at": _iso(time.time()),
        "total_time_ms": stats.get("total_time_ms"), "downtime_ms": stats.get("downtime_ms"),
        "memory_bytes": stats.get("memory_bytes"), "bytes_sent": stats.get("bytes_sent"),
        "rounds": stats.get("nrounds") if outgoing and mode != "postcopy" else None,
        "converged": stats.get("converged") if outgoing and mode == "precopy" else None,
        "error": described.get("error"),
    }


def _iso(wall_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_s))


class History:
    def __init__(self, path: str):
        self.path = path

    def append(self, entry: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def read(self, limit: int | None = None) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows[-limit:] if limit else rows

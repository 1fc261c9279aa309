"""Prometheus text metrics from the daemon (``livemig daemon --metrics HOST:PORT``).

A scrape is one HTTP GET; the answer is rendered from the daemon's records at
that moment (nothing is accumulated, so nothing can drift): VMs hosted,
migrations by direction and status, and for each active migration its
progress gauges labelled by id and VM. The server answers ``/metrics`` only,
reads at most one request head and closes the connection after each answer;
it binds where it is told (keep it on loopback or behind a firewall: it is
plain HTTP without authentication).
"""
from __future__ import annotations

import asyncio
import collections

from ..addresses import parse_hostport
from ..aio.deadline import within

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
PROGRESS_GAUGES = (
    ("transferred_bytes", "Wire bytes sent so far"),
    ("remaining_bytes", "Bytes the round in flight (or post-copy) still owes"),
    ("throughput_bps", "Wire bytes per second since the start"),
    ("elapsed_s", "Seconds since the start"),
    ("dirty_rate_bps", "Dirty rate measured over the last round, bytes per second"),
    ("expected_downtime_ms", "Policy's expected downtime before the switchover"),
)


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(vms: list[dict], migrations: list[dict]) -> str:
    """The exposition text for the daemon's described VMs and migrations."""
    out = ["# HELP livemig_vms VMs hosted by this daemon", "# TYPE livemig_vms gauge",
           f"livemig_vms {len(vms)}",
           "# HELP livemig_migrations Migrations this daemon has seen, by direction and status",
           "# TYPE livemig_migrations gauge"]
    counts = collections.Counter((m["direction"], m["status"]) for m in migrations)
    for (direction, status), n in sorted(counts.items()):
        out.append(f'livemig_migrations{{direction="{direction}",status="{status}"}} {n}')
    for key, help_text in PROGRESS_GAUGES:
        out += [f"# HELP livemig_migration_{key} {help_text}",
                f"# TYPE livemig_migration_{key} gauge"]
        for m in migrations:
            value = (m.get("progress") or {}).get(key)
            if value is not None:
                out.append(f'livemig_migration_{key}{{id="{m["id"]}",vm="{_label(m["vm"])}",'
                           f'direction="{m["direction"]}"}} {float(value):.6g}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """Serves ``render(*snapshot())`` at ``http://listen/metrics``."""

    def __init__(self, listen: str, snapshot):
        self.host, self.port = parse_hostport(listen, what="--metrics")
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_REQUEST_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await within(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                status, body = "200 OK", render(*self._snapshot()).encode()
            else:
                status, body = "404 Not Found", b"livemig serves /metrics only\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()

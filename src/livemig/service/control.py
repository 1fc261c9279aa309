"""The daemon's local control socket: one JSON object per line, both ways.

A request is ``{"id": N, "cmd": "vm.start", "args": {...}}``; the reply is
``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false,
"error": {"type": "ConfigError", "message": "..."}}``. The socket is a Unix
socket created with mode 0600, so only its owner (and root) can drive the
daemon; nothing here listens on the network.

``ControlServer`` maps commands to coroutine handlers and turns every
exception into an error reply — the one error funnel of this boundary: a bad
request can never take the daemon down. ``ControlClient`` is the synchronous
client the CLI uses.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from typing import Any, Awaitable, Callable

from ..errors import ControlError

Handler = Callable[..., Awaitable[Any]]
MAX_LINE_BYTES = 1 << 20


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]):
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self) -> None:
        if os.path.exists(self.path):
            if _socket_alive(self.path):
                raise ControlError(f"another daemon already serves {self.path}")
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                           limit=MAX_LINE_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # End every client's session (EOF for its reader), and let each
            # handler finish on its own rather than be cancelled mid-request.
            for writer in self._clients.values():
                writer.close()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients[task] = writer
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _write(writer, {"id": None, "ok": False, "error": {
                        "type": "ControlError", "message": "request line too long"}})
                    break
                if not line:
                    break
                reply = await self._dispatch(line)
                await _write(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()

    async def _dispatch(self, line: bytes) -> dict:
        req_id = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ControlError("a request must be a JSON object")
            req_id = req.get("id")
            cmd = req.get("cmd")
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("'args' must be a JSON object")
            handler = self.handlers.get(cmd)
            if handler is None:
                raise ControlError(f"unknown command {cmd!r}; known: {', '.join(sorted(self.handlers))}")
            result = await handler(**args)
            return {"id": req_id, "ok": True, "result": result}
        except json.JSONDecodeError as exc:
            return _error(req_id, ControlError(f"request is not JSON: {exc}"))
        except TypeError as exc:  # wrong or missing arguments for the handler
            return _error(req_id, ControlError(f"bad arguments: {exc}"))
        except Exception as exc:  # the funnel: every failure becomes a reply
            return _error(req_id, exc)


def _error(req_id, exc: BaseException) -> dict:
    etype = getattr(exc, "error_type", None) or type(exc).__name__
    return {"id": req_id, "ok": False, "error": {"type": etype, "message": str(exc)}}


async def _write(writer: asyncio.StreamWriter, obj: dict) -> None:
    writer.write(json.dumps(obj, default=_json_default).encode() + b"\n")
    await writer.drain()


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlClient:
    """Blocking client: ``ControlClient(path).call("vm.list")``."""

    def __init__(self, path: str, timeout_s: float | None = 30.0):
        self.path = path
        self.timeout_s = timeout_s
        self._next_id = 1

    def call(self, cmd: str, **args) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ControlError(
                    f"no livemig daemon at {self.path} ({exc.strerror}); start one with "
                    f"`livemig daemon --listen HOST:PORT --control {self.path}`",
                    error_type="NoDaemon") from None
            req = {"id": self._next_id, "cmd": cmd, "args": args}
            self._next_id += 1
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError(f"the daemon at {self.path} closed the connection")
                buf += chunk
        except socket.timeout:
            raise ControlError(f"the daemon at {self.path} did not answer {cmd!r} "
                               f"within {self.timeout_s} s") from None
        finally:
            s.close()
        reply = json.loads(buf)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ControlError(err.get("message", "unknown error"),
                               error_type=err.get("type", "ControlError"))
        return reply.get("result")

"""The control socket's one error funnel, and ControlError's home in errors.py."""
import asyncio
import json

import pytest

from livemig.errors import ConfigError, ControlError, LivemigError
from livemig.service.control import ControlClient, ControlServer


def test_control_error_is_a_livemig_error_with_a_type():
    exc = ControlError("no such VM", error_type="NoSuchVM")
    assert isinstance(exc, LivemigError) and exc.error_type == "NoSuchVM"
    assert ControlError("x").error_type == "ControlError"


def test_client_without_a_daemon_says_no_daemon(tmp_path):
    with pytest.raises(ControlError) as info:
        ControlClient(str(tmp_path / "absent.sock"), timeout_s=5.0).call("ping")
    assert info.value.error_type == "NoDaemon"


async def _refuse(**_):
    raise ControlError("VM 'a' is busy", error_type="Busy")


async def _bad_config(**_):
    raise ConfigError("downtime_ms must be > 0, got 0")


@pytest.mark.parametrize("line, etype", [
    (b'{"id": 1, "cmd": "busy"}', "Busy"),
    (b'{"id": 1, "cmd": "config"}', "ConfigError"),
    (b'{"id": 1, "cmd": "nonsense"}', "ControlError"),
    (b'[1, 2]', "ControlError"),
    (b'not json', "ControlError"),
])
def test_every_failure_becomes_a_typed_reply(tmp_path, line, etype):
    server = ControlServer(str(tmp_path / "c.sock"), {"busy": _refuse, "config": _bad_config})
    reply = asyncio.run(server._dispatch(line))
    assert reply["ok"] is False and reply["error"]["type"] == etype
    json.dumps(reply)

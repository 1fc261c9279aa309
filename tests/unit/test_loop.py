"""The event-loop switch."""
import asyncio

import pytest

from livemig.aio import loop as lp
from livemig.errors import ConfigError


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_new_event_loop_kind_is_reported(kind):
    loop = lp.new_event_loop(kind)
    try:
        assert lp.loop_kind(loop) == kind
    finally:
        loop.close()


def test_env_selects_and_auto_prefers_uvloop(monkeypatch):
    monkeypatch.setenv("LIVEMIG_LOOP", "asyncio")
    assert lp.resolve_kind() == "asyncio"
    assert lp.run(_kind()) == "asyncio"
    monkeypatch.setenv("LIVEMIG_LOOP", "auto")
    assert lp.resolve_kind() == "uvloop"     # uvloop is a dependency
    monkeypatch.setenv("LIVEMIG_LOOP", "tokio")
    with pytest.raises(ConfigError, match="tokio"):
        lp.resolve_kind()


async def _kind():
    await asyncio.sleep(0)
    return lp.loop_kind()

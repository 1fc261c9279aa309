"""Which path carries pre-copy pages, and the reason the stats give."""
import ssl
from types import SimpleNamespace

import pytest

from livemig.config import MigrationConfig
from livemig.engine.source import streams as source_streams
from livemig.engine.source.streams import DataPath, capabilities, choose, refusal
from livemig.native.streams import ENV_SWITCH, SEND_FRAME_BYTES, probe

OK, WHY = probe()


def _control(version=2, caps=frozenset({"streams"}), peer_max=64 << 20):
    return SimpleNamespace(conn=SimpleNamespace(version=version, capabilities=caps,
                                                peer_max_payload_bytes=peer_max))


@pytest.mark.parametrize("config, tls, why", [
    (MigrationConfig(streams=0), None, "disabled by configuration"),
    (MigrationConfig(), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
     "a TLS context not made by livemig.aio.tls"),
    (MigrationConfig(mode="postcopy"), None, "post-copy"),
])
def test_the_source_says_why_it_will_not_offer_streams(config, tls, why):
    assert why in refusal(config, tls=tls)


def test_the_environment_switch_turns_streams_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert ENV_SWITCH in refusal(MigrationConfig(), tls=None)


@pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
def test_a_bandwidth_cap_keeps_the_streams():
    assert refusal(MigrationConfig(max_bandwidth_bps="100MiB/s"), tls=None) is None


@pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
def test_streams_when_both_peers_agree():
    cfg = MigrationConfig(streams=3)
    assert refusal(cfg, tls=None) is None
    path = choose(cfg, _control(), None)
    assert path == DataPath(3, "") and path.native and path.label == "native-streams ×3"


@pytest.mark.parametrize("control, why", [
    (_control(version=1), "wire version 1 was negotiated"),
    (_control(caps=frozenset()), "does not offer native streams"),
    (_control(peer_max=SEND_FRAME_BYTES - 1), "frames of at most"),
])
def test_the_python_path_when_the_destination_cannot(control, why):
    path = choose(MigrationConfig(streams=2), control, None)
    assert not path.native and path.label.startswith("python: ") and why in path.reason


def test_a_source_refusal_wins():
    path = choose(MigrationConfig(), _control(), "native streams unavailable here: x")
    assert path.label == "python: native streams unavailable here: x"
    assert source_streams.STREAMS == "streams"


@pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
def test_under_tls_the_streams_need_the_destination_to_speak_tls_on_them():
    cfg = MigrationConfig(streams=2)
    old = choose(cfg, _control(caps=frozenset({"streams"})), None, tls=True)
    assert not old.native and "does not run native streams under TLS" in old.reason
    new = choose(cfg, _control(caps=frozenset({"streams", "tls-streams"})), None, tls=True)
    assert new == DataPath(2, "", tls=True) and new.label == "native-streams ×2 over TLS"


def test_the_hello_offers_tls_streams_only_under_tls_and_with_streams():
    assert capabilities(None, None, tls=True) == {"streams", "postcopy-push", "tls-streams"}
    assert capabilities(None, "no", tls=False) == {"streams"}
    assert capabilities("no", "no", tls=True) == set()

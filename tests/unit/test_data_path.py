"""Which path carries pre-copy pages, and the reason the stats give."""
from types import SimpleNamespace

import pytest

from livemig.config import MigrationConfig
from livemig.engine.source import streams as source_streams
from livemig.engine.source.streams import DataPath, choose, refusal
from livemig.native.streams import ENV_SWITCH, SEND_FRAME_BYTES, probe

OK, WHY = probe()


def _control(version=2, caps=frozenset({"streams"}), peer_max=64 << 20):
    return SimpleNamespace(conn=SimpleNamespace(version=version, capabilities=caps,
                                                peer_max_payload_bytes=peer_max))


@pytest.mark.parametrize("config, tls, why", [
    (MigrationConfig(streams=0), False, "disabled by configuration"),
    (MigrationConfig(), True, "TLS"),
    (MigrationConfig(mode="postcopy"), False, "post-copy"),
])
def test_the_source_says_why_it_will_not_offer_streams(config, tls, why):
    assert why in refusal(config, tls=tls)


def test_the_environment_switch_turns_streams_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert ENV_SWITCH in refusal(MigrationConfig(), tls=False)


@pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
def test_a_bandwidth_cap_keeps_the_streams():
    assert refusal(MigrationConfig(max_bandwidth_bps="100MiB/s"), tls=False) is None


@pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
def test_streams_when_both_peers_agree():
    cfg = MigrationConfig(streams=3)
    assert refusal(cfg, tls=False) is None
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

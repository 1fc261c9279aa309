"""Peers with different page hash implementations migrate bit-identical.

The page hash has one value whichever implementation computes it: the
source's digest, the destination's, and the block fingerprints each keeps
of what the receiver holds must agree across peers. Daemon "a" runs with
LIVEMIG_PAGEHASH=scalar, daemon "b" with the implementation its CPU allows
(AVX-512 on a machine that has it); a VM written while it moves goes over
the native streams from a to b and back, and is checked against a twin that
never moved each time.
"""
import pytest

from livemig.native import pagehash
from livemig.native.streams import probe
from support.daemons import assert_daemon_vm_matches_unmoved, daemon_pair, start_vm
from support.oracle import Recipe

OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pagehash-mixed")
    with daemon_pair(tmp, "asyncio", env_a={pagehash.ENV_VAR: "scalar"}) as pair:
        yield pair


def _migrate(src, dst, name):
    rec = src.cli_json("migrate", name, "--to", dst.address, "--downtime-ms", "100")
    assert rec["status"] == "completed", rec
    stats = rec["stats"]
    assert stats["converged"]
    assert stats["data_path"].startswith("native-streams"), stats["data_path"]
    return stats


def test_scalar_and_vector_peers_migrate_bit_identical(mixed):
    a, b = mixed
    recipe = Recipe("32MiB", 2, "uniform", seed=12, dirty_rate="24MiB/s")
    start_vm(a, "mixed", recipe)
    there = _migrate(a, b, "mixed")
    assert_daemon_vm_matches_unmoved(b, "mixed", recipe)
    b.client.call("vm.resume", name="mixed")
    back = _migrate(b, a, "mixed")
    assert_daemon_vm_matches_unmoved(a, "mixed", recipe)
    # Pages written again after round 0 go as BLOCK pages: the fingerprints
    # one implementation made matched the other's on the far side.
    assert there["pages_by_encoding"].get("block", 0) + back["pages_by_encoding"].get("block", 0) > 0
    a.cli("vm", "stop", "mixed")

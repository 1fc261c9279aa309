"""`livemig recover` and `livemig postcopy` where they cannot apply fail
(exit 1, a JSON error with --json) and say the migration's state; `vm list`
shows each VM's state and health, human and JSON.

Daemons are real processes; a pre-copy is kept running by a low bandwidth cap
(see test_cli_ops.py), and every wait is for a condition.
"""
import pytest

from livemig.native import postcopy
from support.daemons import EXIT_FAILED, daemon_pair
from support.waiting import PATIENCE_S, wait_for

SLOW_CAP = "64KiB/s"
SLOW_VM = ("--memory", "64MiB", "--vcpus", "1", "--workload", "rewrite", "--dirty-rate",
           "16MiB/s")


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    with daemon_pair(tmp_path_factory.mktemp("refusals"), "asyncio") as pair:
        yield pair


def _error(daemon, *args):
    out = daemon.cli_json(*args, check=EXIT_FAILED)
    assert out["ok"] is False and out["error"]["exit_code"] == EXIT_FAILED
    return out["error"]


def test_recover_and_postcopy_without_a_migration_fail_and_say_so(daemons):
    a, _ = daemons
    a.cli("vm", "start", "idle1", "--memory", "16MiB", "--workload", "uniform")
    for command in ("recover", "postcopy"):
        err = _error(a, command, "idle1")
        assert err["type"] == "NoSuchMigration"
        assert err["message"].startswith(f"`livemig {command} idle1` does not apply: VM "
                                         "'idle1' is not being migrated from this daemon "
                                         "(this daemon has no migration of it)")
        human = a.cli(command, "idle1", check=EXIT_FAILED)
        assert "does not apply" in human.stderr and "Traceback" not in human.stderr
    a.cli("vm", "stop", "idle1")


def test_recover_during_precopy_fails_with_the_state_and_changes_nothing(daemons):
    a, b = daemons
    a.cli("vm", "start", "slow1", *SLOW_VM)
    started = a.cli_json("migrate", "slow1", "--to", b.address, "--max-bandwidth", SLOW_CAP,
                         "--no-wait")
    wait_for("the migration to be active",
             lambda: a.cli_json("status", "slow1")["status"] == "active")
    err = _error(a, "recover", "slow1")
    assert err["type"] == "Refused"
    assert err["message"].startswith(
        f"`livemig recover slow1` does not apply: migration {started['id']} of 'slow1' is not "
        "in a broken post-copy state; it is in pre-copy (active)")
    assert "Nothing was changed" in err["message"]
    assert a.cli_json("status", "slow1")["status"] == "active"
    a.cli("cancel", "slow1")
    a.cli("vm", "stop", "slow1")


def test_vm_list_shows_state_and_health(daemons):
    a, _ = daemons
    a.cli("vm", "start", "mt1", "--memory", "16MiB", "--workload", "memtest")
    (vm,) = [v for v in a.cli_json("vm", "list") if v["name"] == "mt1"]
    assert vm["state"] == "running" and vm["owed_pages"] is None and vm["owed_bytes"] is None
    assert vm["health"]["status"] == "ok" and vm["health"]["summary"] == "ok"
    table = a.cli("vm", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "MEMORY", "VCPUS", "WORKLOAD", "STATE", "HEALTH",
                                "ORIGIN"]
    row = next(line for line in table if line.startswith("mt1 "))
    assert row.split()[5:7] == ["running", "ok"]
    status = a.cli("status").stdout
    assert "HEALTH" in status
    a.cli("vm", "stop", "mt1")


@pytest.mark.skipif(not postcopy.probe().missing,
                    reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
def test_in_postcopy_the_destination_lists_the_vm_and_postcopy_recover_are_refused(daemons):
    a, b = daemons
    a.cli("vm", "start", "pc1", *SLOW_VM)
    started = a.cli_json("migrate", "pc1", "--to", b.address, "--mode", "postcopy",
                         "--max-bandwidth", SLOW_CAP, "--no-wait")
    wait_for("post-copy", lambda: a.cli_json("status", "pc1")["status"] == "postcopy-active")
    arriving = wait_for("the destination to list pc1", lambda: next(
        (v for v in b.cli_json("vm", "list") if v["name"] == "pc1"), None))
    assert arriving["state"] == "postcopy" and arriving["owed_pages"] > 0
    assert arriving["owed_bytes"] == arriving["owed_pages"] * 4096
    row = next(line for line in b.cli("vm", "list").stdout.splitlines()
               if line.startswith("pc1 "))
    assert row.split()[5] == "postcopy"
    err = _error(a, "postcopy", "pc1")
    assert err["type"] == "Refused" and "is already in post-copy" in err["message"]
    err = _error(a, "recover", "pc1")
    assert err["type"] == "Refused"
    assert f"migration {started['id']} of 'pc1' is not in a broken post-copy state; it is in " \
           "post-copy (postcopy-active)" in err["message"]
    a.cli("migrate-set", "pc1", "--unlimited-bandwidth")
    done = a.client.call("migration.wait", id=started["id"], timeout_s=PATIENCE_S)
    assert done["status"] == "completed", done
    wait_for("pc1 whole at the destination", lambda: any(
        v["name"] == "pc1" and v["state"] == "running" for v in b.cli_json("vm", "list")))
    b.cli("vm", "stop", "pc1")

"""The VM table of `vm list` and `status`: state, health, and the lines below
a row for a post-copy arrival and a guest that reported an error."""
from livemig.cli.vm import format_vms

OK = {"status": "ok", "errors": 0, "since_step": None, "faults": [], "summary": "ok"}


def _vm(name, state, *, owed=None, health=OK, origin="local"):
    return {"name": name, "state": state, "memory_bytes": 64 << 20, "vcpus": 2,
            "workload": "memtest", "origin": origin, "owed_pages": owed,
            "owed_bytes": None if owed is None else owed * 4096, "health": health}


def test_a_postcopy_arrival_shows_its_state_and_the_pages_owed():
    table = format_vms([_vm("web", "postcopy", owed=1234,
                            origin="migrating from 10.0.0.1:7400 (post-copy)")]).splitlines()
    assert table[1].split()[:7] == ["web", "64", "MiB", "2", "memtest", "postcopy", "ok"]
    assert table[2] == "  post-copy: 1,234 pages (4.8 MiB) still owed by the source"
    assert len(table) == 3


def test_a_corrupt_guest_shows_in_its_row_and_below_it():
    health = {"status": "corrupt", "errors": 1, "since_step": 42, "faults": [],
              "summary": "corrupt (1 error since step 42: vCPU 0: page 0x3000 failed its "
                         "checksum)"}
    table = format_vms([_vm("db", "running", health=health), _vm("ok1", "paused")]).splitlines()
    assert table[1].split()[5:7] == ["running", "corrupt"]
    assert table[2] == ("  health: corrupt (1 error since step 42: vCPU 0: page 0x3000 failed "
                        "its checksum)")
    assert table[3].split()[5:7] == ["paused", "ok"] and len(table) == 4


def test_no_vms():
    assert format_vms([]) == "no VMs"

"""The destination's memory budget: offers checked before any allocation."""
import pytest

from livemig.engine.destination.admission import (AdmissionRefused, MemoryBudget,
                                                  available_memory_bytes)

GIB = 1 << 30


def test_budget_counts_every_arriving_vm_until_released():
    budget = MemoryBudget(4 * GIB, available=lambda: 64 * GIB)
    first = budget.admit("a", 3 * GIB)
    with pytest.raises(AdmissionRefused, match="incoming memory limit is 4.0 GiB.*3.0 GiB already"):
        budget.admit("b", 2 * GIB)
    first.release()
    first.release()        # idempotent: a session's cleanup may run it twice
    assert budget.reserved_bytes == 0
    budget.admit("b", 2 * GIB)


def test_offer_larger_than_the_host_can_give_is_refused_whatever_the_budget():
    budget = MemoryBudget(1 << 50, available=lambda: 8 * GIB)
    with pytest.raises(AdmissionRefused, match="this host can give at most 6.0 GiB"):
        budget.admit("huge", 1 << 40)
    assert budget.reserved_bytes == 0


def test_host_memory_is_read_from_meminfo():
    assert available_memory_bytes() > 0


def test_compatibility_refuses_a_newer_isa_or_missing_features():
    from livemig.engine.destination.admission import compatibility_problem
    from livemig.vm.isa import ISA_REVISION, VCPU_FEATURES

    assert compatibility_problem({}) is None     # a source that names neither: revision 1
    assert compatibility_problem({"isa_revision": ISA_REVISION,
                                  "features": sorted(VCPU_FEATURES)}) is None
    assert "ISA revision 2" in compatibility_problem({"isa_revision": ISA_REVISION + 1})
    assert "lacks: vector" in compatibility_problem({"features": ["rand", "vector"]})
    assert "malformed" in compatibility_problem({"features": "rand"})


def test_a_downtime_past_the_limit_is_worded_as_a_warning():
    from livemig.service.limits import downtime_breach
    from livemig.stats import MigrationStats

    stats = MigrationStats()
    assert downtime_breach(stats, 300) is None             # not measured
    stats.downtime_ms, stats.expected_downtime_ms = 250.0, 120.0
    assert downtime_breach(stats, 300) is None
    stats.downtime_ms = 3622.0
    assert "downtime 3622 ms exceeded the limit of 300 ms (expected 120 ms)" in \
        downtime_breach(stats, 300)

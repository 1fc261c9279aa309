"""The post-copy and hybrid fleet faults of test_fleet_faults_postcopy.py,
each in the mode that file does not run it in: every (step, side, fault)
is thereby run in both post-copy and hybrid.

What differs between the modes is how many pages the destination still
lacks when it resumes the guest: in post-copy nearly all of them, in hybrid
only what the guest dirtied since the last pre-copy round. Where a source
killed after the resume takes owed pages with it the VM is lost in either
mode unless none were owed (EITHER: the destination runs it if its arrival
completed). Everything else the design promises holds in both modes alike
(docs/fleet.md, "Faults").

Not here: a kill at a held PageRequest in hybrid. The destination asks for
a page only when its guest touches one still owed, and after the pre-copy
rounds the push usually places the few owed pages first, so there may be
no PageRequest to hold (the link cut at one is here: it then never fires,
and the migration completes).
"""
from __future__ import annotations

import pytest

from livemig.native import postcopy
from support.etcd import ETCD, ETCD_MISSING
from support.fleetfaults import DST, EITHER, NOWHERE, SRC, cut_at_step, killed_at_step

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)
needs_uffd = pytest.mark.skipif(not postcopy.probe().missing, reason=f"userfaultfd MISSING "
                                f"unavailable: {postcopy.probe().reason}")


# (mode, step, killed, the held frame delivered?, where the VM runs, a stale copy at the source)
KILLS = [
    ("postcopy", "Switchover", SRC, False, NOWHERE, False),
    ("hybrid", "Switchover", DST, False, SRC, False),
    ("hybrid", "Verified", SRC, False, NOWHERE, False),
    ("postcopy", "Verified", DST, False, SRC, False),
    ("postcopy", "Commit", SRC, False, NOWHERE, False),
    ("hybrid", "Commit", SRC, True, EITHER, False),
    ("hybrid", "Commit", DST, False, SRC, False),
    ("hybrid", "Resumed", SRC, True, EITHER, False),
    ("postcopy", "Resumed", DST, False, NOWHERE, True),
    ("postcopy", "PostcopyComplete", SRC, True, DST, False),
    ("hybrid", "PostcopyComplete", DST, False, NOWHERE, True),
    ("postcopy", "Complete", SRC, False, DST, False),
    ("hybrid", "Complete", DST, True, NOWHERE, False),
]

CUTS = [("postcopy", "Switchover", SRC), ("hybrid", "Verified", SRC),
        ("postcopy", "Commit", SRC), ("hybrid", "Resumed", DST),
        ("hybrid", "PageRequest", DST), ("postcopy", "PostcopyComplete", DST)]


@needs_uffd
@pytest.mark.parametrize("mode,step,killed,forward,runs,stale", KILLS,
                         ids=[f"{m}-kill-{k}-at-{s}-{'delivered' if f else 'dropped'}"
                              for m, s, k, f, *_ in KILLS])
def test_a_daemon_killed_at_a_handover_step_in_the_other_mode(tmp_path, etcd, mode, step,
                                                               killed, forward, runs, stale):
    killed_at_step(tmp_path, etcd, mode, step, killed, forward, runs, stale)


@needs_uffd
@pytest.mark.parametrize("mode,step,runs", CUTS, ids=[f"{m}-cut-at-{s}" for m, s, _ in CUTS])
def test_the_link_cut_at_a_handover_step_in_the_other_mode(tmp_path, etcd, mode, step, runs):
    cut_at_step(tmp_path, etcd, mode, step, runs)

"""A daemon killed (SIGKILL) at each step of the handover: never two copies, never a silent loss.

Two daemon processes migrate a VM through a FrameProxy that holds one frame
of the handover — Switchover, Verified, Commit, Resumed, PostcopyComplete,
Complete — as it passes. With the frame held, one daemon (the source or the
destination) is killed; then the frame is delivered (it had left the killed
sender) or dropped (its stream ends without it). The surviving daemon must
then, on its own:

* run the VM when it holds the only copy that can run (the destination that
  read Commit, or whose post-copy pages had all landed; the source before
  Commit), identical to a twin that never moved;
* or say plainly what happened and where the VM is, with the operator's path:
  a source left in doubt after Commit keeps its copy paused, ``vm resolve``
  says it cannot learn the outcome, ``vm resolve --resume`` brings the copy
  back intact; a destination that never got Commit, or lost its post-copy
  source, says the VM was never resumed here / cannot be completed.

The cases are the distinct behaviours (what each side knows at the kill);
the whole step × side × mode matrix runs, drawn at random, in
``bench/soak_handover.py --kill-share``, and docs/postcopy.md tabulates it
(support/kills.py: ``expected``). Daemons are shared: a case's survivor,
cleaned, is the next case's peer, so each case starts one new process.
Cases alternate between the two event loops.
"""
from __future__ import annotations

import pytest

from livemig.native import postcopy
from support.daemons import assert_daemon_vm_matches_unmoved
from support.kills import (ABANDONED, AT_DESTINATION, AT_SOURCE, DIED_THERE, NEVER_RESUMED,
                           RECIPE, RESOLVE, VM_NAME, Kill, Pool, check, ending, expected,
                           kill_at)

CASES = [
    # pre-copy: the source owns the VM until the destination reads Commit
    (Kill("precopy", "Verified", "source", False), NEVER_RESUMED),
    (Kill("precopy", "Commit", "source", True, "uvloop"), AT_DESTINATION),
    (Kill("precopy", "Switchover", "destination", False), AT_SOURCE),
    (Kill("precopy", "Commit", "destination", False, "uvloop"), RESOLVE),
    (Kill("precopy", "Resumed", "destination", True), DIED_THERE),
    # post-copy: after Commit the destination runs the guest on the source's pages
    (Kill("postcopy", "Resumed", "source", True, "uvloop"), ABANDONED),
    (Kill("postcopy", "PostcopyComplete", "source", False), AT_DESTINATION),
    (Kill("postcopy", "Resumed", "destination", False, "uvloop"), RESOLVE),
    (Kill("postcopy", "PostcopyComplete", "destination", False), RESOLVE),
    # hybrid: pre-copy rounds, then the post-copy handover
    (Kill("hybrid", "Verified", "destination", False, "uvloop"), AT_SOURCE),
    (Kill("hybrid", "Complete", "source", False), AT_DESTINATION),
]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(tmp_path_factory.mktemp("kills"))
    yield p
    p.close()


def test_the_cases_are_what_the_table_promises():
    for kill, ends in CASES:
        assert ends in expected(kill), kill.id


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].id)
def test_a_daemon_killed_at_a_handover_step(pool, case):
    kill, ends = case
    if kill.mode != "precopy" and not postcopy.probe().missing:
        pytest.skip(f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")
    with kill_at(pool, kill) as settled:
        assert ending(settled) == ends, settled
        assert check(settled, ends) == []


def test_a_destination_restarted_with_its_state_dir_settles_the_doubt(pool):
    """The destination daemon is killed after it resumed the guest (Resumed
    never reaches the source). Restarted with the same state dir, it knows
    the migration was under way when it died, so nothing of it runs there:
    ``vm resolve`` at the source learns that and resumes the paused copy,
    without the operator's word."""
    with kill_at(pool, Kill("precopy", "Resumed", "destination", False, "uvloop")) as s:
        assert ending(s) == RESOLVE
        back = s.victim.restarted()
        try:
            out = s.survivor.cli_json("vm", "resolve", VM_NAME)
            assert out["resolved"] == "resumed" and out["destination_says"] == "abandoned", out
            assert "restarted during this migration" in out["reason"] and not out["warning"]
            assert_daemon_vm_matches_unmoved(s.survivor, VM_NAME, RECIPE)
        finally:
            back.close()

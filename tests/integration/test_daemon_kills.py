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
``bench/soak_handover.py --kills``, and docs/postcopy.md tabulates it
(support/kills.py: ``expected``). Daemons are shared: a case's survivor,
cleaned, is the next case's peer, so each case starts one new process.
Cases alternate between the two event loops.
"""
from __future__ import annotations

import pytest

from livemig.native import postcopy
from support.daemons import EXIT_FAILED, assert_daemon_vm_matches_unmoved
from support.kills import (ABANDONED, AT_DESTINATION, AT_SOURCE, DIED_THERE, NEVER_RESUMED,
                           RECIPE, RESOLVE, VM_NAME, Kill, Pool, expected, kill_at,
                           listed)

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
        check = _CHECKS[ends]
        check(settled)


def _runs_here_intact(settled) -> None:
    vm = listed(settled.survivor)
    assert vm is not None and vm["running"] and not vm["unresolved"], vm
    assert_daemon_vm_matches_unmoved(settled.survivor, VM_NAME, RECIPE)


def _moved(settled) -> None:
    assert settled.record["status"] == "completed", settled.record
    _runs_here_intact(settled)


def _stayed(settled) -> None:
    rec = settled.record
    assert rec["status"] == "failed" and "resumed on the source" in rec["error"], rec
    _runs_here_intact(settled)


def _resolve(settled) -> None:
    rec, src = settled.record, settled.survivor
    assert rec["status"] == "in-doubt", rec
    assert f"livemig vm resolve {VM_NAME}" in rec["error"], rec["error"]
    assert "--resume" in rec["error"], rec["error"]       # the path if the destination died
    assert not settled.vm["running"] and settled.vm["unresolved"]["why"] == "in-doubt"
    unsure = src.cli("vm", "resolve", VM_NAME, check=EXIT_FAILED)
    assert "cannot learn the outcome" in unsure.stderr and "--resume" in unsure.stderr
    done = src.cli_json("vm", "resolve", VM_NAME, "--resume")
    assert done["resolved"] == "resumed" and "WARNING" in done["warning"], done
    _runs_here_intact(settled)


def _never_resumed(settled) -> None:
    rec = settled.record
    assert rec["status"] == "failed" and settled.vm is None, (rec, settled.vm)
    assert "never resumed here" in rec["error"] and "stays with the source" in rec["error"], rec


def _abandoned(settled) -> None:
    rec = settled.record
    assert rec["status"] == "failed" and settled.vm is None, (rec, settled.vm)
    for words in ("cannot be completed", "stopped and its memory freed",
                  "if the source daemon died"):
        assert words in rec["error"], rec["error"]


def _died_there(settled) -> None:
    assert settled.record["status"] == "completed", settled.record
    assert settled.vm is None


_CHECKS = {AT_DESTINATION: _moved, AT_SOURCE: _stayed, RESOLVE: _resolve,
           NEVER_RESUMED: _never_resumed, ABANDONED: _abandoned, DIED_THERE: _died_there}

"""The failure and refusal texts users read: what happened, at which phase
(once), where the VM is now, what to do; no internal wording first."""
import re

import pytest

from livemig.errors import (MigrationError, PHASE_WORDS, failure_text,
                            in_doubt_text, in_phase, reword_as_failure, stopped_after_commit_text)
from livemig.service.refusals import (STATUS_WORDS, not_running_text, postcopy_refusal_text,
                                      recover_refusal_text)
from livemig.stats import STATUSES

PHASES = ("handshake", "precopy", "switchover", "postcopy", "complete")


def _phases_named(text: str) -> list[str]:
    return [p for p in PHASE_WORDS.values() if p in text] + re.findall(r"in phase \w+", text)


def test_every_phase_has_words():
    assert set(PHASE_WORDS) == set(PHASES)
    assert in_phase("precopy") == "during pre-copy"
    assert in_phase("switchover") == "during the switchover"
    assert in_phase(None) == "before it started"


def test_a_failure_says_what_when_where_and_what_to_do():
    text = failure_text("timed out waiting for the ack of round 0 from the destination: nothing "
                        "came within 10 s", phase="precopy")
    assert text == ("migration failed during pre-copy: timed out waiting for the ack of round 0 "
                    "from the destination: nothing came within 10 s. The VM was resumed on the "
                    "source and runs on there; migrate again once the cause is fixed")


@pytest.mark.parametrize("phase", PHASES)
def test_a_reworded_failure_names_one_phase_and_keeps_its_class(phase):
    class Special(MigrationError):
        pass

    exc = reword_as_failure(Special("the destination closed the connection"), phase=phase)
    assert isinstance(exc, Special) and exc.phase == phase
    assert exc.what == "the destination closed the connection"
    assert _phases_named(str(exc)) == [PHASE_WORDS[phase]]
    assert str(exc).startswith(f"migration failed {PHASE_WORDS[phase]}: ")


def test_advice_replaces_the_generic_todo():
    exc = reword_as_failure(MigrationError("pre-copy did not converge: 3 rounds"),
                            phase="precopy", todo="to move it, add --auto-converge")
    assert str(exc).endswith("runs on there; to move it, add --auto-converge")


def test_handover_in_doubt_and_stopped_texts_name_the_way_out():
    doubt = in_doubt_text("the destination closed the connection", phase="switchover", vm="db")
    assert doubt.startswith("handover in doubt during the switchover, after Commit: the "
                            "destination closed the connection. The VM is kept paused")
    assert "`livemig vm resolve db`" in doubt
    stopped = stopped_after_commit_text("recovery timeout", phase="postcopy", vm="db")
    assert stopped.startswith("post-copy could not complete during post-copy: the destination "
                              "stopped the VM (recovery timeout)")
    assert "`livemig vm resolve db --resume`" in stopped
    for text in (doubt, stopped):
        assert len(_phases_named(text)) == 1


def test_no_message_prepends_no_to_a_description():
    # The receive funnel once wrote "no the ack of round 0 ..."
    import inspect

    from livemig.aio import channel
    from livemig.engine.source import streams

    for module in (channel, streams):
        assert not re.search(r'f"no \{what\}', inspect.getsource(module))


class _Rec:
    def __init__(self, id, direction, status):
        self.id, self.direction, self.status = id, direction, status


def test_recover_refused_outside_a_broken_postcopy_says_the_state():
    text = recover_refusal_text(4, "web", "active")
    assert text.startswith("`livemig recover web` does not apply: migration 4 of 'web' is not "
                           "in a broken post-copy state; it is in pre-copy (active)")
    assert "Nothing was changed" in text


def test_postcopy_refused_says_why():
    assert "already in post-copy" in postcopy_refusal_text(2, "web", "postcopy-active")
    assert "past pre-copy" in postcopy_refusal_text(2, "web", "active")


def test_not_running_names_the_latest_migration():
    assert "this daemon has no migration of it" in not_running_text("web", "recover", None)
    text = not_running_text("web", "recover", _Rec(3, "outgoing", "completed"))
    assert "its latest migration here, 3, is outgoing and completed" in text
    assert text.startswith("`livemig recover web` does not apply: VM 'web' is not being "
                           "migrated from this daemon")


def test_every_status_has_words():
    assert set(STATUSES) <= set(STATUS_WORDS)


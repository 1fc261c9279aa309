"""What the daemon answers when an operator command cannot apply to a migration.

Each refusal says why the command does not apply (the migration's state, in
words), that nothing was changed, and what to do instead. The texts are built
here, apart from the daemon's logic, so that tests pin them
(tests/unit/test_error_texts.py).
"""
from __future__ import annotations

STATUS_WORDS = {"setup": "setting up", "active": "in pre-copy",
                "postcopy-active": "in post-copy", "completed": "completed",
                "failed": "failed", "cancelled": "cancelled", "in-doubt": "in doubt"}


def status_words(status: str) -> str:
    return STATUS_WORDS.get(status, status)


def not_running_text(vm: str, command: str, latest) -> str:
    """``livemig COMMAND VM`` with no migration of the VM running from here;
    ``latest`` is its last migration record here, if any."""
    if latest is None:
        was = "this daemon has no migration of it"
    else:
        was = (f"its latest migration here, {latest.id}, is {latest.direction} and "
               f"{status_words(latest.status)}")
    return (f"`livemig {command} {vm}` does not apply: VM {vm!r} is not being migrated from "
            f"this daemon ({was}). Nothing was changed; run it on the source's daemon while "
            "the migration runs (`livemig status` lists migrations)")


def recover_refusal_text(rec_id: int, vm: str, status: str) -> str:
    """``livemig recover`` on a migration whose connection is not broken."""
    return (f"`livemig recover {vm}` does not apply: migration {rec_id} of {vm!r} is not in a "
            f"broken post-copy state; it is {status_words(status)} ({status}) and its "
            "connection is up. Nothing was changed; `livemig recover` retries at once a "
            "connection that broke during post-copy or after Commit")


def postcopy_refusal_text(rec_id: int, vm: str, status: str) -> str:
    """``livemig postcopy`` on a migration past the point where it could switch."""
    if status == "postcopy-active":
        now = "already in post-copy: the VM runs at the destination"
    else:
        now = "past pre-copy: the VM is being handed over to the destination"
    return (f"`livemig postcopy {vm}` does not apply: migration {rec_id} of {vm!r} is {now}. "
            "Nothing was changed; `livemig status` follows it to its end")

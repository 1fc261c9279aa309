"""Operator commands of the daemon for running migrations, and their record.

Mixed into :class:`livemig.service.daemon.Daemon`: cancel a migration, change
its bandwidth cap and downtime limit while it runs, end it after a timeout
(switch to post-copy or cancel), find migrations by id or VM name, and write
every migration's phases to the event log and its end to the history.

Cancel and timeout act only before the switchover: once the source has paused
the guest and handed it over, the VM belongs to the destination and the
migration can only finish (post-copy) or be resolved, never be rolled back.
"""
from __future__ import annotations

import asyncio
import logging

from ..config import MigrationConfig, parse_max_bandwidth
from ..errors import ConfigError, ControlError, MigrationError, failure_text
from ..policy import Action
from ..stats import ACTIVE_STATUSES
from .eventlog import event
from .history import History, history_entry

TIMEOUT_ACTIONS = ("postcopy", "cancel")
NOT_CONVERGING_ADVICE = (
    "to move it, add --auto-converge (throttle the guest until pre-copy converges), use "
    "--mode hybrid or --mode postcopy (switch over at once and fetch the rest on demand), or "
    "allow a larger --downtime-ms; `livemig plan VM --to HOST:PORT` predicts which works")


class OperatorCommands:
    """Needs ``self.migrations`` (id -> MigrationRecord) and ``self.history``."""

    migrations: dict
    history: History

    def _operator_handlers(self) -> dict:
        return {"migration.cancel": self._cmd_migration_cancel,
                "migration.set": self._cmd_migration_set,
                "migration.find": self._cmd_migration_find,
                "history": self._cmd_history}

    # -- finding -------------------------------------------------------------------
    def _find_migration(self, key):
        """The migration with id ``key``, or the latest of the VM named ``key``."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            rec = self.migrations.get(int(key))
            if rec is not None:
                return rec
        for rec in reversed(list(self.migrations.values())):
            if rec.vm_name == key:
                return rec
        raise ControlError(f"no migration with id or VM name {key!r} on this daemon; "
                           "`livemig status` lists them", error_type="NoSuchMigration")

    def _active_outgoing(self, key):
        rec = self._find_migration(key)
        if rec.direction != "outgoing" or rec.status not in ACTIVE_STATUSES:
            raise ControlError(
                f"migration {rec.id} of {rec.vm_name!r} is {rec.direction} and {rec.status}: "
                "only an active outgoing migration can be changed; run the command on the "
                "source's daemon", error_type="NoSuchMigration")
        return rec

    async def _cmd_migration_find(self, key) -> dict:
        return self._find_migration(key).describe()

    # -- control -------------------------------------------------------------------
    async def _cmd_migration_cancel(self, key) -> dict:
        rec = self._active_outgoing(key)
        if rec.status == "postcopy-active":
            raise ControlError(
                f"migration {rec.id} of {rec.vm_name!r} is in post-copy: the VM already runs "
                "at the destination and cannot be taken back; let it finish",
                error_type="Busy")
        rec.control.request_cancel()
        event(logging.INFO, f"migration {rec.id} of {rec.vm_name}: cancel requested",
              migration=rec.id, vm=rec.vm_name, event="cancel-requested")
        await asyncio.shield(rec.task)
        return rec.describe()

    async def _cmd_migration_set(self, key, downtime_ms: float | None = None,
                                 max_bandwidth: str | float | None = None,
                                 unlimited_bandwidth: bool = False) -> dict:
        rec = self._active_outgoing(key)
        changes = {}
        if downtime_ms is not None:
            # Validated as a whole config would be, then applied in place: the
            # policy reads the limit afresh after every round.
            MigrationConfig(max_downtime_ms=downtime_ms)
            rec.config.max_downtime_ms = float(downtime_ms)
            changes["downtime_ms"] = float(downtime_ms)
        if unlimited_bandwidth or max_bandwidth is not None:
            bandwidth_bps = (None if unlimited_bandwidth else
                             parse_max_bandwidth(max_bandwidth, what="--max-bandwidth"))
            rec.config.max_bandwidth_bps = bandwidth_bps
            rec.control.set_max_bandwidth(bandwidth_bps)
            changes["max_bandwidth_bps"] = bandwidth_bps
        if not changes:
            raise ConfigError("nothing to change: give --downtime-ms, --max-bandwidth or "
                              "--unlimited-bandwidth")
        event(logging.INFO, f"migration {rec.id} of {rec.vm_name}: limits changed {changes}",
              migration=rec.id, vm=rec.vm_name, event="limits-changed", **changes)
        return rec.describe()

    async def _timeout(self, rec, timeout_s: float, action: str) -> None:
        """After ``timeout_s`` of pre-copy, switch to post-copy or cancel."""
        await asyncio.sleep(timeout_s)
        if rec.status not in ("setup", "active"):
            return
        event(logging.WARNING, f"migration {rec.id} of {rec.vm_name}: --timeout {timeout_s:g} s "
              f"reached; {action}", migration=rec.id, vm=rec.vm_name, event="timeout",
              action=action)
        if action == "postcopy":
            rec.control.request_postcopy()
        else:
            rec.control.request_cancel()

    async def _cmd_history(self, limit: int | None = None) -> list:
        return self.history.read(limit)

    # -- record --------------------------------------------------------------------
    def _watch(self, rec, stats) -> None:
        """Log what changed since the last look: status and new decisions."""
        if stats.status != rec.logged_status and stats.status in ACTIVE_STATUSES:
            rec.logged_status = stats.status
            event(logging.INFO, f"migration {rec.id} of {rec.vm_name} ({rec.direction}, "
                  f"peer {rec.peer}): {stats.status}", migration=rec.id, vm=rec.vm_name,
                  event="status", status=stats.status)
        for decision in stats.decisions[rec.logged_decisions:]:
            event(logging.DEBUG if decision.action is Action.CONTINUE else logging.INFO,
                  f"migration {rec.id} round {len(stats.rounds) - 1}: {decision.action.value}: "
                  f"{decision.reason}", migration=rec.id, vm=rec.vm_name, event="decision",
                  action=decision.action.value)
        rec.logged_decisions = len(stats.decisions)
        if stats.error and stats.error != rec.logged_error:
            rec.logged_error = stats.error
            if stats.status == "postcopy-active":
                event(logging.WARNING, f"migration {rec.id} of {rec.vm_name}: {stats.error}",
                      migration=rec.id, vm=rec.vm_name, event="break")
        if stats.recoveries > rec.logged_recoveries:
            rec.logged_recoveries = stats.recoveries
            event(logging.INFO, f"migration {rec.id} of {rec.vm_name}: post-copy connection "
                  f"re-established (recovery {stats.recoveries})", migration=rec.id,
                  vm=rec.vm_name, event="recovered")

    def _advise(self, rec, exc: Exception) -> str:
        """The failure's text for the operator; a pre-copy that gave up says
        what to do about it instead of the generic advice."""
        decisions = rec.stats.decisions if rec.stats is not None else []
        if isinstance(exc, MigrationError) and exc.source_resumed and decisions \
                and decisions[-1].action is Action.GIVE_UP:
            return failure_text(exc.what, phase=exc.phase, todo=NOT_CONVERGING_ADVICE)
        return str(exc)

    def _finished(self, rec) -> None:
        """A migration ended: log it and append it to the history. A completed
        one keeps no note of a break it recovered from."""
        if rec.status == "completed" and rec.stats is not None:
            rec.stats.error = None
        level = logging.INFO if rec.status == "completed" else logging.WARNING
        why = f": {rec.error}" if rec.error else ""
        event(level, f"migration {rec.id} of {rec.vm_name} ({rec.direction}, peer {rec.peer}): "
              f"{rec.status}{why}", migration=rec.id, vm=rec.vm_name, event="end",
              status=rec.status, error=rec.error)
        try:
            self.history.append(history_entry(rec.describe(), host=self.advertised,
                                              started_wall_s=rec.started_wall_s))
        except OSError as exc:
            event(logging.ERROR, f"cannot append to the history {self.history.path}: {exc}",
                  event="history-error")

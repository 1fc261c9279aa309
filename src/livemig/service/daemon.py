"""The livemig daemon: hosts VMs, accepts incoming migrations, sends VMs onward.

One daemon runs on each machine. It has two doors:

* a **migration listener** (TCP, ``--listen HOST:PORT``) where other daemons
  deliver VMs. Without TLS certificates it binds only to loopback; binding to
  another address needs mutual TLS (``--tls-cert/--tls-key/--tls-ca``) or the
  deliberately loud ``--insecure-no-tls``;
* a **control socket** (Unix, mode 0600) taking JSON commands from the CLI or
  any local program (see :mod:`livemig.service.control`).

Everything runs on one asyncio loop; the VMs' vCPUs are native threads, so
the loop only orchestrates.

A VM whose handover could not be settled (the destination unreachable after
Commit, or it stopped the VM in post-copy) stays here paused and marked
``unresolved`` with the peer and the session id; ``vm.resolve`` asks the
destination again and applies what it learns, or the operator decides
(``--resume``/``--discard``), refused where the destination's answer shows
the decision would run the VM twice or lose it. Each migration is its own task; a migration that
fails — hostile peer, vanished peer, bad data — ends that task with an error
recorded in its stats and never touches the other VMs or the daemon itself.
Blocking native work that can take more than a millisecond (digests, snapshot
files) runs in the default executor.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..addresses import format_hostport, is_loopback, parse_hostport
from ..config import MigrationConfig
from ..engine.source.stopslot import StopSlot
from .control import ControlServer
from . import shutdown
from .limits import downtime_breach, incoming_budget
from ..errors import (ConfigError, ControlError, HandoverInDoubt, LivemigError,
                      MigrationCancelled, MigrationError)
from ..stats import ACTIVE_STATUSES, progress
from ..units import PAGE_SIZE, parse_size
from ..vm.machine import VM
from .eventlog import event
from .history import HISTORY_FILE_FORMAT, History, default_state_dir
from .operations import TIMEOUT_ACTIONS, OperatorCommands
from .refusals import not_running_text, postcopy_refusal_text, recover_refusal_text
from ..aio.deadline import within


@dataclass
class TlsFiles:
    cert: str
    key: str
    ca: str


@dataclass
class HostedVM:
    name: str
    vm: VM
    origin: str                       # "local" or "migrated from HOST:PORT"
    created_at: float = field(default_factory=time.time)
    migrating: bool = False
    unresolved: dict | None = None    # a handover to settle: peer, session_id, migration, why
    owed_pages: Callable[[], int] | None = None   # arriving in post-copy: pages still owed

    @property
    def state(self) -> str:
        if self.owed_pages is not None:
            return "postcopy"
        if self.migrating:
            return "migrating"
        if self.unresolved is not None:
            # "lost": the VM ran at the destination and died there; this
            # copy is stale (fleet/resolve.py) and stays paused
            return "lost" if "lost" in self.unresolved else "in-doubt"
        return "running" if self.vm.running else "paused"

    def describe(self) -> dict:
        owed = self.owed_pages() if self.owed_pages is not None else None
        return {
            "unresolved": self.unresolved,
            "name": self.name,
            "state": self.state,
            "memory_bytes": self.vm.memory.length_bytes,
            "vcpus": self.vm.nvcpus,
            "workload": self.vm.workload,
            "running": self.vm.running,
            "steps": self.vm.steps(),
            "origin": self.origin,
            "migrating": self.migrating,
            "owed_pages": owed,
            "owed_bytes": None if owed is None else owed * PAGE_SIZE,
            "health": self.vm.health(),
        }


@dataclass
class MigrationRecord:
    id: int
    vm_name: str
    direction: str                    # "outgoing" or "incoming"
    peer: str
    stats: Any = None                 # MigrationStats, updated live by the engine
    status: str = "setup"
    error: str | None = None
    task: asyncio.Task | None = None
    control: Any = None               # source.MigrationControl of an outgoing migration
    config: MigrationConfig | None = None
    started_mono_s: float = field(default_factory=time.monotonic)
    started_wall_s: float = field(default_factory=time.time)
    logged_status: str | None = None  # what the event log has said so far
    logged_decisions: int = 0
    logged_error: str | None = None
    logged_recoveries: int = 0
    warning: str | None = None        # completed, but past a limit (downtime)
    owed_pages: Callable[[], int] | None = None   # incoming post-copy: pages still owed

    def describe(self) -> dict:
        d = {"id": self.id, "vm": self.vm_name, "direction": self.direction, "peer": self.peer,
             "status": self.status, "error": self.error, "warning": self.warning}
        if self.stats is not None:
            d["stats"] = self.stats.to_dict()
            if self.status in ACTIVE_STATUSES:
                # The engine fills in the totals at the end; while it runs the
                # clock is ours.
                elapsed_s = time.monotonic() - self.started_mono_s
                live = progress(self.stats, elapsed_s)
                if self.direction == "incoming":
                    # The receiver does not know what the source still has to send.
                    # In post-copy it knows what it still lacks.
                    owed = self.owed_pages() if self.owed_pages is not None else None
                    live.update(remaining_bytes=None if owed is None else owed * PAGE_SIZE,
                                percent=None, eta_s=None, round=None, dirty_rate_bps=None,
                                expected_downtime_ms=None, owed_pages=owed)
                d["stats"]["total_time_ms"] = elapsed_s * 1e3
                d["stats"]["throughput_bps"] = live["throughput_bps"]
                d["progress"] = live
        return d


def _stopped_while_arriving(name: str, peer: str, *, postcopy: bool) -> str:
    """What an incoming migration's record says when this daemon stopped mid-way."""
    if postcopy:
        return (f"the daemon here was stopped while VM {name} ran here in post-copy with pages "
                f"still owed by {peer}: it was stopped and discarded here; its source keeps "
                f"its paused copy (`livemig vm resolve {name}` there resumes it)")
    return (f"the daemon here was stopped while VM {name} arrived from {peer}; the copy here "
            "was discarded and the VM runs on at its source")


class Daemon(OperatorCommands):
    def __init__(self, *, listen: str, control_path: str, tls: TlsFiles | None = None,
                 insecure: bool = False, postcopy_recovery_timeout_s: float = 30.0,
                 state_dir: str | None = None, metrics: str | None = None,
                 max_incoming_memory_bytes: int | None = None, idle_timeout_s: float = 60.0,
                 advertise: str | None = None):
        self.listen_host, self.listen_port = parse_hostport(listen, what="--listen")
        # Where peers reach this daemon when that is not --listen (a NAT, a
        # proxy in front of it): the address a fleet and the history name it by.
        self.advertise = (None if advertise is None else
                          format_hostport(*parse_hostport(advertise, what="--advertise")))
        if not is_loopback(self.listen_host) and tls is None and not insecure:
            raise ConfigError(
                f"refusing to listen on {self.listen_host}, which is not loopback, without TLS: "
                "give --tls-cert/--tls-key/--tls-ca (mutual TLS), or --insecure-no-tls to accept "
                "unauthenticated, unencrypted migrations from anyone who can reach the port")
        self.control_path = control_path
        self.state_dir = state_dir or default_state_dir()
        self.history: History | None = None   # its file is named after the port, once bound
        self.tls = tls
        self.insecure = insecure
        self.incoming_config = MigrationConfig(
            postcopy_recovery_timeout_s=postcopy_recovery_timeout_s,
            idle_timeout_s=idle_timeout_s)
        self.max_incoming_memory_bytes = max_incoming_memory_bytes   # None: from the host
        self.vms: dict[str, HostedVM] = {}
        self.arriving_postcopy: dict[str, HostedVM] = {}   # running here, pages still owed
        self.migrations: dict[int, MigrationRecord] = {}
        self._arriving: set[str] = set()
        self._ids = itertools.count(1)
        self._stopped = asyncio.Event()
        self._control = ControlServer(control_path, self._handlers())
        self._metrics = None
        if metrics is not None:
            from .metrics import MetricsServer

            self._metrics = MetricsServer(metrics, lambda: (
                self._listed(),
                [r.describe() for r in self.migrations.values()]))
        self._listener = None
        self._stop_slot = StopSlot()   # one stop at a time among outgoing migrations
        self._resolving = asyncio.Lock()   # one settling of a handover in doubt at a time
        self.fleet = None   # a fleet.member.FleetMember when the daemon joined a fleet

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        from ..engine.destination.outcomes import JOURNAL_FILE_FORMAT, OutcomeBook, SessionJournal
        from ..engine.destination.server import MigrationServer
        from ..aio.tls import server_context

        ssl_ctx = server_context(self.tls.cert, self.tls.key, self.tls.ca) if self.tls else None
        self._listener = MigrationServer(self.listen_host, self.listen_port, ssl=ssl_ctx,
                                         on_incoming=self._on_incoming,
                                         config=self.incoming_config,
                                         budget=incoming_budget(self.max_incoming_memory_bytes))
        await self._listener.start()
        self.listen_port = self._listener.port
        self._listener.outcomes = OutcomeBook(journal=SessionJournal(os.path.join(
            self.state_dir, JOURNAL_FILE_FORMAT.format(port=self.listen_port))))
        self.history = History(os.path.join(self.state_dir,
                                            HISTORY_FILE_FORMAT.format(port=self.listen_port)))
        await self._control.start()
        if self._metrics is not None:
            await self._metrics.start()
            where = format_hostport(self._metrics.host, self._metrics.port)
            event(logging.INFO, f"metrics at http://{where}/metrics", event="metrics")
        event(logging.INFO, f"daemon listening on {self.advertised}, control socket "
              f"{self.control_path}, history {self.history.path}", event="start")

    @property
    def advertised(self) -> str:
        """This daemon's migration address, as peers and the history name it."""
        return self.advertise or format_hostport(self.listen_host, self.listen_port)

    def arrivals_never_resumed(self) -> set[str]:
        """VMs an earlier life of this daemon received and provably never
        resumed (it died first): engine/destination/outcomes.py."""
        return self._listener.outcomes.never_resumed() if self._listener is not None else set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        guard = shutdown.SignalGuard(self)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, guard, sig)
            except (NotImplementedError, RuntimeError):
                pass
        await self._stopped.wait()
        await self.close()

    def request_stop(self) -> None:
        """Stop serving: ``serve_forever`` closes the daemon (see shutdown.py)."""
        self._stopped.set()

    async def close(self) -> None:
        shutdown.report_losses(self)
        for rec in self.migrations.values():
            if rec.task is not None and not rec.task.done():
                rec.task.cancel()
        for rec in self.migrations.values():
            if rec.task is not None:
                try:
                    await rec.task
                except BaseException:
                    pass
        await self._control.close()
        if self.fleet is not None:
            await self.fleet.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self._listener is not None:
            await self._listener.close()
        for hosted in list(self.vms.values()):
            hosted.vm.close()
        self.vms.clear()

    # -- incoming migrations -------------------------------------------------------
    def _on_incoming(self, name: str, peer: str, stats):
        """The migration server asks whether to take a VM; raising refuses it."""
        from ..engine.destination.server import Arrival

        if self.fleet is not None and self.fleet.draining:
            raise LivemigError(self.fleet.draining_refusal(name))
        if name in self.vms or name in self._arriving:
            raise LivemigError(f"a VM named {name!r} already runs here")
        rec = MigrationRecord(next(self._ids), name, "incoming", peer, stats=stats)
        self.migrations[rec.id] = rec
        self._arriving.add(name)
        arrival = Arrival(name, peer, stats)

        def on_resumed(vm: VM) -> None:
            # The destination verified and resumed the VM: it is ours now.
            self._arriving.discard(name)
            self.arriving_postcopy.pop(name, None)
            rec.owed_pages = None
            self.vms[name] = HostedVM(name, vm, origin=f"migrated from {peer}")

        def on_status() -> None:
            was_postcopy = rec.status == "postcopy-active"
            rec.status, rec.error = arrival.status, arrival.error
            if arrival.status == "cancelled":
                # Only closing the listener cancels an arrival: the daemon is stopping.
                rec.error = _stopped_while_arriving(name, peer, postcopy=was_postcopy)
            if arrival.status == "postcopy-active" and arrival.vm is not None \
                    and name not in self.arriving_postcopy:
                # The guest runs here while its missing pages arrive: list it.
                rec.owed_pages = arrival.owed_pages
                self.arriving_postcopy[name] = HostedVM(
                    name, arrival.vm, origin=f"migrating from {peer} (post-copy)",
                    owed_pages=arrival.owed_pages)
            self._watch(rec, stats)
            if arrival.status == "failed" and was_postcopy and self.fleet is not None:
                # It ran here and was stopped for want of pages: lost.
                asyncio.get_running_loop().create_task(self._fleet_lost(name, arrival.error))
            if arrival.status in ("failed", "cancelled"):
                self._arriving.discard(name)
                self.arriving_postcopy.pop(name, None)
                rec.owed_pages = None
            if arrival.status not in ACTIVE_STATUSES:
                self._finished(rec)

        arrival.on_resumed = on_resumed
        if self.fleet is not None:   # etcd decides who owns the VM at the commit point
            gate = self.fleet.commit_gate(name, peer)
            arrival.admit, arrival.commit_gate = gate.admit, gate
        arrival.on_status = on_status
        return arrival

    async def _fleet_lost(self, name: str, error: str | None) -> None:
        try:
            await self.fleet.mark_lost(name, f"its post-copy here was abandoned: {error}")
        except (LivemigError, ValueError) as exc:   # etcd unreachable, or a bad record
            event(logging.WARNING, f"could not mark {name} lost in etcd: {exc}", vm=name,
                  event="lost")

    # -- control commands ------------------------------------------------------------
    def _handlers(self) -> dict:
        return {
            "ping": self._cmd_ping,
            "vm.start": self._cmd_vm_start,
            "vm.list": self._cmd_vm_list,
            "vm.stop": self._cmd_vm_stop,
            "vm.pause": self._cmd_vm_pause,
            "vm.resume": self._cmd_vm_resume,
            "vm.run_to": self._cmd_vm_run_to,
            "vm.set_dirty_rate": self._cmd_vm_set_dirty_rate,
            "vm.inspect": self._cmd_vm_inspect,
            "vm.resolve": self._cmd_vm_resolve,
            "vm.save": self._cmd_vm_save,
            "vm.restore": self._cmd_vm_restore,
            "migrate": self._cmd_migrate,
            "migration.wait": self._cmd_migration_wait,
            "migration.postcopy": self._cmd_migration_postcopy,
            "migration.recover": self._cmd_migration_recover,
            "status": self._cmd_status,
            "shutdown": self._cmd_shutdown,
            "daemon.drain": self._cmd_drain,
            "dirtyrate": self._cmd_dirtyrate,
            "plan": self._cmd_plan,
            **self._operator_handlers(),
        }

    def _listed(self) -> list[dict]:
        """The VMs this daemon runs: its own, and those arriving in post-copy."""
        return [h.describe() for h in (*self.vms.values(), *self.arriving_postcopy.values())]

    def _hosted(self, name: str) -> HostedVM:
        if name in self.arriving_postcopy:
            raise ControlError(f"VM {name!r} runs here in post-copy: its last pages are still "
                               "arriving from the source; retry once the migration completes "
                               "(`livemig status` shows the pages still owed)", error_type="Busy")
        try:
            return self.vms[name]
        except KeyError:
            raise ControlError(f"no VM named {name!r} on this daemon "
                               f"(VMs: {', '.join(sorted(self.vms)) or 'none'})",
                               error_type="NoSuchVM") from None

    async def _cmd_ping(self) -> dict:
        return {"pid": os.getpid(), "listen": format_hostport(self.listen_host, self.listen_port),
                "advertised": self.advertised,
                "tls": self.tls is not None, "vms": len(self.vms),
                "max_incoming_memory_bytes": self._listener.budget.max_incoming_memory_bytes,
                "fleet": self.fleet.describe() if self.fleet is not None else None}

    async def _cmd_vm_start(self, name: str, memory: str | int = "256MiB", vcpus: int = 2,
                            workload: str = "memtest", dirty_rate: str | float | None = None,
                            seed: int = 0) -> dict:
        check_vm_name(name)
        if name in self.vms:
            raise ControlError(f"a VM named {name!r} already exists", error_type="VMExists")
        vm = await self._build_vm(name, lambda: VM(memory=parse_size(memory), vcpus=int(vcpus),
                                                   workload=workload, dirty_rate=dirty_rate,
                                                   seed=int(seed)))
        vm.start()
        self.vms[name] = HostedVM(name, vm, origin="local")
        event(logging.INFO, f"VM {name} started: {workload}, {vm.memory.length_bytes >> 20} MiB",
              vm=name, event="vm-start")
        return self.vms[name].describe()

    async def _build_vm(self, name: str, build: Callable[[], VM]) -> VM:
        """``build()`` in the executor. In a fleet, etcd first names this host
        the owner of ``name`` (refused if another live host owns it)."""
        if self.fleet is not None:
            await self.fleet.claim_name(name)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, build)
        except BaseException:
            if self.fleet is not None:
                await self.fleet.release_name(name)
            raise

    async def _cmd_vm_list(self) -> list:
        return self._listed()

    async def _cmd_vm_stop(self, name: str) -> dict:
        hosted = self._hosted(name)
        if hosted.migrating:
            raise ControlError(f"VM {name!r} is being migrated; wait for the migration to end",
                               error_type="Busy")
        del self.vms[name]
        await asyncio.get_running_loop().run_in_executor(None, hosted.vm.close)
        event(logging.INFO, f"VM {name} stopped", vm=name, event="vm-stop")
        if self.fleet is not None:
            # Now, not at the next renewal: a VM stopped before any renewal
            # saw it would otherwise keep its name in etcd for good.
            await self.fleet.release_name(name)
        return {"name": name, "stopped": True}

    async def _cmd_vm_pause(self, name: str) -> dict:
        hosted = self._hosted(name)
        hosted.vm.pause()
        return hosted.describe()

    async def _cmd_vm_resume(self, name: str) -> dict:
        hosted = self._hosted(name)
        if hosted.unresolved is not None:
            raise ControlError(f"VM {name!r} is paused after a handover that is not settled "
                               f"({hosted.unresolved['why']}); use `livemig vm resolve {name}`",
                               error_type="Refused")
        hosted.vm.resume()
        return hosted.describe()

    async def _cmd_vm_run_to(self, name: str, step: int, timeout_s: float = 60.0) -> dict:
        hosted = self._hosted(name)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: hosted.vm.run_to(int(step), timeout_s=float(timeout_s)))
        return hosted.describe()

    async def _cmd_vm_set_dirty_rate(self, name: str, rate: str | float | None = None) -> dict:
        """Re-pace the guest (None = as fast as it goes). Timing only: what the
        guest computes does not depend on it."""
        hosted = self._hosted(name)
        hosted.vm.set_dirty_rate(rate)
        return hosted.describe()

    async def _cmd_vm_save(self, name: str, path: str) -> dict:
        """Write the VM to a snapshot file; a running VM pauses while it is
        written and then runs on."""
        from ..vm.snapshot import save

        hosted = self._hosted(name)
        if hosted.migrating:
            raise ControlError(f"VM {name!r} is being migrated; save it once that ends",
                               error_type="Busy")
        was_running = hosted.vm.running
        hosted.vm.pause()
        try:
            nbytes = await asyncio.get_running_loop().run_in_executor(None, save, hosted.vm, path)
        finally:
            if was_running:
                hosted.vm.resume()
        return {"name": name, "path": path, "bytes": nbytes}

    async def _cmd_vm_restore(self, path: str, name: str | None = None,
                              paused: bool = False) -> dict:
        from ..vm.snapshot import load

        name = name or os.path.splitext(os.path.basename(path))[0]
        check_vm_name(name)
        if name in self.vms:
            raise ControlError(f"a VM named {name!r} already exists; give --name",
                               error_type="VMExists")
        vm = await self._build_vm(name, lambda: load(path))
        if not paused:
            vm.resume()
        self.vms[name] = HostedVM(name, vm, origin=f"restored from {path}")
        event(logging.INFO, f"VM {name} restored from {path}", vm=name, event="vm-restore")
        return self.vms[name].describe()

    async def _cmd_vm_inspect(self, name: str) -> dict:
        """Digest, registers and console of a paused VM: the determinism oracle."""
        hosted = self._hosted(name)
        if hosted.vm.running:
            raise ControlError(f"VM {name!r} is running; pause it (or run_to) before inspecting",
                               error_type="Busy")
        vm = hosted.vm
        digest = await asyncio.get_running_loop().run_in_executor(None, vm.digest)
        return {"name": name, "digest": digest.hex(), "steps": vm.steps(),
                "cpus": [vm.registers(i) for i in range(vm.nvcpus)],
                "console": [vm.console(i).hex() for i in range(vm.nvcpus)]}

    async def _cmd_migrate(self, name: str, to: str, wait: bool = False,
                           server_hostname: str | None = None, timeout_s: float | None = None,
                           timeout_action: str = "cancel", **options) -> dict:
        from ..engine.source.session import MigrationControl, migrate

        hosted = self._hosted(name)
        if hosted.migrating:
            raise ControlError(f"VM {name!r} is already being migrated", error_type="Busy")
        config = MigrationConfig.from_dict(options)
        host, port = parse_hostport(to, what="--to")
        if timeout_s is not None and not float(timeout_s) > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {timeout_s}")
        if timeout_action not in TIMEOUT_ACTIONS:
            raise ConfigError(f"--timeout-action must be one of {', '.join(TIMEOUT_ACTIONS)}, "
                              f"got {timeout_action!r}")
        ssl_ctx = self._client_ssl()
        rec = MigrationRecord(next(self._ids), name, "outgoing", format_hostport(host, port),
                              control=MigrationControl(stop_slot=self._stop_slot), config=config)
        self.migrations[rec.id] = rec
        if self.fleet is not None:
            rec.control.arbiter = self.fleet.arbiter(name, rec.peer)
        hosted.migrating = True
        self._listener.outcomes.moving_on(name)    # a restart here must not claim it any more
        event(logging.INFO, f"migration {rec.id} of {name} to {rec.peer} starting: "
              f"{config.mode}, downtime limit {config.max_downtime_ms:g} ms",
              migration=rec.id, vm=name, event="start", mode=config.mode, peer=rec.peer)

        def on_stats(stats) -> None:
            rec.stats = stats
            if stats.status in ("active", "postcopy-active"):
                rec.status = stats.status
            if stats.status in ("active", "postcopy-active"):
                rec.error = stats.error    # a break being recovered, or None once it is
            self._watch(rec, stats)

        async def run() -> None:
            try:
                rec.status = "active"
                stats = await migrate(hosted.vm, host, port, config=config, ssl=ssl_ctx,
                                      server_hostname=server_hostname, name=name,
                                      on_stats=on_stats, control=rec.control,
                                      origin=self.advertised)
                rec.stats = stats
                rec.status = "completed"
                rec.error = None
                rec.warning = downtime_breach(stats, config.max_downtime_ms)
                # The destination verified and resumed the VM: ours is released.
                del self.vms[name]
                await asyncio.get_running_loop().run_in_executor(None, hosted.vm.close)
            except asyncio.CancelledError:
                rec.status = "cancelled"
                raise
            except MigrationCancelled as exc:
                rec.status = "cancelled"
                rec.error = str(exc)
                rec.stats = exc.stats or rec.stats
            except Exception as exc:
                rec.status = "in-doubt" if isinstance(exc, HandoverInDoubt) else "failed"
                rec.stats = getattr(exc, "stats", rec.stats)
                rec.error = self._advise(rec, exc)
                if isinstance(exc, MigrationError) and not exc.source_resumed:
                    hosted.unresolved = {"peer": rec.peer, "migration": rec.id,
                                         "session_id": rec.control.session_id.hex(),
                                         "why": rec.status if rec.status == "in-doubt" else
                                         "the destination stopped the VM after Commit"}
            finally:
                hosted.migrating = False
                if timer is not None:
                    timer.cancel()
                self._finished(rec)

        timer = None
        if timeout_s is not None:
            timer = asyncio.get_running_loop().create_task(
                self._timeout(rec, float(timeout_s), timeout_action))
        rec.task = asyncio.get_running_loop().create_task(run(), name=f"migrate-{rec.id}")
        if wait:
            await asyncio.shield(rec.task)
        return rec.describe()

    # -- the API the fleet's drain and balance runs and shutdown's drain call ---------
    async def migrate_vm(self, name: str, to: str, **options) -> dict:
        """Migrate VM ``name`` to the daemon at ``to`` and wait for the end.
        ``options`` are a migration's (``mode``, ``max_downtime_ms``, ...).
        Returns the migration's record: ``status`` completed, failed,
        cancelled or in-doubt, and ``error``."""
        return await self._cmd_migrate(name, to, wait=True, **options)

    async def measure_dirty_rate(self, name: str, window_s: float) -> float:
        """Bytes per second the running VM ``name`` dirties, measured now."""
        return (await self._cmd_dirtyrate(name, window_s=window_s))["bytes_per_s"]

    async def stop_vm(self, name: str) -> None:
        """Stop and free VM ``name`` (refused while it migrates)."""
        await self._cmd_vm_stop(name)

    async def resolve_vm(self, name: str, action: str | None = None) -> dict:
        """``livemig vm resolve``: settle VM ``name``'s unsettled handover
        (ControlError when it cannot be settled now). The fleet calls it at
        each renewal for every paused copy in doubt (fleet/member.py)."""
        return await self._cmd_vm_resolve(name, action)

    async def _cmd_migration_wait(self, id: int, timeout_s: float | None = None) -> dict:
        rec = self.migrations.get(int(id))
        if rec is None:
            raise ControlError(f"no migration with id {id}", error_type="NoSuchMigration")
        if rec.task is not None:
            try:
                await within(asyncio.shield(rec.task), timeout_s)
            except asyncio.TimeoutError:
                pass
        return rec.describe()

    def _outgoing(self, vm: str, command: str) -> MigrationRecord:
        """The running outgoing migration of ``vm``; refuses ``livemig
        COMMAND VM`` plainly when there is none."""
        for rec in reversed(list(self.migrations.values())):
            if rec.vm_name == vm and rec.direction == "outgoing" and rec.task is not None \
                    and not rec.task.done():
                return rec
        raise ControlError(not_running_text(vm, command, self._latest(vm)),
                           error_type="NoSuchMigration")

    def _latest(self, vm: str) -> MigrationRecord | None:
        return next((r for r in reversed(list(self.migrations.values())) if r.vm_name == vm),
                    None)

    async def _cmd_migration_postcopy(self, vm: str) -> dict:
        """Switch an ongoing migration of ``vm`` to post-copy after its current round."""
        rec = self._outgoing(vm, "postcopy")
        if rec.status == "postcopy-active" or rec.control.past_precopy:
            raise ControlError(postcopy_refusal_text(rec.id, vm, rec.status),
                               error_type="Refused")
        rec.control.request_postcopy()
        return rec.describe()

    async def _cmd_migration_recover(self, vm: str) -> dict:
        """Retry a broken post-copy (or post-Commit) connection of ``vm`` now.
        A migration whose connection is not broken has nothing to retry: refused."""
        rec = self._outgoing(vm, "recover")
        if rec.error is None:
            raise ControlError(recover_refusal_text(rec.id, vm, rec.status),
                               error_type="Refused")
        rec.control.recover_now()
        return rec.describe()

    async def _cmd_vm_resolve(self, name: str, action: str | None = None) -> dict:
        """Settle a handover left unresolved: ask the destination what became
        of the session and apply it; ``action`` ("resume" or "discard") is
        the operator's decision, refused when the destination's answer shows
        it would run the VM twice or lose it. In a fleet, etcd's owner key
        decides instead (fleet/resolve.py)."""
        async with self._resolving:   # the operator's and the fleet's, one at a time
            return await self._resolve(name, action)

    async def _resolve(self, name: str, action: str | None) -> dict:
        from ..engine.source.handover import (ABANDONED, COMMITTED, NOT_COMMITTED, POSTCOPY,
                                             UNKNOWN, UNREACHABLE, ask_peer)

        hosted = self._hosted(name)
        pending = hosted.unresolved
        if pending is None:
            raise ControlError(f"VM {name!r} has no unsettled handover; nothing to resolve",
                               error_type="Refused")
        if action not in (None, "resume", "discard"):
            raise ControlError(f"action is 'resume' or 'discard', not {action!r}",
                               error_type="ConfigError")
        host, port = parse_hostport(pending["peer"])

        def ask():
            return ask_peer(host, port, bytes.fromhex(pending["session_id"]),
                            npages=hosted.vm.memory.npages, ssl=self._client_ssl(),
                            timeout_s=10.0)
        if self.fleet is not None:   # etcd says who owns the VM (fleet/resolve.py)
            verdict = await self.fleet.resolve(name, pending["peer"], action, ask)
            if verdict.lost:
                pending["lost"] = verdict.reason
                rec = self.migrations.get(pending["migration"])
                if rec is not None and "lost with its host" not in (rec.error or ""):
                    rec.status = "failed"
                    rec.error = f"{rec.error}; resolved: {verdict.reason}"
                event(logging.WARNING, verdict.reason, vm=name, event="lost")
                return {"name": name, "resolved": "lost", "destination_says":
                        verdict.destination_says, "reason": verdict.reason, "warning": None,
                        "owner": verdict.owner, "epoch": verdict.epoch}
            done = {**await self._resolved(name, hosted, pending, verdict.resume,
                                           verdict.reason, verdict.destination_says,
                                           holder=str(verdict.owner)),
                    "owner": verdict.owner, "epoch": verdict.epoch}
            return {**done, "warning": verdict.warning}
        learned = await ask()
        peer = f"the destination {pending['peer']}"
        runs_there = learned.kind in (COMMITTED, POSTCOPY)
        if learned.kind == POSTCOPY:
            raise ControlError(
                f"{peer} runs VM {name!r} in post-copy and still lacks pages only this host "
                "holds; it stops the VM when its recovery timeout passes. Nothing was changed; "
                f"resolve again after that (the copy paused here will be resumed)",
                error_type="Refused")
        if runs_there and action == "resume":
            raise ControlError(f"refusing to resume VM {name!r} here: {peer} reports it runs "
                               f"it ({learned.reason}); two copies would run. Use "
                               f"`livemig vm resolve {name}` or --discard", error_type="Refused")
        if learned.kind in (NOT_COMMITTED, ABANDONED) and action == "discard":
            raise ControlError(f"refusing to discard VM {name!r}: {peer} reports it does not run "
                               f"it ({learned.reason}); this paused copy is the only one. Use "
                               f"`livemig vm resolve {name}` or --resume", error_type="Refused")
        unknown = learned.kind in (UNKNOWN, UNREACHABLE)
        if unknown and action is None:
            raise ControlError(
                f"cannot learn the outcome from {peer}: {learned.reason}. VM {name!r} stays "
                "paused here. Decide by hand once you know where it runs: --resume (if the "
                "destination does run it, two copies run) or --discard (if it does not, the "
                "VM is lost)", error_type="InDoubt")
        resume = action == "resume" if unknown else not runs_there
        warning = None
        if unknown:
            risk = ("resumed here on your word: if the destination runs it too, stop one copy"
                    if resume else
                    "discarded here on your word: if the destination does not run it, it is lost")
            warning = f"WARNING: the outcome is unknown ({learned.reason}); VM {name!r} was {risk}"
        return {**await self._resolved(name, hosted, pending, resume,
                                       learned.reason or "by the operator", learned.kind,
                                       holder=peer),
                "reason": learned.reason, "warning": warning}

    async def _resolved(self, name: str, hosted: HostedVM, pending: dict, resume: bool,
                        why: str, says: str | None, *, holder: str) -> dict:
        """Apply a resolution: resume the paused copy here, or release it."""
        hosted.unresolved = None
        rec = self.migrations.get(pending["migration"])
        if resume:
            hosted.vm.resume()
            outcome = f"resumed here ({why})"
        else:
            del self.vms[name]
            await asyncio.get_running_loop().run_in_executor(None, hosted.vm.close)
            outcome = f"released here: {holder} runs it ({why})"
        if rec is not None:
            rec.status = "failed" if resume else "completed"
            rec.error = f"{rec.error}; resolved: {outcome}"
        return {"name": name, "resolved": "resumed" if resume else "discarded",
                "destination_says": says, "reason": why, "warning": None}

    async def _cmd_status(self, id: int | None = None) -> Any:
        if id is not None:
            rec = self.migrations.get(int(id))
            if rec is None:
                raise ControlError(f"no migration with id {id}", error_type="NoSuchMigration")
            return rec.describe()
        return {"vms": self._listed(),
                "migrations": [r.describe() for r in self.migrations.values()]}

    async def _cmd_dirtyrate(self, name: str, window_s: float = 1.0, method: str = "auto",
                             interval_s: float = 0.1, record: str | None = None) -> dict:
        """Measure a running VM's dirty rate (see :mod:`livemig.analysis.dirtyrate`),
        or with ``record`` (an absolute path) record its dirty-page trace there."""
        from ..analysis.dirtyrate import measure_dirty_rate, record_trace

        hosted = self._hosted(name)
        if not hosted.vm.running:
            raise ControlError(f"VM {name!r} is paused: it dirties nothing; resume it first",
                               error_type="Busy")
        if record is not None:
            result = await asyncio.get_running_loop().run_in_executor(
                None, lambda: record_trace(hosted.vm, record, float(window_s),
                                           interval_s=float(interval_s)))
            return {"name": name, **result}
        report = await asyncio.get_running_loop().run_in_executor(
            None, lambda: measure_dirty_rate(hosted.vm, float(window_s), method=method,
                                             interval_s=float(interval_s)))
        return {"name": name, **report.to_dict()}

    async def _cmd_plan(self, name: str, to: str, window_s: float = 1.0,
                        probe_bytes: str | int = "64MiB", probe_time_s: float = 1.0,
                        server_hostname: str | None = None, **options) -> dict:
        """Dry run of a migration: bandwidth probe + dirty rate -> policy.predict.
        ``options`` are the migration's (``downtime_ms``, ``max_bandwidth_bps``, ...)."""
        from ..analysis.plan import plan_migration

        hosted = self._hosted(name)
        config = MigrationConfig.from_dict(options)
        host, port = parse_hostport(to, what="--to")
        plan = await plan_migration(hosted.vm, host, port, config=config, ssl=self._client_ssl(),
                                    server_hostname=server_hostname, window_s=float(window_s),
                                    probe_bytes=parse_size(probe_bytes, what="probe_bytes"),
                                    probe_time_s=float(probe_time_s))
        return {"name": name, "to": format_hostport(host, port), **plan.to_dict()}

    def _client_ssl(self):
        if self.tls is None:
            return None
        from ..aio.tls import client_context
        return client_context(self.tls.cert, self.tls.key, self.tls.ca)

    async def _cmd_shutdown(self, force: bool = False) -> dict:
        shutdown.check_stop(self, bool(force))
        asyncio.get_running_loop().call_soon(self._stopped.set)
        return {"shutting_down": True}

    async def _cmd_drain(self, to: str, **options) -> dict:
        return await shutdown.drain(self, to, **options)


def check_vm_name(name) -> None:
    """A VM name is what a destination accepts in an offer: 1 to MAX_NAME_CHARS
    letters, digits, '-', '_' or '.'."""
    from ..engine.destination.server import MAX_NAME_CHARS

    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS \
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"bad VM name {name!r}: use 1 to {MAX_NAME_CHARS} letters, digits, "
                          "'-', '_' or '.'; no VM was started")


def default_control_path(listen: str, *, what: str = "listen address") -> str:
    """The control socket of the daemon listening at ``listen``: one per port."""
    _, port = parse_hostport(listen, what=what)
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(runtime, f"livemig-{port}.sock")

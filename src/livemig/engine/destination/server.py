"""The destination side: receive a VM, verify it, and resume it only on Commit.

Theory of operation
-------------------
::

    Hello/Welcome ─ MigrationOffer ─▶ host accepts? (in a fleet: etcd names the source
        as the VM's owner, which fixes the commit's epoch) allocate VM.blank ─ Accept
    RoundStart / PageBatch* / RoundEnd  ─▶ decode batches into guest memory
    Switchover(state, digest) ─▶ digest of landed pages == source's?  load state
        ─ Verified ─▶ ◀ Commit ─ resume vCPUs ─ Resumed ─▶ hand the VM to the host

The guest's vCPUs stay parked until Commit. Before it, any failure — a
truncated stream, a protocol violation, a bad batch, a digest or state
mismatch, the source going away — discards the half-received VM and frees its
memory; the source still owns the VM and resumes it. After Commit the VM is
the host's (the daemon's inventory, or the library caller's).

Post-copy and hybrid (docs/postcopy.md)::

    PageInvalidate ─▶ (first one: await pre-faulting, or join the streams and end
        their first-touch fill ─ PostcopyMemory(present =
        pages received) ─ post-copy decoder, FaultService) ─ discard the named
        pages ─ RoundAck ─▶          ... while the guest still runs at the source
    Switchover(postcopy, owed bitmap, digest) ─▶ discard owed pages still held
        ─ digest of held pages ok? ─ exactly the owed pages missing? ─ load state
        ─ Verified ─▶ ◀ Commit ─ resume ─ Resumed ─▶ FaultService until every
        page is present ─ PostcopyComplete(digest) ─▶ ◀ Complete ─ unregister

Hazards: MADV_POPULATE_WRITE on a range registered for MISSING faults would
raise userfaults on our own thread, so the pre-faulting task is awaited before
registering (pure post-copy skips pre-faulting: UFFDIO_COPY allocates). On
native streams nothing pre-faults: the streams place fresh pages by
UFFDIO_COPY through a registration of their own (native/firsttouch.py), which
ends when they are joined (DestStreams.close), before any other. A VM
with missing pages is never closed before ``PostcopyMemory.close(abandon=True)``
(closing would block on pages that never come). If the channels break during
post-copy the guest's vCPUs simply stay blocked on their faults; the source
reconnects with Hello(resume=True) and the same session id (the server routes
every channel of a session to its IncomingMigration) within
``postcopy_recovery_timeout_s``, or we give up: the VM cannot be completed,
so it is stopped and its memory freed (the inherent risk of post-copy). Any
failure of the post-copy channel set — a reset, a half-closed stream, a
protocol error, an Abort — is such a break: the guest runs here already, so
only the source coming back or the timeout ends the session. A break once
every page is here completes the VM here.

Outcomes (outcomes.py): a session that ends writes what became of it
(committed, not committed, abandoned) in the server's OutcomeBook. A source
that lost its connection after Commit reconnects with Hello(resume=True):
a post-copy session still running here adopts the new channel; any other
session is told to let go of its old channel (so that it decides now, from
what it has received, instead of at its timeout), and once it has ended the
new channel is answered with ``Outcome`` from the record.

One IncomingMigration serves one session (its control channel, and for
post-copy its urgent and bulk channels). MigrationServer accepts any number
of them concurrently; a failing one is logged in its record and never
affects the others or the server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np

from ...aio.channel import Channel, ChannelServer, recv_within, serve_channels
from ...aio.deadline import within
from ...config import MigrationConfig
from ...codec.decoder import BatchDecoder
from ...codec.digest import OWED_PAGE_HASH, memory_digest_full
from ...errors import (BackendUnavailable, CodecError, LivemigError, MigrationError,
                     ProtocolError, RemoteProtocolError, StateFormatError, Unsupported)
from ...native import streams as native_streams
from ...native import firsttouch
from ...native import urgent
from .arrival import Arrival, IncomingHook, default_hook, postcopy_unavailable_reason
from .admission import AdmissionRefused, MemoryBudget, Reservation, compatibility_problem
from . import resume
from .outcomes import OutcomeBook, OutcomeRecord, RecoveryExpired
from .postcopy import FaultService, PostcopyPlacer
from .probes import answer_probes
from .streamprobe import STREAM_PROBE, ProbeSlot, StreamProbeDesk
from .streamprobe import offered as stream_probe_offered
from .streams import (PUSH, STREAMS, TLS_STREAMS, DestStreams, stream_peer_problem,
                      check_offer as check_streams_offer, offered as streams_offered,
                      tls_context as stream_tls_context)
from ...native import PAGE_SIZE
from ...native import postcopy
from ...protocol import (Abort, Accept, ChannelKind, Hello, MigrationOffer, Mode,
                       Outcome, OutcomeCode, PageBatch, PageInvalidate, Phase, Refuse, RefuseCode,
                       Resumed, RoundAck, RoundEnd, RoundStart, Switchover, Verified,
                       VerifyFailed, Welcome, answer_hello, spec)
from ...protocol import Ping, Pong
from ...stats import MigrationStats
from ...vm.machine import VM

MAX_VCPUS = 64
POPULATE_CHUNK_PAGES = 1024  # 4 MiB: the longest a post-copy switchover waits for it
RECV_WINDOW_BYTES = 4 << 20  # events queued ahead of the decoder: keeps the
                             # source's bandwidth estimate honest
MAX_NAME_CHARS = 64


class IncomingMigration:
    def __init__(self, ch: Channel, hook: IncomingHook, config: MigrationConfig,
                 sessions: dict | None = None, outcomes: OutcomeBook | None = None,
                 budget: MemoryBudget | None = None, probe_slot: ProbeSlot | None = None):
        self.ch = ch
        self.budget = budget
        self.reservation: Reservation | None = None
        self.hook = hook
        self.config = config
        self.vm: VM | None = None
        self.arrival: Arrival | None = None
        self.stats = MigrationStats()
        self.phase = Phase.HANDSHAKE
        self._t0 = time.monotonic()
        self._handed_over = False
        self._populating: asyncio.Future | None = None
        self._populate_stop = threading.Event()
        self._round_pages = 0
        self.progress: resume.RoundProgress | None = None   # when pre-copy is resumable
        self.populate_error: str | None = None
        self.session_id = ch.conn.session_id
        self._sessions = sessions if sessions is not None else {}
        self._sessions[self.session_id] = self
        self.pm: postcopy.PostcopyMemory | None = None
        self.faults: FaultService | None = None
        self._side: dict[ChannelKind, Channel] = {}     # urgent and bulk channels
        self._channel_arrived = asyncio.Event()
        self._released: dict[Channel, asyncio.Event] = {}
        self._resumed_control: Channel | None = None
        self._outcomes = outcomes if outcomes is not None else OutcomeBook()
        self._guest_resumed = False          # set in the loop step that resumed it
        self._held_digest = bytes(16)        # of the memory verified, or landed in post-copy
        self.ended = asyncio.Event()
        self.decided = asyncio.Event()       # the guest resumed here, or the session ended
        self._streams: DestStreams | None = None   # pre-copy pages on native threads
        # Stream probes before the offer (livemig plan), one per server at a time.
        self._probe_desk = StreamProbeDesk(ch, probe_slot or ProbeSlot(), self._release)
        self._push_n = 0                            # post-copy push streams offered
        self._push: list[tuple[Channel, tuple | None]] = []   # (channel, its socket not yet taken)

    @property
    def peer(self) -> str:
        addr = self.ch.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr or "peer")

    async def run(self) -> VM | None:
        try:
            if not await self._accept_offer():
                return None
            await resume.receive(self)    # a break in the rounds may be waited out
            return self.vm
        except BaseException as exc:
            self._record_failure(exc)
            if not isinstance(exc, (LivemigError, asyncio.CancelledError)):
                raise
            if isinstance(exc, LivemigError):
                await self._tell_source(exc)
            return None
        finally:
            self._record_outcome()
            if self._sessions.get(self.session_id) is self:
                del self._sessions[self.session_id]
            self.ended.set()
            self.decided.set()
            self._drop_push()
            for ch in list(self._released):
                self._release(ch)
            if self._populating is not None:
                # The peer is gone or done: stop faulting in memory now (the
                # chunk in hand finishes), and the region must outlive that.
                self._populate_stop.set()
                await asyncio.shield(self._populating)
            self._probe_desk.close()
            if self._streams is not None:
                self._streams.close()   # threads joined before memory can go
            if self.faults is not None:
                self.faults.stop()
            if self.pm is not None and not self.pm.closed:
                # Pages are still missing: the guest cannot be completed. Wake
                # its blocked vCPUs onto zero pages and throw it away.
                self.pm.close(abandon=True)
                self._handed_over = False
            if not self._handed_over and self.vm is not None:
                # Never resumed here (or abandoned): the source owns the VM. Free ours.
                self.vm.close()
                self.vm = None
            if self.reservation is not None:
                self.reservation.release()

    def _record_outcome(self) -> None:
        """Write what became of the session, for a source that asks later
        (written before the session leaves ``sessions``: see outcomes.py)."""
        if self.arrival is None:
            return      # a probe, or an offer refused: nothing was ever committed
        postcopy_live = self.pm is not None and not self.pm.closed
        if not self._guest_resumed:
            code, digest = OutcomeCode.NOT_COMMITTED, bytes(16)
            reason = ("the session ended here before Commit arrived; the copy here was "
                      "discarded without running")
        elif postcopy_live:
            code, digest = OutcomeCode.ABANDONED, bytes(16)
            reason = (f"resumed here in post-copy, then stopped with {self.pm.missing} pages "
                      f"never received ({self.stats.error or 'no error recorded'})")
        else:
            code, digest = OutcomeCode.COMMITTED, self._held_digest
            reason = "resumed here; the VM is this host's"
        self._outcomes.record(self.session_id, OutcomeRecord(code, digest, reason,
                                                             self.arrival.name))

    def _populate(self) -> None:
        """Pre-fault guest memory in small chunks, stopping early when asked
        (a post-copy switchover must not wait for the rest)."""
        mem = self.vm.memory
        try:
            for first in range(0, mem.npages, POPULATE_CHUNK_PAGES):
                if self._populate_stop.is_set():
                    return
                mem.populate(first, min(POPULATE_CHUNK_PAGES, mem.npages - first))
        except Unsupported as exc:
            self.populate_error = str(exc)

    # -- handshake -----------------------------------------------------------------------
    async def _accept_offer(self) -> bool:
        offer, probed = await answer_probes(self.ch, self.config.handshake_timeout_s,
                                            self.phase.label, self._probe_desk)
        self._probe_desk.close()    # a probe the source did not end ends at the offer
        if offer is None and probed:
            return False  # a bandwidth probe only (livemig plan): nothing to host
        problem = self._check_offer(offer)
        streams_problem = (check_streams_offer(offer.config.get("streams"),
                                               STREAMS in self.ch.conn.capabilities)
                           or check_streams_offer(offer.config.get("push_streams"),
                                                  PUSH in self.ch.conn.capabilities))
        if problem is None and streams_problem is not None:
            problem = RefuseCode.OFFER, streams_problem
        if problem is not None:
            code, reason = problem
            await self.ch.send(Refuse(code, reason))
            self.stats.error = f"refused: {reason}"
            return False
        cfg = offer.config
        if self.budget is not None:
            try:
                self.reservation = self.budget.admit(cfg["name"], cfg["memory_bytes"])
            except AdmissionRefused as exc:
                await self.ch.send(Refuse(RefuseCode.RESOURCES, str(exc)[:1000]))
                self.stats.error = f"refused: {exc}"
                return False
        try:
            # The source's name for itself (a daemon's address) when it gives
            # one: the connection's own address has an ephemeral port.
            origin = cfg.get("origin")
            peer = (origin if isinstance(origin, str) and 0 < len(origin) <= MAX_NAME_CHARS * 4
                    else self.peer)
            self.arrival = self.hook(cfg["name"], peer, self.stats)
            self._outcomes.begin(self.session_id, self.arrival.name)
        except LivemigError as exc:
            await self.ch.send(Refuse(RefuseCode.BUSY, str(exc)))
            self.stats.error = f"refused: {exc}"
            return False
        self.stats.memory_bytes = cfg["memory_bytes"]
        if self.arrival.admit is not None:
            try:
                await self.arrival.admit()
            except LivemigError as exc:
                await self.ch.send(Refuse(RefuseCode.OFFER, str(exc)[:1000]))
                self._set_status("failed", f"refused: {exc}")
                return False
        try:
            self.vm = await asyncio.get_running_loop().run_in_executor(
                None, lambda: VM.blank(cfg["memory_bytes"], cfg["vcpus"]))
        except (LivemigError, MemoryError, OSError) as exc:
            await self.ch.send(Refuse(RefuseCode.RESOURCES, f"cannot host the VM here: {exc}"))
            self._set_status("failed", f"refused: {exc}")
            return False
        self.decoder = BatchDecoder(self.vm.memory, verify_dup=self.config.codec.verify_dup)
        self._held = np.zeros(self.vm.memory.npages, dtype=bool)   # pages landed so far
        self.mode = offer.mode
        self.progress = resume.progress_for(self, self.ch)
        nstreams = cfg.get("streams")
        fill = await self._first_touch_fill(nstreams, offer.mode)
        if nstreams:   # resumable: the threads mark the round's pages (resume.RoundProgress)
            self._streams = DestStreams(
                self.vm.memory, self.decoder.hashes.values,
                self._held if self.progress is None else self.progress.landed_bits,
                self.decoder.placer.held, nstreams, fill=fill)
        self._push_n = cfg.get("push_streams") or 0
        tls = self.ch.get_extra_info("ssl_object") is not None
        self.stats.data_path = (native_streams.path_label(nstreams, tls=tls) if nstreams else
                                "python: the source sends its pages on the control channel")
        self.stats.mode = offer.mode.name.lower()
        if offer.mode is not Mode.POSTCOPY and fill is None:
            # Fault the memory in while round 0 streams, so that pages landing in
            # the final round (the downtime) never pay a first-touch fault.
            # (Pure post-copy places nearly every page with UFFDIO_COPY, which
            # allocates; pre-faulting would only delay the switchover.)
            self._populating = asyncio.get_running_loop().run_in_executor(None, self._populate)
        await self.ch.send(Accept())
        self.phase = Phase.PRECOPY
        self._set_status("active")
        self.stats.setup_time_ms = (time.monotonic() - self._t0) * 1e3
        return True

    async def _first_touch_fill(self, nstreams: int | None,
                                mode: Mode) -> firsttouch.FirstTouchFill | None:
        """Pre-copy on native streams: fresh memory filled by UFFDIO_COPY,
        never zeroed first, unless fresh memory is measured cheap enough to
        pre-fault (native/firsttouch.py); else it is pre-faulted while round
        0 streams, and stats.first_touch says why."""
        if mode is Mode.POSTCOPY:
            return None     # UFFDIO_COPY places nearly every page anyway
        if not nstreams:
            self.stats.first_touch = "pre-faulted: the pages come on the control channel"
            return None
        cost = await asyncio.get_running_loop().run_in_executor(
            None, firsttouch.cost_unless_decided)
        fill, self.stats.first_touch = firsttouch.first_touch_fill(self.vm.memory, cost)
        return fill

    @staticmethod
    def _check_offer(offer: MigrationOffer):
        cfg = offer.config
        if offer.mode is not Mode.PRECOPY:
            reason = postcopy_unavailable_reason()
            if reason is not None:
                return RefuseCode.OFFER, (f"mode {offer.mode.name.lower()} refused: {reason}; "
                                          "pre-copy is still possible")
        if offer.page_size != PAGE_SIZE:
            return RefuseCode.OFFER, (f"the VM uses {offer.page_size}-byte pages; this host "
                                      f"supports only {PAGE_SIZE}. The VM keeps running on "
                                      "the source")
        name, memory_bytes, vcpus = cfg.get("name"), cfg.get("memory_bytes"), cfg.get("vcpus")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS \
                or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            return RefuseCode.OFFER, f"bad VM name {name!r}"
        if not isinstance(memory_bytes, int) or memory_bytes <= 0 \
                or memory_bytes != offer.npages * PAGE_SIZE:
            return RefuseCode.OFFER, (f"memory size {memory_bytes!r} does not match "
                                      f"{offer.npages} pages")
        if not isinstance(vcpus, int) or not 0 < vcpus <= MAX_VCPUS:
            return RefuseCode.OFFER, f"bad vCPU count {vcpus!r}"
        problem = compatibility_problem(cfg)
        return None if problem is None else (RefuseCode.OFFER, problem)

    # -- pages, then the handover -------------------------------------------------------------
    async def _receive(self) -> None:
        stats = self.stats
        while True:
            event = await recv_within(self.ch, self.config.idle_timeout_s,
                                      "pages or the paused VM's state", peer="source",
                                      phase=self.phase.label, idle=True)
            if isinstance(event, PageBatch):
                try:
                    batch = self.decoder.apply(event.data)
                except CodecError as exc:
                    raise RemoteProtocolError(f"bad page batch in round {event.round}: {exc}",
                                              phase="precopy") from exc
                if batch.npages != event.npages:
                    raise RemoteProtocolError(
                        f"page batch announced {event.npages} pages but held {batch.npages}",
                        phase="precopy")
                stats.add_batch(batch)
                self._held[batch.page_indices] = True
                self._round_pages += batch.npages
                if self.progress is not None:
                    self.progress.landed(batch.page_indices)
            elif isinstance(event, RoundStart):
                stats.rounds_received = event.round + 1
                self._round_pages = 0    # a round a break cut short counts no more
            elif isinstance(event, RoundEnd):
                # Batches are applied in order, so the round is complete here;
                # so are the streams' parts (streams.py says why).
                if self._streams is not None:
                    self._round_pages += self._streams.close_round(event.round)
                    self._streams.fold_into(stats)
                if self.progress is not None:
                    self.progress.acked(event.round)
                await self.ch.send(RoundAck(event.round, self._round_pages))
            elif isinstance(event, PageInvalidate):
                await self._invalidate(event)
            elif isinstance(event, Switchover):
                if event.owed_bitmap is not None:
                    await self._handover_postcopy(event)
                else:
                    await self._handover(event)
                return
            elif isinstance(event, Ping):
                # the one other message the pre-copy states allow the source
                await self.ch.send(Pong(event.nonce))

    async def _handover(self, sw: Switchover) -> None:
        cfg, vm = self.config, self.vm
        self.phase = Phase.SWITCHOVER
        actual = self.decoder.hashes.digest()
        if actual != sw.digest:
            # Either the source chose verify="full" and sent a digest of all of
            # its memory, or something differs: rehash all of ours to tell which.
            actual = await asyncio.get_running_loop().run_in_executor(
                None, memory_digest_full, vm.memory)
        if actual != sw.digest:
            bad = "memory digest mismatch"
            await self.ch.send(VerifyFailed(sw.digest, actual, bad))
            raise MigrationError(f"{bad}: source {sw.digest.hex()}, here {actual.hex()}",
                                 phase="switchover")
        try:
            vm.import_state(sw.state)
        except StateFormatError as exc:
            await self.ch.send(VerifyFailed(sw.digest, actual, f"bad VM state: {exc}"))
            raise MigrationError(f"bad VM state from the source: {exc}",
                                 phase="switchover") from exc
        await self._verified_then_commit()
        vm.resume()
        self._guest_resumed = self._handed_over = True
        self._held_digest = sw.digest
        self._completed(vm)
        # The VM runs here now and is the host's, whatever becomes of the
        # connection: Resumed and Complete are courtesies. A source that never
        # gets Resumed keeps its copy paused, in doubt.
        try:
            await self.ch.send(Resumed())
            await within(self.ch.recv(), cfg.ack_timeout_s)
        except (LivemigError, asyncio.TimeoutError, ConnectionError):
            pass

    async def _verified_then_commit(self) -> None:
        """The VM is loaded and checked but paused: say so and wait for the
        source to give it up (Commit). Only then may it run here."""
        await self.ch.send(Verified())
        # The protocol's state allows only Commit (or Abort) now.
        await self._recv(self.config.ack_timeout_s, "the commit of the handover")
        if self.arrival is not None and self.arrival.commit_gate is not None:
            await self.arrival.commit_gate()
        self._outcomes.resuming(self.session_id)   # before the guest may run here

    def _completed(self, vm: VM) -> None:
        """The migration is over and the running VM is the host's."""
        self.stats.total_time_ms = (time.monotonic() - self._t0) * 1e3
        self._set_status("completed")
        if self.arrival is not None and self.arrival.on_resumed is not None:
            self.arrival.on_resumed(vm)

    # -- post-copy -----------------------------------------------------------------------------
    async def _prepare_postcopy(self) -> None:
        """Register guest memory for post-copy, the guest still running at the
        source: pages held stay, every other page is discarded so it faults.
        Size-proportional work (UFFDIO_REGISTER over all memory, discarding
        the pages never received, the post-copy decoder and fault table)
        happens here, outside the stop. Nothing writes memory after this: the
        protocol admits no page batch once invalidation began."""
        vm = self.vm
        if self._populating is not None:
            # MADV_POPULATE_WRITE on a MISSING-registered range would raise
            # userfaults on the executor thread: stop it (it finishes the
            # chunk in hand, a few ms at most) before registering.
            self._populate_stop.set()
            await asyncio.shield(self._populating)
        if self._streams is not None:
            self._streams.close()   # no stream may write memory registered for post-copy
        try:
            self.pm = postcopy.PostcopyMemory(vm.memory, self._held)
        except BackendUnavailable as exc:
            raise MigrationError(f"post-copy refused: {exc}", phase=self.phase.label) from exc
        self.decoder.hashes.values[~self._held] = OWED_PAGE_HASH
        held = self.decoder.hashes       # hashes of what landed before; post-copy adds to them
        self.decoder = BatchDecoder(vm.memory, PostcopyPlacer(self.pm), verify_dup=False)
        self.decoder.hashes = held
        self.faults = self._fault_service()

    async def _invalidate(self, event: PageInvalidate) -> None:
        """Pages the source's guest wrote again: make them absent (owed)."""
        if self.pm is None:
            await self._prepare_postcopy()
        pages = event.pages
        if pages.size and int(pages[-1]) >= self.vm.memory.npages:
            raise RemoteProtocolError(f"PageInvalidate names page {int(pages[-1])} of a "
                                      f"{self.vm.memory.npages}-page memory", phase="precopy")
        idx = pages.astype(np.int64)
        self.pm.invalidate(idx)
        self.decoder.hashes.values[idx] = OWED_PAGE_HASH
        self.stats.invalidation_rounds.append({"round": event.round, "pages": int(idx.size)})
        await self.ch.send(RoundAck(event.round, int(idx.size)))

    async def _handover_postcopy(self, sw: Switchover) -> None:
        """The stop: only work proportional to the last dirty set, plus a few
        passes over per-page arrays (bitmap words, hashes, digest)."""
        vm = self.vm
        self.phase = Phase.SWITCHOVER
        refusal = None
        npages = vm.memory.npages
        if sw.owed_npages != npages:
            refusal = f"owed bitmap covers {sw.owed_npages} pages, memory has {npages}"
            actual = bytes(16)
        else:
            if self.pm is None:
                await self._prepare_postcopy()  # a source that sent no PageInvalidate
            owed_words = np.zeros((npages + 63) // 64, dtype=np.uint64)
            owed_words.view(np.uint8)[:len(sw.owed_bitmap)] = np.frombuffer(sw.owed_bitmap,
                                                                            np.uint8)
            # Owed but held here: the pages written since the last invalidation
            # round. Every other absent page's hash entry is blank already
            # (_prepare_postcopy, _invalidate).
            stale = _pages_of_words(owed_words & self.pm.present_bitmap())
            self.decoder.hashes.values[stale] = OWED_PAGE_HASH
            actual = self.decoder.hashes.digest()
            if actual != sw.digest:
                refusal = "memory digest mismatch over the pages already held"
        if refusal is None:
            self.stats.stop_invalidated_pages = self.pm.invalidate(stale)
            # Now owed ⊆ absent; equal counts make the sets equal.
            nowed = int(np.bitwise_count(owed_words).sum())
            if self.pm.missing != nowed:
                refusal = (f"the source owes {nowed} pages but {self.pm.missing} are "
                           "missing here")
        if refusal is None:
            try:
                vm.import_state(sw.state)
            except StateFormatError as exc:
                refusal = f"bad VM state: {exc}"
        if refusal is not None:
            await self.ch.send(VerifyFailed(sw.digest, actual, refusal[:1000]))
            raise MigrationError(f"post-copy switchover refused: {refusal}", phase="switchover")
        await self._verified_then_commit()
        vm.resume()
        self._guest_resumed = self._handed_over = True
        self.decided.set()
        self.faults.start()
        self.phase = Phase.POSTCOPY
        try:
            await self.ch.send(Resumed())
        except (ConnectionError, ProtocolError):
            pass    # a break like any in post-copy: the service below waits it out
        if self.arrival is not None:
            self.arrival.vm = vm
            self.arrival.owed_pages = lambda: 0 if self.pm is None else self.pm.missing
        self._set_status("postcopy-active")
        await self._run_postcopy()
        self._held_digest = self.decoder.hashes.digest()
        self.faults.stop()
        self.faults.mark("threads_joined")
        self.pm.close()
        self.pm = None
        self.faults.mark("end")
        self._completed(vm)

    def _fault_service(self) -> FaultService:
        """The urgent channel's path is chosen here, from the control channel:
        every channel of a session goes through the same listener, so the
        control channel's TLS (or none) is the urgent channel's too."""
        cfg = self.config
        choice = urgent.choose_path(self.ch, enabled=cfg.native_urgent)
        native = None
        if choice.native:
            native = urgent.NativeFaultServer(self.pm, self.decoder.hashes.values)
        self.stats.fault_path, self.stats.fault_path_reason = choice.name, choice.reason
        tls = self.ch.get_extra_info("ssl_object") is not None
        self.stats.push_path = (native_streams.path_label(self._push_n, tls=tls) if self._push_n else
                                "python: the source's offer asks for no push streams")
        return FaultService(self.pm, self.decoder, self.stats, urgent=native,
                            urgent_cpu=cfg.urgent_cpu, urgent_spin_us=cfg.urgent_spin_us,
                            urgent_rt_priority=cfg.urgent_rt_priority,
                            silence_s=cfg.ack_timeout_s)

    async def _run_postcopy(self) -> None:
        """FaultService over the current channels; on a break, wait for the
        source to reconnect, then go on. Gives up after the recovery timeout.

        The guest runs here already: whatever fails on the channel set (a
        reset, an end of stream, a protocol error, an Abort the source's
        channel sent when it saw ours break) is a break, never a reason to
        stop the guest. A break once every page is here ends post-copy: the
        VM is whole, and a source that missed PostcopyComplete learns the
        outcome (with the landed digest) when it reconnects."""
        resumed = False
        while True:
            try:
                if resumed:
                    await self.faults.report_present(self.ch)
                urgent, bulk = await self._side_channels()
                push = [h for _, h in self._push]
                self._push = [(ch, None) for ch, _ in self._push]   # the service takes the fds
                await self.faults.serve(self.ch, urgent, bulk, resumed=resumed, push=push)
                self.stats.error = None
                return
            except RecoveryExpired:
                raise
            except (ConnectionError, ProtocolError, MigrationError) as exc:
                if self.pm.missing == 0:
                    self.stats.error = None
                    return
                self.stats.error = (f"post-copy connection broken ({exc}); the VM runs here "
                                    f"with {self.pm.missing} pages still owed; waiting up to "
                                    f"{self.config.postcopy_recovery_timeout_s:g} s for the "
                                    "source to reconnect")
                self._set_status("postcopy-active", self.stats.error)
            for ch in (self.ch, *self._side.values()):
                ch.abort()
                self._release(ch)
            self._side.clear()
            self._drop_push()
            self.ch = await self._await_resumed_control()
            self._resumed_control = None
            self.stats.recoveries += 1
            self.stats.error = None     # reconnected: the break note is history
            self._set_status("postcopy-active")
            resumed = True

    async def _side_channels(self) -> tuple[Channel, Channel]:
        timeout_s = self.config.postcopy_recovery_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while not (ChannelKind.URGENT in self._side and ChannelKind.BULK in self._side
                           and len(self._push) >= self._push_n):
                    if self._resumed_control is not None or self.ch.closed:
                        raise RemoteProtocolError("the control channel broke or was replaced "
                                                  "before the page channels came",
                                                  phase="postcopy")
                    self._channel_arrived.clear()
                    await self._channel_arrived.wait()
        except TimeoutError:
            raise self._gave_up() from None
        return self._side[ChannelKind.URGENT], self._side[ChannelKind.BULK]

    async def _await_resumed_control(self) -> Channel:
        try:
            async with asyncio.timeout(self.config.postcopy_recovery_timeout_s):
                while self._resumed_control is None:
                    self._channel_arrived.clear()
                    await self._channel_arrived.wait()
        except TimeoutError:
            raise self._gave_up() from None
        return self._resumed_control

    def _gave_up(self) -> RecoveryExpired:
        missing = self.pm.missing if self.pm is not None else 0
        name = self.arrival.name if self.arrival is not None else "NAME"
        return RecoveryExpired(
            f"the source did not come back within {self.config.postcopy_recovery_timeout_s:g} s "
            f"during post-copy: the VM cannot be completed ({missing} pages never arrived); "
            "it was stopped and its memory freed on this host. If the source daemon still "
            f"runs, it keeps its copy paused at the switchover: `livemig vm resolve {name}` "
            "there resumes it; if the source daemon died, the VM is lost with it",
            phase="postcopy", source_resumed=False)

    async def adopt(self, ch: Channel) -> None:
        """Serve a further channel of this session (urgent, bulk, or a resumed
        control channel); returns when the session is done with it."""
        released = asyncio.Event()
        self._released[ch] = released
        if ch.kind is ChannelKind.CONTROL:
            old, untaken = self.ch, self._resumed_control
            self._resumed_control = ch
            old.abort()    # the old set is dead if the source reopens: stop using it
            for side in self._side.values():
                side.abort()
            for dropped in (old, untaken):    # the newest resumed channel wins
                if dropped is not None and dropped is not ch:
                    dropped.abort()
                    self._release(dropped)
        elif (ch.kind is ChannelKind.BULK and STREAMS in ch.conn.capabilities
              and self._probe_desk.active):
            self._probe_desk.adopt(ch)
        elif ch.kind is ChannelKind.BULK and PUSH in ch.conn.capabilities:
            # Handed off at once, with no await since its Welcome: the source
            # pushes as soon as it read Resumed, maybe before our service runs.
            if len(self._push) >= self._push_n:
                raise RemoteProtocolError(f"more than the {self._push_n} post-copy push "
                                          "streams offered", phase="handshake")
            self._push.append((ch, ch.hand_off()))
        elif ch.kind is ChannelKind.BULK and STREAMS in ch.conn.capabilities:
            if self._streams is None:
                raise RemoteProtocolError("a bulk stream for a migration without streams",
                                          phase="handshake")
            self._streams.adopt(ch)
        else:
            if ch.kind in self._side and not self._side[ch.kind].closed:
                raise RemoteProtocolError(f"a second {ch.kind.name.lower()} channel for the "
                                          "session", phase="handshake")
            self._side[ch.kind] = ch
        self._channel_arrived.set()
        await released.wait()

    @property
    def runs_postcopy(self) -> bool:
        """The guest runs here in post-copy: a resumed control channel continues it."""
        return self._guest_resumed and self.pm is not None and not self.pm.closed

    def supersede(self) -> None:
        """The source reconnected to learn the outcome: drop the old control
        channel, so the session decides now from what it has received (a
        Commit already read is still acted on) instead of at a timeout."""
        self.ch.abort()

    def _drop_push(self) -> None:
        """Close the push streams of a channel set that ended (their sockets
        no thread took, and the channels)."""
        for ch, handoff in self._push:
            if handoff is not None:
                native_streams.close_handed_off(handoff[0])
            ch.abort()
            self._release(ch)
        self._push = []

    def _release(self, ch: Channel) -> None:
        released = self._released.pop(ch, None)
        if released is not None:
            released.set()

    # -- helpers -----------------------------------------------------------------------------------
    async def _recv(self, timeout_s: float | None, what: str):
        return await recv_within(self.ch, timeout_s, what, peer="source", phase=self.phase.label)

    def _set_status(self, status: str, error: str | None = None) -> None:
        self.stats.set_status(status)
        if error:
            self.stats.error = error
        if self.arrival is not None:
            self.arrival.status = status
            self.arrival.error = error
            if self.arrival.on_status is not None:
                self.arrival.on_status()

    def _record_failure(self, exc: BaseException) -> None:
        status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
        self.stats.total_time_ms = (time.monotonic() - self._t0) * 1e3
        text = str(exc) or type(exc).__name__
        if self.arrival is not None and not self._guest_resumed:
            text += ("; the VM was never resumed here and the copy here was discarded: it "
                     "stays with the source (if the source daemon died, it died with it)")
        self._set_status(status, text)

    async def _tell_source(self, exc: LivemigError) -> None:
        if self.ch.closed:
            return
        try:
            await within(self.ch.send(Abort(self.phase, str(exc)[:1000])), 1.0)
        except (LivemigError, asyncio.TimeoutError, ConnectionError):
            pass


def _pages_of_words(words: np.ndarray) -> np.ndarray:
    """Indices of the set bits of uint64 bitmap words (bit i%64 of word i//64),
    in time proportional to the non-zero words."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    return (nz[:, None] * 64 + np.arange(64))[bits.astype(bool)]


class MigrationServer:
    """Listens for incoming migrations and runs each as an IncomingMigration.

    ``on_incoming(name, peer, stats) -> Arrival`` lets the host accept (and
    learn when the VM runs, through ``Arrival.on_resumed``) or refuse (raise a
    LivemigError: the source gets a Refuse with its text).
    """

    def __init__(self, host: str, port: int, *, ssl=None, on_incoming: IncomingHook | None = None,
                 config: MigrationConfig | None = None, budget: MemoryBudget | None = None):
        self.host = host
        self.requested_port = port
        self.ssl = ssl
        self.on_incoming = on_incoming or default_hook
        self.config = config or MigrationConfig()
        self.budget = budget     # None: offers are bounded only by what VM.blank can map
        self.port: int | None = None
        self._server: ChannelServer | None = None
        self.completed: asyncio.Queue = asyncio.Queue()
        self.sessions: dict[bytes, IncomingMigration] = {}
        self.outcomes = OutcomeBook()
        self.probe_slot = ProbeSlot()
        self._stream_tls = None           # the native streams' TLS (server side), under TLS
        self.stream_tls_refusal = ""      # why there is none

    async def start(self) -> None:
        # Under TLS, the native streams speak it in their threads: the same
        # files, loaded into OpenSSL once (None, and why, where they cannot).
        self._stream_tls, self.stream_tls_refusal = stream_tls_context(self.config, self.ssl)
        try:
            self._server = await serve_channels(self.host, self.requested_port, self._serve,
                                                ssl=self.ssl, recv_buffer_bytes=RECV_WINDOW_BYTES,
                                                policy=self._answer_hello,
                                                timeout_s=self.config.handshake_timeout_s,
                                                native_tls=self._stream_tls,
                                                stream_policy=self._answer_tls_stream)
        except BaseException:
            self._close_stream_tls()
            raise
        self.port = self._server.port

    def _close_stream_tls(self) -> None:
        if self._stream_tls is not None:
            self._stream_tls.close()   # sessions made from it keep what they need
            self._stream_tls = None

    def _answer_hello(self, hello: Hello):
        known = hello.session_id in self.sessions
        if hello.channel_kind is ChannelKind.CONTROL and hello.resume and not known \
                and self.outcomes.get(hello.session_id) is None:
            return Refuse(RefuseCode.SESSION, "no migration with this session id is running "
                                              "here, and none ended here recently: this host "
                                              "does not run the VM through it")
        if hello.channel_kind is not ChannelKind.CONTROL and not known:
            return Refuse(RefuseCode.CHANNEL, f"a {hello.channel_kind.name.lower()} channel "
                                              "for an unknown session")
        if hello.channel_kind is ChannelKind.CONTROL and not hello.resume and known:
            return Refuse(RefuseCode.SESSION, "this session id is already in use")
        return self._welcome(hello)

    def _answer_tls_stream(self, ch):
        """A native TLS stream's Hello: as any other, and its certificate must
        be the one its session's control channel presented."""
        answer = self._answer_hello(ch.conn.hello)
        session = self.sessions.get(ch.conn.session_id)
        if isinstance(answer, Welcome) and session is not None:
            problem = stream_peer_problem(session.ch, ch)
            if problem is not None:
                return Refuse(RefuseCode.CHANNEL, problem)
        return answer

    def _welcome(self, hello: Hello):
        """answer_hello, granting native streams where this host runs them,
        from wire version 2 on; under TLS, to a control channel that offers
        "tls-streams" (its streams, the push's too, then come as native TLS
        streams)."""
        tls = self.ssl is not None
        tls_streams = self._stream_tls is not None
        caps = set()
        if streams_offered(self.config, tls=tls, tls_streams=tls_streams):
            caps |= {STREAMS, PUSH} | ({TLS_STREAMS} if tls else set())
        if stream_probe_offered(self.config, tls=tls, tls_streams=tls_streams):
            caps.add(STREAM_PROBE)
        if (tls and hello.channel_kind is ChannelKind.CONTROL
                and TLS_STREAMS not in hello.capabilities):
            caps -= {STREAMS, PUSH, STREAM_PROBE}   # its streams would not speak TLS
        answer = answer_hello(hello, capabilities=caps | resume.granted(self.config))
        if isinstance(answer, Welcome) and answer.version < spec.STREAMS_VERSION:
            answer = dataclasses.replace(answer, capabilities=answer.capabilities
                                         - {STREAMS, PUSH, STREAM_PROBE, TLS_STREAMS})
        return answer

    async def _serve(self, ch: Channel) -> None:
        existing = self.sessions.get(ch.conn.session_id)
        if ch.kind is ChannelKind.CONTROL and ch.conn.hello.resume:
            if existing is not None and resume.waits(existing):
                await existing.adopt(ch)    # pre-copy rounds go on where they broke
                return
            await self._tell_outcome(ch, existing)
            return
        if ch.kind is not ChannelKind.CONTROL:
            if existing is None:
                raise RemoteProtocolError(f"a {ch.kind.name.lower()} channel for an unknown "
                                          "session", phase="handshake")
            await existing.adopt(ch)
            return
        incoming = IncomingMigration(ch, self.on_incoming, self.config, self.sessions,
                                     self.outcomes, self.budget, self.probe_slot)
        vm = await incoming.run()
        if vm is not None:
            await self.completed.put((incoming.arrival, vm))

    async def _tell_outcome(self, ch: Channel, session: IncomingMigration | None) -> None:
        """A source asks what became of its session: a post-copy session
        running here takes the channel up; else (or if it ended first, every
        page landed) the session decides and its record answers."""
        if session is not None:
            session.supersede()
            await session.decided.wait()
            if session.runs_postcopy:
                # A Commit it had already read resumed the guest: go on.
                await session.adopt(ch)
                if session._resumed_control is not ch:
                    return      # taken up (or replaced by a later one)
            await session.ended.wait()
        record = self.outcomes.get(ch.conn.session_id)
        if record is None:
            # Expired between the Hello and now: closing says "ask again",
            # and the next Hello is refused as unknown.
            return
        await ch.send(Outcome(record.code, record.digest, record.reason))

    @property
    def errors(self) -> list:
        return self._server.errors if self._server else []

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None
        self._close_stream_tls()

    async def __aenter__(self) -> "MigrationServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

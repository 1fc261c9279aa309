"""The source side of a migration: rounds of dirty pages, then the handover.

Theory of operation (pre-copy)
------------------------------
::

    connect ─ Hello/Welcome ─ MigrationOffer/Accept ─ arm tracker
    round 0: every page          ┐  while the guest runs; each round ends when
    round k: pages collected     ┘  the destination acks it applied; then the
                                    policy (a pure function of round stats)
                                    says CONTINUE, THROTTLE, SWITCHOVER or GIVE_UP
    pause vCPUs ─ collect ─ last round (frozen) ─ Switchover(state, digest)
    ◀ Verified ─ Commit ─▶ ◀ Resumed ─ Complete ─▶ free the VM

Ordering that makes it correct:

* The tracker is armed *before* round 0 reads memory, so a write racing with
  the read of a page is reported by the next collect and the page is sent
  again. Every collect re-arms atomically (see tracking.py), so no write is
  lost between rounds.
* The final collect happens after every vCPU is parked: nothing writes any
  more, so the last round plus the earlier rounds is exactly memory. The
  encoder is told the round is ``frozen`` so it may refer to pages it sends
  (DUP) and snapshot them for the digest.
* The digest is the hash of the per-page hashes of what was sent
  (codec.PageHashes); the destination computes the same over what landed. A
  ``verify="full"`` config also rehashes all memory on both sides.
* Until ``Commit`` is sent, any failure — the peer vanishing, a refusal, a
  digest mismatch, a timeout, a cancellation — stops the tracker, lifts the
  throttle and resumes the guest here, and raises MigrationError saying so.
  After ``Commit`` the source never resumes on its own: a break (no
  ``Resumed``, a reset, an Abort) is a reason to reconnect with the same
  session id and learn the outcome (handover.py): committed there → release
  the VM; never committed → resume it here; unreachable for the whole window
  (``ack_timeout_s``) → HandoverInDoubt, VM kept paused, resolvable later.
  A break *during the rounds* (capability "resume-precopy"), the final one
  included (VM kept paused meanwhile), is resumed on either data path (resume.py).

Downtime is measured here, from the moment the vCPUs are paused to the moment
``Resumed`` arrives: it includes one network round trip, so it is an upper
bound on the guest's real stop.

Post-copy and hybrid
--------------------
::

    open urgent + bulk channels (before anything is paused)
    postcopy: round 0 = the zero pages only    hybrid: rounds until the policy
                                                says POSTCOPY (or on request)
    PageInvalidate(written since sent) ◀ RoundAck   while the sets shrink; the
                                                guest still runs (see _invalidate)
    pause ─ collect ─ Switchover(postcopy, owed bitmap, digest of pages sent)
    ◀ Verified ─ Commit ─▶ ◀ Resumed      (downtime = pause → Resumed)
    PostcopySender (pagepusher.py): requests first, pushes the rest
    ◀ PostcopyComplete(digest) ─ equal to ours? ─ Complete ─▶ free the VM

Owed pages are those never sent, those invalidated, and those dirtied since
(the final collect, the only set the destination discards inside the stop). The Switchover digest covers the pages the destination holds;
the owed pages' entries in the hash array still hold what was sent before
(or the zero hash), identically on both sides. After Commit the VM stays
paused here and is released only after Complete. If a channel breaks during
post-copy — or between Commit and Resumed — the session reconnects with
backoff (Hello(resume=True), same session id) for up to
``postcopy_recovery_timeout_s``; ``MigrationControl.recover_now()`` cuts the
current wait short. Whatever breaks (reset, end of stream, an Abort the
destination's channel sent when it saw ours break) is such a break; only our
own digest check failing ends post-copy here. Giving up raises
HandoverInDoubt: the destination runs the guest, but pages it still lacks
exist only here, so the VM is kept paused.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Callable

import numpy as np

from ...aio.channel import Channel, open_channel, recv_within
from ...aio.tlsstream import open_tls_stream
from ...aio.deadline import within
from ...aio.ratelimit import TokenBucket
from ...codec.encoder import BatchEncoder
from ...config import MigrationConfig
from ...codec.digest import OWED_PAGE_HASH, memory_digest_full
from ...native import PAGE_SIZE
from ...errors import (HandoverInDoubt, HandshakeRefused, LivemigError, MigrationCancelled,
                       MigrationError, ProtocolError, RemoteProtocolError, in_doubt_text,
                       reword_as_failure, stopped_after_commit_text)
from ...codec.kernels import zero_scan
from ...native import urgent
from . import handover
from .handover import describe as _describe
from .postcopy import DigestMismatch, PostcopySender
from .resume import PrecopyResumer, is_break, offered
from .streams import (PUSH, STREAMS, DataPath, SourceStreams, StreamTls,
                      capabilities as stream_capabilities, choose as choose_data_path,
                      push_refusal, refusal as streams_refusal)
from ...policy import Action, RoundStats, decide
from ...protocol import (Abort, ChannelKind, Commit, Complete, MigrationOffer, Mode,
                       PageBatch, PageInvalidate, Phase, Refuse, RoundEnd,
                       RoundStart, Switchover, VerifyFailed)
from ...stats import MigrationStats, RoundRecord
from ...native.tracking import open_tracker
from ...vm.isa import ISA_REVISION, VCPU_FEATURES
from .control import MigrationControl
from ...vm.machine import VM

StatsCallback = Callable[[MigrationStats], None]
_MODES = {"precopy": Mode.PRECOPY, "postcopy": Mode.POSTCOPY, "hybrid": Mode.HYBRID}


RECOVERY_BACKOFF_S = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# How often progress is published in the middle of a round: round 0 of a
# large guest takes seconds, and an operator should see it move.
PROGRESS_INTERVAL_S = 0.25
# Invalidation rounds (before the post-copy pause) stop once the set left for
# the stop is this small, or stops shrinking, or after this many rounds.
INVALIDATE_DONE_PAGES = 256
INVALIDATE_MAX_ROUNDS = 12


async def migrate(vm: VM, host: str, port: int, *, config: MigrationConfig | None = None,
                  ssl=None, server_hostname: str | None = None, name: str = "vm",
                  tracker: str = "auto", on_stats: StatsCallback | None = None,
                  control: MigrationControl | None = None,
                  origin: str | None = None) -> MigrationStats:
    """Move the running ``vm`` to the destination at ``host:port``.

    ``origin`` names this host to the destination (a daemon gives its own
    migration address), so its records say where the VM came from rather
    than the connection's ephemeral port.

    Returns the stats of a completed migration, after which ``vm`` is paused
    and released: the caller should close it. Raises MigrationError (VM
    resumed here) or HandoverInDoubt (VM kept paused here).
    """
    config = config or MigrationConfig()
    session = SourceSession(vm, config, name=name, tracker=tracker, on_stats=on_stats,
                            control=control, origin=origin)
    return await session.run(host, port, ssl=ssl, server_hostname=server_hostname)


class SourceSession:
    def __init__(self, vm: VM, config: MigrationConfig, *, name: str, tracker: str,
                 on_stats: StatsCallback | None, control: MigrationControl | None = None,
                 origin: str | None = None):
        self.vm = vm
        self.config = config
        self.name = name
        self.tracker_name = tracker
        self.on_stats = on_stats or (lambda stats: None)
        self.stats = MigrationStats(mode=config.mode, memory_bytes=vm.memory.length_bytes,
                                    remaining_bytes=vm.memory.length_bytes)
        self.phase = Phase.HANDSHAKE
        self._committed = False
        self._t0 = time.monotonic()
        self._tracker = None
        self._ch: Channel | None = None
        self._pending = np.empty(0, dtype=np.uint64)
        self.control = control or MigrationControl()
        self._sent = np.zeros(vm.memory.npages, dtype=bool)
        self._resumer, self._round_progress = None, (0, 0)   # (pages, bytes) of this round
        self._urgent: Channel | None = None
        self._urgent_handoff: tuple | None = None   # the urgent socket, for the native thread
        self._bulk: Channel | None = None
        self._data_path: DataPath | None = None      # chosen after the control handshake
        self._streams: SourceStreams | None = None   # pre-copy pages on native threads
        self._stream_channels: list[Channel] = []
        self._push_path: DataPath | None = None      # post-copy push: native streams or not
        self._push_channels: list[Channel] = []      # its streams, of the current channel set
        self._stream_tls: StreamTls | None = None    # the streams' TLS, under a TLS migration
        self._tls_streams_opened = 0
        self._session_id = os.urandom(16)
        self.control.session_id = self._session_id
        self.origin = origin
        self._connect_args: dict = {}
        self._abandoned: str | None = None   # the destination stopped the VM after Commit

    # -- the whole migration ----------------------------------------------------------------
    async def run(self, host: str, port: int, *, ssl, server_hostname) -> MigrationStats:
        cfg = self.config
        limiter = (TokenBucket.for_rate(cfg.max_bandwidth_bps, max_frame_bytes=cfg.batch_bytes)
                   if cfg.max_bandwidth_bps else None)
        self._connect_args = dict(host=host, port=port, ssl=ssl,
                                  server_hostname=server_hostname or host,
                                  timeout_s=cfg.handshake_timeout_s)
        self.control._batch_bytes = cfg.batch_bytes
        self.control.limiter = limiter
        self.control._interruptible = asyncio.current_task()
        try:
            refused = streams_refusal(cfg, tls=ssl)
            push_refused = push_refusal(cfg, tls=ssl)
            caps = offered(cfg) | stream_capabilities(refused, push_refused, tls=ssl is not None)
            self._ch = self.control._capped(
                await self._open(ChannelKind.CONTROL, rate_limiter=limiter, capabilities=caps))
            self._data_path = choose_data_path(cfg, self._ch, refused, tls=ssl is not None)
            self._push_path = choose_data_path(cfg, self._ch, push_refused, capability=PUSH,
                                               tls=ssl is not None)
            if self._data_path.tls or self._push_path.tls:
                self._stream_tls = StreamTls(ssl, self._ch)
            self.stats.data_path = self._data_path.label
            self._resumer = PrecopyResumer.agreed(self, RECOVERY_BACKOFF_S, limiter)
            await self._offer()
            if cfg.mode != "precopy":
                await self._open_postcopy_channels(resume=False)
            self._tracker = open_tracker(self.vm.memory, self.tracker_name)
            self.stats.tracker = self._tracker.name
            then = await self._precopy()
            # The VM may pause from here on: a cancel no longer interrupts.
            self.control._interruptible = None
            if then == "postcopy":
                await self._invalidate()
                await self._postcopy(await self._switchover_postcopy())
            else:
                try:
                    await self._switchover()
                finally:
                    if self.control.stop_slot is not None:
                        self.control.stop_slot.give_back(self)
            return self.stats
        except BaseException as exc:
            self.control._interruptible = None
            if isinstance(exc, asyncio.CancelledError) and self.control._interrupted:
                asyncio.current_task().uncancel()      # ours: a requested cancel, not a shutdown
                exc = MigrationCancelled("cancelled by request before the switchover; the VM "
                                         "runs on at the source", phase=self.phase.label)
            await self._fail(exc)
            raise self._as_migration_error(exc) from exc
        finally:
            if self._tracker is not None:
                self._tracker.close()
            self._drop_urgent_handoff()
            if getattr(self, "_sender", None) is not None:
                self._sender.close()
            if self._streams is not None:
                self._streams.close()   # threads joined before memory can go
            for ch in (*self._stream_channels, *self._push_channels, self._urgent, self._bulk,
                       self._ch):
                if ch is not None:
                    await ch.close()
            if self._stream_tls is not None:
                self._stream_tls.close()

    async def _open(self, kind: ChannelKind, *, resume: bool = False, rate_limiter=None,
                    capabilities=()) -> Channel:
        a = self._connect_args
        return await open_channel(a["host"], a["port"], kind=kind, session_id=self._session_id,
                                  ssl=a["ssl"], server_hostname=a["server_hostname"],
                                  rate_limiter=rate_limiter, resume=resume,
                                  capabilities=frozenset(capabilities),
                                  timeout_s=a["timeout_s"])

    async def _open_stream(self, *, capabilities, resume: bool = False):
        """A bulk stream for a native thread: a channel, or under TLS a
        native TLS stream to the same port (aio/tlsstream.py)."""
        if self._stream_tls is None:
            return await self._open(ChannelKind.BULK, capabilities=capabilities, resume=resume)
        a = self._connect_args
        self._tls_streams_opened += 1
        k = self._tls_streams_opened
        return await open_tls_stream(a["host"], a["port"], tls=self._stream_tls.context,
                                     peer_cert=self._stream_tls.peer_cert, kind=ChannelKind.BULK,
                                     session_id=self._session_id,
                                     capabilities=frozenset(capabilities), resume=resume,
                                     timeout_s=a["timeout_s"],
                                     what=f"{'push' if PUSH in capabilities else 'bulk'} stream "
                                          f"{k} (TLS)")

    async def _open_postcopy_channels(self, *, resume: bool) -> None:
        self._urgent = await self._open(ChannelKind.URGENT, resume=resume)
        self._drop_urgent_handoff()
        # Hand the socket off now, before the destination can send on it
        # (it sends nothing before the bulk channel, opened next, arrives);
        # the thread starts only in post-copy, with the memory frozen.
        choice = urgent.choose_path(self._urgent, enabled=self.config.native_urgent)
        self.stats.fault_path, self.stats.fault_path_reason = choice.name, choice.reason
        if choice.native:
            self._urgent_handoff = self._urgent.hand_off()
        self._bulk = self.control._capped(await self._open(
            ChannelKind.BULK, resume=resume, rate_limiter=self.control.limiter))
        # The push streams: handed to their threads only in post-copy (the
        # destination sends nothing on them unasked).
        self._push_channels = []
        for _ in range(self._push_path.nstreams):
            self._push_channels.append(await self._open_stream(resume=resume,
                                                               capabilities={PUSH}))

    def _drop_urgent_handoff(self) -> None:
        """Close a handed-off urgent socket no thread took (failure, recovery)."""
        if self._urgent_handoff is not None:
            os.close(self._urgent_handoff[0])
            self._urgent_handoff = None

    async def _offer(self) -> None:
        vm = self.vm
        offer = MigrationOffer(
            config={"name": self.name, "memory_bytes": vm.memory.length_bytes,
                    "vcpus": vm.nvcpus, "workload": vm.workload,
                    "isa_revision": ISA_REVISION, "features": sorted(VCPU_FEATURES),
                    **({"origin": self.origin} if self.origin else {}),
                    **({"streams": self._data_path.nstreams} if self._data_path.native else {}),
                    **({"push_streams": self._push_path.nstreams}
                       if self._push_path.native else {})},
            mode=_MODES[self.config.mode], npages=vm.memory.npages)
        await self._ch.send(offer)
        answer = await self._recv(self.config.handshake_timeout_s, "an answer to the offer")
        if isinstance(answer, Refuse):
            raise HandshakeRefused(answer.code, answer.reason, phase="handshake",
                                   channel=self._ch.name)

    # -- pre-copy rounds ----------------------------------------------------------------------
    async def _precopy(self) -> str:
        """Rounds until the policy says so; returns "switchover" or "postcopy"."""
        cfg, vm, stats = self.config, self.vm, self.stats
        self.phase = Phase.PRECOPY
        self._encoder = BatchEncoder(vm.memory, cfg.codec_for_mode, clock=time.perf_counter)
        if self._data_path.native:
            await self._open_streams()
        self._tracker.start()
        stats.setup_time_ms = self._elapsed_ms()
        stats.set_status("active")
        self._publish()
        pages = np.arange(vm.memory.npages, dtype=np.uint64)
        if cfg.mode == "postcopy":
            # Zero pages cost a run-table entry each: send them now, so the
            # guest never faults on them; everything else is owed.
            pages = (np.flatnonzero(zero_scan(vm.memory.pages)).astype(np.uint64)
                     if cfg.postcopy_zero_round else pages[:0])
        rounds: list[RoundStats] = []
        throttle_pct = 0.0
        while True:
            index = len(stats.rounds)    # wire number: counts rounds a break cut short
            t_round = time.monotonic()
            resent = await self._resumable_round(index, pages)
            if resent is not None:    # cut short by a break: next, what the peer lacks
                stats.add_round(RoundRecord(index, time.monotonic() - t_round,
                                            *self._round_progress, len(pages := resent)))
                continue
            sent_pages, sent_bytes = self._round_progress
            pages = self._tracker.collect()
            self._check_cancel()
            duration_s = max(time.monotonic() - t_round, 1e-6)
            rounds.append(RoundStats(index, duration_s, sent_pages, sent_bytes, len(pages),
                                     zero_pages=self._round_zero_pages))
            stats.add_round(RoundRecord(index, duration_s, sent_pages, sent_bytes, len(pages),
                                        throttle_pct=throttle_pct))
            requested = self.control.postcopy_requested
            decision = decide(cfg, rounds, elapsed_s=time.monotonic() - self._t0,
                              throttle_pct=throttle_pct, postcopy_requested=requested)
            stats.add_decision(decision)
            if math.isfinite(decision.bandwidth_bps) and decision.bandwidth_bps > 0:
                self._encoder.link_bytes_per_s = decision.bandwidth_bps
            self.stats.remaining_bytes = len(pages) * PAGE_SIZE
            self._publish()
            self._pending = pages  # dirtied during the last round: owed in the final one
            if requested and cfg.mode == "precopy" and decision.action is not Action.SWITCHOVER:
                await self._open_postcopy_channels(resume=False)
                return handover.POSTCOPY
            if decision.action is Action.SWITCHOVER:
                slot = self.control.stop_slot
                if slot is not None and not slot.try_take(self):
                    continue    # another migration of this host is stopping: one more round
                stats.converged = True
                return "switchover"
            if decision.action is Action.POSTCOPY:
                return handover.POSTCOPY
            if decision.action is Action.GIVE_UP:
                raise MigrationError(f"pre-copy did not converge: {decision.reason}",
                                     phase="precopy")
            if decision.action is Action.THROTTLE:
                throttle_pct = decision.throttle_pct
                vm.set_throttle(int(math.ceil(throttle_pct)))
            elif decision.action is not Action.CONTINUE:
                raise MigrationError(f"policy asked for {decision.action.name}, which pre-copy "
                                     "cannot do", phase="precopy")

    async def _resumable_round(self, index: int, pages: np.ndarray, *, frozen: bool = False
                               ) -> np.ndarray | None:
        """One round (figures in ``_round_progress``); None, or after a break
        with resumable pre-copy agreed, the pages to send next (resume.py)."""
        resumer, stats = self._resumer, self.stats
        self._round_progress = (0, 0)
        if resumer is not None:
            resumer.rounds.start(index, pages)   # all of them: unsent ones have not landed
        sent_before = (stats.pages_sent, stats.bytes_sent)
        try:
            self._round_progress = await self._send_round(index, pages, frozen=frozen)
        except BaseException as exc:
            if resumer is None or not is_break(exc):
                raise
            resent = await resumer.resume(self, exc, index, paused=frozen)
            # What the cut round sent before the break (the stream threads'
            # counters were folded in when they were joined).
            self._round_progress = (stats.pages_sent - sent_before[0],
                                    stats.bytes_sent - sent_before[1])
            return resent
        if resumer is not None:
            resumer.rounds.acked(index)
        return None

    async def _open_streams(self) -> None:
        """The native bulk streams (anew after a resumed break), under the current cap."""
        self._streams, self._stream_channels = await SourceStreams.open(
            self.vm.memory, self._encoder.sent_hashes.values, self._encoder.fingerprints,
            self._data_path.nstreams, lambda: self._open_stream(capabilities={STREAMS}),
            codec=self.config.codec_for_mode)
        self.control._paced(self._streams)

    async def _drop_streams(self) -> None:
        """Join the stream threads (what they sent counted), close their channels."""
        streams, channels = self._streams, self._stream_channels
        self._streams, self._stream_channels = None, []
        if streams is not None:
            streams.fold_into(self.stats)
            streams.close()
        for ch in channels:
            ch.abort()
            await ch.close()

    async def _send_round(self, index: int, pages: np.ndarray, *, frozen: bool) -> tuple[int, int]:
        ch = self._ch
        await ch.send(RoundStart(index))
        self._sent[pages.astype(np.int64)] = True
        if self._streams is not None:
            if not frozen:
                await self._let_pass()
            # The threads copy each page before checksumming it, frozen or not.
            sent = await self._streams.send_round(index, pages, self.config.switchover_timeout_s,
                                                  self._encoder.link_bytes_per_s,
                                                  on_progress=self._stream_progress(pages),
                                                  progress_interval_s=PROGRESS_INTERVAL_S)
            self._streams.fold_into(self.stats)
            npages, nbytes, self._round_zero_pages = sent.pages, sent.bytes, sent.zero_pages
        else:
            npages, nbytes = await self._send_batches(index, pages, frozen=frozen)
        await ch.send(RoundEnd(index, npages, nbytes))
        ack = await self._recv(self.config.switchover_timeout_s, f"the ack of round {index}")
        if ack.round != index or ack.pages != npages:
            raise RemoteProtocolError(f"round {index} ({npages} pages) acked as round "
                                      f"{ack.round} with {ack.pages} pages",
                                      phase=self.phase.label)
        return npages, nbytes

    async def _send_batches(self, index: int, pages: np.ndarray, *, frozen: bool
                            ) -> tuple[int, int]:
        """The Python path: encode the round's pages and send them on the control channel."""
        stats = self.stats
        npages = nbytes = 0
        self._round_zero_pages = 0
        published_at = time.monotonic()
        for batch in self._encoder.encode(pages, self.config.batch_bytes, frozen=frozen):
            # Pages of a running guest come out of the encoder as staging
            # copies (codec.py), so a frame's checksum matches its bytes.
            self._round_zero_pages += batch.pages_by_encoding.get("zero", 0)
            if not frozen:
                await self._let_pass()
            await self._ch.send(PageBatch(index, batch.npages, batch.chunks))
            npages += batch.npages
            nbytes += batch.nbytes
            self._round_progress = (npages, nbytes)
            stats.add_batch(batch)
            stats.remaining_bytes = max(0, (len(pages) - npages)) * PAGE_SIZE
            if not frozen:
                self._check_cancel()
                if time.monotonic() - published_at >= PROGRESS_INTERVAL_S:
                    published_at = time.monotonic()
                    self._publish()
                    # send() does not suspend while the socket takes data, and
                    # on a fast link it always does: without this yield a long
                    # round starves the daemon's other work (status, cancel).
                    await asyncio.sleep(0)
        return npages, nbytes

    # -- switchover and handover ----------------------------------------------------------------
    async def _switchover(self) -> None:
        cfg, vm, stats = self.config, self.vm, self.stats
        self.phase = Phase.SWITCHOVER
        t_pause = time.perf_counter()
        vm.pause()
        pages, t_round = self._final_dirty(), t_pause
        while True:    # a break resumes with the VM paused here (resume.py), or fails
            index = len(stats.rounds)
            resent = await self._resumable_round(index, pages, frozen=True)
            stats.add_round(RoundRecord(index, time.perf_counter() - t_round,
                                        *self._round_progress, 0, stats.throttle_pct))
            if resent is None:
                break
            pages, t_round = resent, time.perf_counter()
        digest = self._encoder.sent_hashes.digest()
        if cfg.verify == "full":
            digest = await asyncio.get_running_loop().run_in_executor(
                None, memory_digest_full, vm.memory)
        broken = await self._hand_over(Switchover(vm.export_state(), digest), t_pause,
                                       refused="the destination's memory digest differs from ours")
        if broken is None:
            try:
                await self._ch.send(Complete())
            except (LivemigError, ConnectionError):
                pass   # Resumed came: the VM is the destination's; Complete is a courtesy
        else:
            await self._learn_precopy(broken, digest, t_pause)
        stats.total_time_ms = self._elapsed_ms()
        stats.remaining_bytes = 0
        stats.set_status("completed")
        self._publish()

    async def _hand_over(self, switchover: Switchover, t_pause: float, *,
                         refused: str) -> BaseException | None:
        """Switchover ─▶ ◀ Verified ─ Commit ─▶ ◀ Resumed. Until Commit is sent a
        failure resumes the VM here; after it, never (docs/architecture.md):
        whatever went wrong instead of Resumed is returned, for the caller
        to learn the outcome by reconnecting."""
        cfg = self.config
        await self._ch.send(switchover)
        verdict = await self._recv(cfg.switchover_timeout_s, "the destination's verdict")
        if isinstance(verdict, VerifyFailed):
            raise MigrationError(f"{refused}: {verdict.reason} (digest here "
                                 f"{verdict.expected.hex()}, there {verdict.actual.hex()})",
                                 phase="switchover")
        # Past this line the VM belongs to the destination: never resume it here.
        self._committed = True
        try:
            await self._ch.send(Commit())
            await self._recv(cfg.ack_timeout_s, "its confirmation that the VM runs there")
        except (LivemigError, ConnectionError, OSError) as exc:
            return exc
        self.stats.downtime_ms = (time.perf_counter() - t_pause) * 1e3
        self._tracker.stop()
        return None

    async def _learn_precopy(self, broken: BaseException, digest: bytes, t_pause: float) -> None:
        """The link broke after Commit in pre-copy: reconnect and ask. Returns
        when the destination runs the VM; raises otherwise (see _settle)."""
        stats = self.stats
        stats.error = (f"the link broke after Commit ({_describe(broken)}); reconnecting to "
                       "learn whether the destination resumed the VM (kept paused here)")
        self._publish()
        await self._close_channels()
        learned = await self._learn(self.config.ack_timeout_s)
        self._settle(learned, broken, digest)
        # An upper bound: the guest resumed there some time before we learned it.
        stats.downtime_ms = (time.perf_counter() - t_pause) * 1e3
        stats.recoveries += 1
        stats.error = None

    async def _learn(self, window_s: float) -> handover.Learned:
        return await handover.learn(
            lambda: self._open(ChannelKind.CONTROL, resume=True), npages=self.vm.memory.npages,
            window_s=window_s, timeout_s=self.config.handshake_timeout_s,
            backoff_s=RECOVERY_BACKOFF_S, wake=self.control._recover,
            arbiter=getattr(self.control, "arbiter", None))

    def _settle(self, learned: handover.Learned, broken: BaseException, digest: bytes) -> None:
        """Act on an outcome learned after a break past Commit: return if the
        destination runs the VM (and holds what we sent), raise otherwise."""
        phase = self.phase.label
        if learned.kind == handover.COMMITTED:
            if learned.digest != digest:
                raise RemoteProtocolError(
                    f"the destination reports it runs the VM, but with memory digest "
                    f"{learned.digest.hex()} where we sent {digest.hex()}", phase=phase)
            if self._tracker.armed:
                self._tracker.stop()
            return
        if learned.kind == handover.NOT_COMMITTED:
            # The destination never resumed it and has thrown its copy away:
            # the VM is ours again, and _fail resumes it.
            self._committed = False
            raise MigrationError(
                f"the link broke after Commit ({_describe(broken)}); on reconnecting, the "
                "destination reported that Commit never reached it and that it discarded its "
                "copy without running it", phase="switchover", source_resumed=True)
        if learned.kind == handover.RECLAIMED:
            self._committed = False
            raise MigrationError(f"the link broke after Commit ({_describe(broken)}); "
                                 f"{learned.reason}", phase="switchover", source_resumed=True)
        if learned.kind == handover.ABANDONED:
            self._abandoned = learned.reason
            raise MigrationError(f"the destination stopped the VM: {learned.reason}",
                                 phase=phase, source_resumed=False)
        what = {handover.UNKNOWN: "the destination has no record of this session (it restarted, "
                           "or the record expired)",
                handover.UNREACHABLE: "the destination could not be asked",
                handover.POSTCOPY: "the destination reports a post-copy session"}[learned.kind]
        raise MigrationError(f"the link broke after Commit ({_describe(broken)}) and {what}: "
                             f"{learned.reason}", phase=phase, source_resumed=False)

    async def _close_channels(self) -> None:
        for ch in (self._urgent, self._bulk, *self._push_channels, self._ch):
            if ch is not None:
                ch.abort()
                await ch.close()
        self._urgent = self._bulk = None
        self._push_channels = []

    # -- post-copy ----------------------------------------------------------------------------------
    def _make_owed(self, pages: np.ndarray) -> np.ndarray:
        """Mark ``pages`` owed (those not owed yet); returns the newly owed ones.
        An owed page's hash entry may hold the hash of a copy taken while the
        guest wrote it (not exact): both sides blank owed entries."""
        idx = pages.astype(np.int64, copy=False)
        idx = idx[~self._owed[idx]]
        self._owed[idx] = True
        self._encoder.forget(idx)
        self._encoder.sent_hashes.values[idx] = OWED_PAGE_HASH
        return idx

    async def _invalidate(self) -> None:
        """Invalidation rounds, the guest still running here (docs/postcopy.md).

        Owed so far: pages never sent. Each round names the pages written
        since they were sent (and not owed yet); the destination registers
        for post-copy on the first one, discards them and acks. A round only
        carries indices and the destination's discard is fast, so rounds get
        shorter and the sets smaller, at any dirty rate; what is left when
        they stop shrinking is all the stop has to discard."""
        stats = self.stats
        # No page content is encoded from here on: free the delta cache and
        # block fingerprints now, not inside the stop (unmapping them costs
        # milliseconds).
        self._encoder.set_postcopy()
        self._owed = ~self._sent
        self._encoder.sent_hashes.values[self._owed] = OWED_PAGE_HASH
        pages = self._pending
        index = len(stats.rounds)
        for n in range(INVALIDATE_MAX_ROUNDS):
            t_round = time.monotonic()
            new = self._make_owed(pages)
            await self._ch.send(PageInvalidate(index, new.astype(np.uint64)))
            ack = await self._recv(self.config.switchover_timeout_s,
                                   f"the ack of invalidation round {index}")
            if ack.round != index or ack.pages != new.size:
                raise RemoteProtocolError(f"invalidation round {index} ({new.size} pages) acked "
                                          f"as round {ack.round} with {ack.pages} pages",
                                          phase=self.phase.label)
            pages = self._tracker.collect()
            pages = pages[~self._owed[pages.astype(np.int64)]]
            stats.invalidation_rounds.append(
                {"round": index, "pages": int(new.size),
                 "ms": (time.monotonic() - t_round) * 1e3, "left": int(pages.size)})
            index += 1
            if pages.size <= INVALIDATE_DONE_PAGES or (n >= 1 and pages.size >= new.size):
                break
        self._pending = pages  # written since: owed, discarded in the stop
        self._publish()

    async def _switchover_postcopy(self) -> BaseException | None:
        cfg, vm, stats = self.config, self.vm, self.stats
        self.phase = Phase.SWITCHOVER
        t_pause = time.perf_counter()
        vm.pause()
        last = self._make_owed(self._final_dirty())
        stats.stop_invalidated_pages = int(last.size)
        owed = self._owed
        self._encoder.set_postcopy()
        digest = self._encoder.sent_hashes.digest()
        bitmap = np.packbits(owed, bitorder="little").tobytes()
        broken = await self._hand_over(Switchover(vm.export_state(), digest, owed.size, bitmap),
                                       t_pause, refused="the destination refused post-copy")
        stats.remaining_bytes = int(np.count_nonzero(owed)) * PAGE_SIZE
        stats.postcopy_started_ms = self._elapsed_ms()
        stats.push_path = self._push_path.label
        stats.set_status("postcopy-active")
        self._sender = PostcopySender(self._encoder, owed, stats, round_index=len(stats.rounds),
                                      batch_bytes=cfg.batch_bytes)
        self._publish()
        return broken

    def _final_dirty(self) -> np.ndarray:
        """With every vCPU parked: the pages dirtied since they were last sent.

        The tracker stays armed until the destination resumed: disarming
        (unregistering userfaultfd over all memory) costs milliseconds per
        GiB, and the paused guest writes nothing meanwhile. A bool mask
        instead of np.union1d: the first union1d call in a process costs
        ~13 ms (numpy loads it lazily), all of it inside the downtime."""
        dirty = np.zeros(self.vm.memory.npages, dtype=bool)
        dirty[self._pending.astype(np.int64)] = True
        dirty[self._tracker.collect().astype(np.int64)] = True
        return np.flatnonzero(dirty)

    async def _postcopy(self, broken: BaseException | None) -> None:
        """Serve the destination until PostcopyComplete, reconnecting on breaks
        (``broken``: the handover itself broke after Commit)."""
        stats = self.stats
        self.phase = Phase.POSTCOPY
        t0 = time.monotonic()
        while True:
            if broken is not None:
                stats.error = (f"post-copy connection broken ({_describe(broken)}); "
                               "reconnecting to the destination (VM paused here)")
                self._publish()
                if await self._recover(broken) == handover.COMMITTED:
                    break
                stats.error = None      # reconnected: the break note is history
                self._publish()
            push = None
            try:
                handoff, self._urgent_handoff = self._urgent_handoff, None
                if self._push_channels:
                    push = SourceStreams.push(self.vm.memory, self._encoder.sent_hashes.values,
                                              self._push_channels)
                    self.control._paced(push)
                await self._sender.serve(self._ch, self._urgent, self._bulk,
                                         urgent_fd=handoff, cpu=self.config.urgent_cpu,
                                         spin_us=self.config.urgent_spin_us,
                                         rt_priority=self.config.urgent_rt_priority,
                                         silence_s=self.config.ack_timeout_s, push=push)
                break
            except DigestMismatch:
                raise
            except (ConnectionError, ProtocolError, MigrationError, OSError) as exc:
                broken = exc
            finally:
                if push is not None:
                    push.detach()    # threads joined before the channels close
                    self._sender.fold_push(push)
                    push.close()
        self._sender.mark("served")
        if self._tracker.armed:
            self._tracker.stop()
        self._sender.mark("end")
        stats.error = None
        stats.postcopy_duration_ms = (time.monotonic() - t0) * 1e3
        stats.total_time_ms = self._elapsed_ms()
        stats.remaining_bytes = 0
        stats.set_status("completed")
        self._publish()

    async def _recover(self, cause: BaseException) -> str:
        """Reconnect and learn where the session stands: POSTCOPY (all three
        channels reopened, the sender resynced from the PresentReport) or
        COMMITTED (the destination completed the VM with every page);
        anything else raises (see _settle)."""
        window_s = self.config.postcopy_recovery_timeout_s
        deadline = time.monotonic() + window_s
        await self._close_channels()
        while True:
            learned = await self._learn(max(0.0, deadline - time.monotonic()))
            if learned.kind != handover.POSTCOPY:
                if learned.kind == handover.UNREACHABLE:
                    learned.reason = (f"not re-established within {window_s:g} s: "
                                      f"{learned.reason}")
                self._settle(learned, cause, self._encoder.sent_hashes.digest())
                self.stats.recoveries += 1
                return handover.COMMITTED
            self._ch = learned.channel
            try:
                await self._open_postcopy_channels(resume=True)
            except (ConnectionError, LivemigError, OSError) as exc:
                cause = exc
                await self._close_channels()
                continue
            if self._tracker.armed:
                self._tracker.stop()
            self._sender.resync(learned.present)
            self.stats.recoveries += 1
            return handover.POSTCOPY

    # -- failure ----------------------------------------------------------------------------------
    async def _fail(self, exc: BaseException) -> None:
        stats = self.stats
        if self._streams is not None:
            self._streams.fold_into(stats)     # what the threads sent counts, failed or not
        stats.total_time_ms = self._elapsed_ms()
        stats.error = _describe(exc)
        cancelled = isinstance(exc, (asyncio.CancelledError, MigrationCancelled))
        stats.set_status("cancelled" if cancelled else "failed")
        if self._abandoned is not None:
            stats.error = stopped_after_commit_text(self._abandoned, phase=self.phase.label,
                                                    vm=self.name)
        elif self._committed:
            stats.error = in_doubt_text(stats.error, phase=self.phase.label, vm=self.name)
        else:
            if self._tracker is not None and self._tracker.armed:
                self._tracker.stop()
            self.vm.set_throttle(0)
            if not self.vm.running:
                self.vm.resume()
            if self._ch is not None and not self._ch.closed:
                try:
                    await within(self._ch.send(Abort(self.phase, stats.error[:1000])), 1.0)
                except (LivemigError, asyncio.TimeoutError, ConnectionError):
                    pass
        self._publish()

    def _as_migration_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, asyncio.CancelledError):
            return exc
        phase = self.phase.label
        if self._abandoned is not None:
            return MigrationError(self.stats.error, phase=phase, stats=self.stats,
                                  source_resumed=False)
        if self._committed:
            return HandoverInDoubt(self.stats.error, phase=phase, stats=self.stats,
                                   source_resumed=False)
        if isinstance(exc, MigrationCancelled) or (isinstance(exc, MigrationError)
                                                   and not exc.source_resumed):
            exc.stats, exc.phase = self.stats, exc.phase or phase
            return exc
        # One phase in the text: the one the migration was in. A channel's
        # error carries its conversation's phase, which may be a step behind
        # the session's; the session's own errors carry the session's.
        if not isinstance(exc, MigrationError):
            exc = MigrationError(_describe(exc), phase=phase)
        exc.stats = self.stats
        return reword_as_failure(exc, phase=exc.phase or phase)

    # -- helpers ------------------------------------------------------------------------------------
    async def _recv(self, timeout_s: float, what: str):
        """The destination's next event: the one reply the protocol's state
        allows here (its table refuses anything else), never Abort or None."""
        return await recv_within(self._ch, timeout_s, what, peer="destination",
                                 phase=self.phase.label)

    async def _let_pass(self) -> None:
        """While another migration of this daemon is stopped, hold our pages back
        (the stop slot, engine/source/stopslot.py)."""
        if self.control.stop_slot is not None:
            await self.control.stop_slot.let_pass(self)

    def _check_cancel(self) -> None:
        if self.control.cancel_requested:
            raise MigrationCancelled("cancelled by request before the switchover; the VM "
                                     "runs on at the source", phase=self.phase.label)

    def _elapsed_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1e3

    def _stream_progress(self, pages: np.ndarray):
        """Publish a round in flight on the streams (their counters folded)."""
        def progress(sent_pages: int) -> None:
            self._streams.fold_into(self.stats)
            self.stats.remaining_bytes = max(0, len(pages) - sent_pages) * PAGE_SIZE
            self._publish()
        return progress

    def _publish(self) -> None:
        self.on_stats(self.stats)


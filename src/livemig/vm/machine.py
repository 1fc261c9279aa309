"""The toy VM: guest memory, one native vCPU per guest CPU, a workload.

Life cycle: ``VM(...)`` maps memory, writes each vCPU's program into its code
pages and creates the vCPUs parked; ``start()``/``resume()`` let them run,
``pause()`` parks every vCPU at an instruction boundary, ``run_to(n)`` parks
each exactly when its step counter reaches ``n``. The destination side of a
migration builds ``VM.blank(memory, vcpus)``, fills memory, then
``import_state(blob)``.

Determinism: vCPUs write disjoint partitions and each has its own console,
PRNG and clock, so memory, registers and console at "step N on every vCPU"
do not depend on thread timing, pauses, throttling or pacing. That is the
oracle the migration tests use (``run_to`` + ``digest``).

``workload="trace:FILE"`` replays a recorded dirty-page trace (vm/trace.py):
the trace is laid into guest memory here, the VM's workload becomes
``trace`` with the layout in its parameters, and a ``dirty_rate`` of None
means the recorded rate (any other rate replays faster or slower; unpaced
is ``set_dirty_rate(None)`` afterwards, as for every workload).

Ordering: the vCPUs are paused one after another; each parks within
microseconds, and the others keep running meanwhile, which is harmless
because nothing a vCPU does depends on another vCPU's progress.
"""
from __future__ import annotations

import time

import xxhash

from ..errors import (ConfigError, GuestError, GuestTimeout, LivemigError, StateFormatError,
                      VMBusy)
from ..native.memory import GuestMemory
from ..units import parse_optional_rate, parse_size
from . import isa, programs, trace
from .devices import ClockState, ConsoleState
from .state import VMState, VCpuRecord, unpack
from .vcpu import VCpu


def _fault_text(code: int) -> str:
    if code in isa.FAULT_NAMES:
        return isa.FAULT_NAMES[code]
    if code == programs.MEMTEST_FAIL_CODE:
        return "memtest found a corrupted page"
    return f"guest FAIL {code:#x}"


def _trace_image(path: str, layout: programs.Layout, params: dict | None) -> trace.TraceImage:
    if params:
        raise ConfigError("a trace workload takes no parameters: its file decides everything")
    if not path:
        raise ConfigError(f"name the trace file: {programs.TRACE_PREFIX}FILE")
    recorded = trace.load(path)
    return trace.image_for(recorded, data_npages=layout.data_npages, nvcpus=layout.nvcpus,
                           where=f"trace file {path}")


class VM:
    def __init__(self, memory: int | str = "64MiB", vcpus: int = 2, workload: str | None = "uniform",
                 dirty_rate: str | float | None = None, seed: int = 0, params: dict | None = None,
                 *, hugepages: bool = True, memfd: bool = False):
        memory_bytes = parse_size(memory, what="guest memory size")
        if not isinstance(vcpus, int) or isinstance(vcpus, bool):
            raise ConfigError(f"vcpus must be an integer, got {vcpus!r}")
        if seed is None or not 0 <= int(seed) < 2**64:
            raise ConfigError(f"seed must be an integer 0..2**64-1, got {seed!r}")
        self.layout = programs.Layout(memory_bytes, vcpus)
        image = None
        if workload is not None and workload.startswith(programs.TRACE_PREFIX):
            image = _trace_image(workload[len(programs.TRACE_PREFIX):], self.layout, params)
            workload, params = "trace", image.params
            if dirty_rate is None:
                dirty_rate = image.dirty_rate_bps(vcpus)
        if workload is not None:
            programs.resolve_params(workload, params)  # refuse bad params before mapping
        self.seed = int(seed)
        self.params = dict(params or {})
        self._workload = workload
        self._dirty_rate_bps: float | None = None
        self._throttle_pct = 0
        self._running = False
        self._memory = GuestMemory(memory_bytes, hugepages=hugepages, memfd=memfd)
        self._vcpus: list[VCpu] = []
        try:
            for i in range(vcpus):
                self._vcpus.append(VCpu(self._memory, i))
            if workload is not None:
                self._load_programs()
            if image is not None:
                self._load_trace(image)
            self.set_dirty_rate(dirty_rate)
        except BaseException:
            self.close()
            raise
        self._stats_mark = (time.monotonic(), self._total_ticks())

    @classmethod
    def blank(cls, memory: int | str, vcpus: int, *, hugepages: bool = True,
              memfd: bool = False) -> "VM":
        """A destination VM: memory mapped, vCPUs parked, no program."""
        return cls(memory, vcpus, workload=None, hugepages=hugepages, memfd=memfd)

    def _load_programs(self) -> None:
        for v in self._vcpus:
            prog = programs.build(self._workload, self.layout, v.id, self.nvcpus, self.seed,
                                  self.params)
            self._memory.bytes[prog.origin:prog.origin + len(prog.code)] = \
                memoryview(prog.code).cast("B")
            st = v.get_state()
            st.pc = prog.origin
            st.rng = programs.initial_rng(self.seed, v.id)
            v.set_state(st)

    def _load_trace(self, image: trace.TraceImage) -> None:
        area = image.trace_npages
        for v in self._vcpus:
            first = self.layout.data_first_page(v.id) + self.layout.data_npages - area
            words = image.streams[v.id]
            start = first * isa.PAGE_SIZE
            self._memory.bytes[start:start + words.nbytes] = memoryview(words).cast("B")

    # -- properties -------------------------------------------------------------
    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def nvcpus(self) -> int:
        return self.layout.nvcpus

    @property
    def workload(self) -> str | None:
        return self._workload

    @property
    def dirty_rate(self) -> float | None:
        return self._dirty_rate_bps

    @property
    def running(self) -> bool:
        return self._running

    # -- run control ------------------------------------------------------------
    def start(self) -> None:
        if self._workload is None:
            raise LivemigError("this VM has no program: import a state (or build it with a "
                               "workload) before starting it")
        self.resume()

    def resume(self) -> None:
        for v in self._vcpus:
            v.set_stop_step(None)
        for v in self._vcpus:
            v.resume()
        self._running = True

    def pause(self, timeout_s: float = 5.0) -> None:
        # Ask every vCPU first, then wait: the vCPUs park in parallel, so the
        # pause (inside the downtime) costs the slowest one, not their sum.
        for v in self._vcpus:
            v.request_pause()
        for v in self._vcpus:
            v.pause(timeout_s)
        self._running = False

    def run_to(self, step: int, timeout_s: float = 30.0) -> None:
        """Run until every vCPU has retired exactly ``step`` instructions, then
        return with the VM paused. Raises GuestError if a vCPU faults first,
        GuestTimeout if they do not all get there in time."""
        self.pause()
        for v in self._vcpus:
            done = v.counters()[0]
            if done > step:
                raise LivemigError(f"vCPU {v.id} is already at step {done}, past {step}")
        for v in self._vcpus:
            v.set_stop_step(step)
            v.resume()
        deadline = time.monotonic() + timeout_s
        try:
            for v in self._vcpus:
                if not v.wait_parked(deadline - time.monotonic()):
                    raise GuestTimeout(f"vCPU {v.id} did not reach step {step} within "
                                       f"{timeout_s} s (at {v.counters()[0]})")
        finally:
            self.pause()
        self.check_guest()

    def steps(self) -> list[int]:
        return [v.counters()[0] for v in self._vcpus]

    def set_throttle(self, pct: int) -> None:
        """Make every vCPU sleep ``pct`` % of wall time (0 = full speed)."""
        if not 0 <= int(pct) <= 99:
            raise ConfigError(f"throttle must be 0..99 %, got {pct}")
        for v in self._vcpus:
            v.set_throttle(int(pct))
        self._throttle_pct = int(pct)

    def set_dirty_rate(self, rate: str | float | None) -> None:
        """Target VM-wide dirty rate in bytes/s (``"64MiB/s"``); None: unpaced."""
        bps = parse_optional_rate(rate, what="dirty rate")
        pace = (programs.pace_for(self._workload, bps, self.nvcpus, self.params)
                if self._workload else 0)
        for v in self._vcpus:
            v.set_pace(pace)
        self._dirty_rate_bps = bps or None

    # -- guest health -------------------------------------------------------------
    def _faults(self) -> list[dict]:
        """One record per faulted vCPU (a faulted vCPU is parked: its state is readable)."""
        found = []
        for v in self._vcpus:
            if v.status != isa.STATUS_FAULTED:
                continue
            st = v.get_state()
            corrupt = st.fault_code == programs.MEMTEST_FAIL_CODE and self._workload == "memtest"
            found.append({"vcpu": v.id, "step": st.steps, "code": st.fault_code,
                          "address": st.fault_addr, "pc": st.pc, "what": _fault_text(st.fault_code),
                          "page": st.regs[programs.MEMTEST_PAGE_REGISTER] if corrupt else None})
        return found

    def check_guest(self) -> None:
        """Raise GuestError if any vCPU has faulted (bad access, memtest FAIL...)."""
        for f in self._faults()[:1]:
            raise GuestError(
                f"vCPU {f['vcpu']} faulted at pc {f['pc']:#x}, step {f['step']}: {f['what']} "
                f"(code {f['code']:#x}, address {f['address']:#x})",
                vcpu=f["vcpu"], code=f["code"], address=f["address"])

    def health(self) -> dict:
        """What the guest says of itself, for listings: ``ok``; ``corrupt``
        when memtest found a page breaking its invariant (each vCPU stops at
        the first one it finds, so ``errors`` counts vCPUs that found one);
        ``faulted`` for any other guest fault. ``since_step`` is the earliest
        step at which one was found; ``summary`` says it in one line."""
        faults = self._faults()
        if not faults:
            return {"status": "ok", "errors": 0, "since_step": None, "faults": [],
                    "summary": "ok"}
        status = "corrupt" if all(f["page"] is not None for f in faults) else "faulted"
        first = min(faults, key=lambda f: f["step"])
        where = (f"page {first['page']:#x} failed its checksum" if first["page"] is not None
                 else f"{first['what']} at pc {first['pc']:#x}")
        n = len(faults)
        summary = (f"{status} ({n} error{'s' if n > 1 else ''} since step {first['step']}: "
                   f"vCPU {first['vcpu']}: {where})")
        return {"status": status, "errors": n, "since_step": first["step"], "faults": faults,
                "summary": summary}

    def status(self) -> list[str]:
        return [isa.STATUS_NAMES.get(v.status, "?") for v in self._vcpus]

    # -- observation --------------------------------------------------------------
    def digest(self) -> bytes:
        """xxh3-128 of all guest memory (exact only while paused)."""
        return xxhash.xxh3_128_digest(self._memory.bytes)

    def console(self, vcpu: int | None = None) -> bytes:
        """The kept console tail of one vCPU, or of all of them concatenated in
        vCPU order. A running vCPU is parked for the read (timing only)."""
        targets = self._vcpus if vcpu is None else [self._vcpus[vcpu]]
        out = []
        for v in targets:
            if self._running and v.status == isa.STATUS_RUNNING:
                v.pause()
                try:
                    out.append(v.console_tail())
                finally:
                    v.resume()
            else:
                out.append(v.console_tail())
        return b"".join(out)

    def registers(self, vcpu: int) -> dict:
        """Registers and counters of a parked vCPU, as plain ints."""
        st = self._vcpus[vcpu].get_state()
        return {"regs": list(st.regs), "pc": st.pc, "steps": st.steps, "rng": st.rng,
                "status": st.status, "fault_code": st.fault_code, "fault_addr": st.fault_addr,
                "console_count": st.console_count, "console_hash": st.console_hash,
                "clock_base": st.clock_base}

    def _total_ticks(self) -> int:
        return sum(v.counters()[1] for v in self._vcpus)

    def stats(self) -> dict:
        """Per-vCPU counters, and the dirty rate measured since the previous call."""
        now = time.monotonic()
        per = [dict(zip(("steps", "ticks", "stores"), v.counters())) for v in self._vcpus]
        ticks = sum(p["ticks"] for p in per)
        t0, ticks0 = self._stats_mark
        self._stats_mark = (now, ticks)
        elapsed = now - t0
        bpt = programs.bytes_per_tick(self._workload, self.params) if self._workload else 0
        return {
            "vcpus": per,
            "steps": sum(p["steps"] for p in per),
            "ticks": ticks,
            "stores": sum(p["stores"] for p in per),
            "window_s": elapsed,
            "dirty_rate_bps": (ticks - ticks0) * bpt / elapsed if elapsed > 0 else 0.0,
            "target_dirty_rate_bps": self._dirty_rate_bps,
            "throttle_pct": self._throttle_pct,
            "status": self.status(),
        }

    # -- state ------------------------------------------------------------------
    def _require_paused(self, what: str) -> None:
        if self._running:
            raise VMBusy(f"{what} needs a paused VM; call pause() first")

    def export_state(self) -> bytes:
        """Configuration, vCPU registers and devices as a versioned blob."""
        self._require_paused("export_state")
        records = []
        for v in self._vcpus:
            st = v.get_state()
            records.append(VCpuRecord(
                tuple(st.regs), st.pc, st.steps, st.rng, st.status, st.fault_code,
                st.fault_addr, ConsoleState(v.console_tail(), st.console_count, st.console_hash),
                ClockState(st.clock_base)))
        return VMState(self.layout.memory_bytes, self.nvcpus, self._workload, self.seed,
                       self._dirty_rate_bps, self.params, tuple(records)).pack()

    def import_state(self, blob: bytes) -> None:
        """Adopt a state exported by a VM of the same memory size and vCPU count
        (memory itself travels separately). StateFormatError on bad input."""
        self._require_paused("import_state")
        s = unpack(blob)
        if s.memory_bytes != self.layout.memory_bytes or s.nvcpus != self.nvcpus:
            raise StateFormatError(
                f"VM state is for {s.memory_bytes} bytes and {s.nvcpus} vCPU(s); this VM has "
                f"{self.layout.memory_bytes} bytes and {self.nvcpus}")
        if s.workload is not None:
            try:
                programs.resolve_params(s.workload, s.params)
                programs.pace_for(s.workload, s.dirty_rate_bps, s.nvcpus, s.params)
            except ConfigError as exc:
                raise StateFormatError(f"VM state describes an invalid workload: {exc}") from None
        for v, r in zip(self._vcpus, s.vcpus):
            st = v.get_state()
            st.regs = list(r.regs)
            st.pc, st.steps, st.rng = r.pc, r.steps, r.rng
            st.status, st.fault_code, st.fault_addr = r.status, r.fault_code, r.fault_addr
            st.console_count, st.console_hash = r.console.count, r.console.hash
            st.clock_base = r.clock.base_ns
            v.set_state(st)
            v.set_console_tail(r.console.tail)
        self._workload, self.seed, self.params = s.workload, s.seed, dict(s.params)
        self.set_dirty_rate(s.dirty_rate_bps)

    # -- teardown -----------------------------------------------------------------
    def close(self) -> None:
        for v in self._vcpus:
            v.close()  # joins the thread, which stops at an instruction boundary
        self._vcpus = []
        self._running = False
        if not self._memory.closed:
            self._memory.close()

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<VM {self.layout.memory_bytes >> 20} MiB, {self.nvcpus} vCPU(s), "
                f"workload={self._workload!r}, {'running' if self._running else 'paused'}>")

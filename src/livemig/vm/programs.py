"""Workload programs: guest code for each vCPU, built with the assembler.

Layout of guest memory (``Layout``): each vCPU's code occupies its own
``CODE_PAGES_PER_VCPU`` pages at the start of memory; the remaining pages are
split into equal, disjoint data partitions, one per vCPU. No two vCPUs ever
write the same page, so the VM's state at "step N on every vCPU" is exact
whatever the interleaving of the threads.

Every writing workload executes one TICK per page write, so a target dirty
rate of R bytes/s becomes a pace of R / 4096 / nvcpus TICKs per second per
vCPU (``pace_for``); the pace changes timing only, never what is written.

Register conventions: r0 is never written (reads as 0); programs keep their
partition base in r1 and its page count in r2.

memtest keeps, in every page of its partition, the invariant
``sum((2i+1) * word[i]) == 0 (mod 2**64)`` — exactly what PSUM computes —
with word 0 as the balancing checksum and word 1 as the page's visit
counter. Each visit verifies the invariant (FAIL MEMTEST_FAIL_CODE when it
does not hold), bumps the counter, writes a random value into a random word
2..511 and rebalances word 0. A zero page satisfies the invariant, so memory
needs no initialisation, and any change made behind the guest's back to any
one word breaks it (odd weights are invertible mod 2**64).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError
from . import asm, isa

CODE_PAGES_PER_VCPU = 2
MEMTEST_FAIL_CODE = 0x4D54          # "MT"
MEMTEST_PAGE_REGISTER = 4           # holds the address of the page memtest found corrupted
IDLE_HEARTBEAT_EVERY = 1 << 18      # loop iterations between heartbeat bytes (~1 s at the idle pace)
MEMTEST_REPORT_EVERY = 1024         # visits between console bytes
MAX_VCPUS = 256


@dataclass(frozen=True)
class Layout:
    memory_bytes: int
    nvcpus: int

    def __post_init__(self):
        if not 1 <= self.nvcpus <= MAX_VCPUS:
            raise ConfigError(f"a VM has 1..{MAX_VCPUS} vCPUs, got {self.nvcpus}")
        if self.memory_bytes % isa.PAGE_SIZE:
            raise ConfigError("guest memory must be a whole number of pages")
        if self.data_npages < 1:
            raise ConfigError(
                f"{self.memory_bytes} bytes of guest memory leave no data pages for "
                f"{self.nvcpus} vCPU(s) (each needs {CODE_PAGES_PER_VCPU} code pages + 1)"
            )

    @property
    def npages(self) -> int:
        return self.memory_bytes // isa.PAGE_SIZE

    @property
    def code_npages(self) -> int:
        return CODE_PAGES_PER_VCPU * self.nvcpus

    def code_base(self, vcpu: int) -> int:
        return vcpu * CODE_PAGES_PER_VCPU * isa.PAGE_SIZE

    @property
    def data_npages(self) -> int:
        """Pages in each vCPU's data partition."""
        return (self.npages - self.code_npages) // self.nvcpus

    def data_first_page(self, vcpu: int) -> int:
        return self.code_npages + vcpu * self.data_npages


@dataclass(frozen=True)
class Program:
    code: bytes
    origin: int          # byte address of the first instruction (the entry point)


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[..., str]   # (constants, params) -> assembly text
    bytes_per_tick: int         # bytes dirtied per TICK (0: does not write)
    defaults: dict = field(default_factory=dict)


def _idle(c: dict, p: dict) -> str:
    return """
        li64  r2, HEARTBEAT_MASK
        li    r3, '.'
    loop:
        addi  r1, r1, 1
        tick
        and   r4, r1, r2
        bne   r4, r0, loop
        out   r3
        jmp   loop
    """


_PROLOGUE = """
        li64  r1, DATA
        li64  r2, NPAGES
"""

# r4 = page address, then + a random aligned word offset from r3's top 9 bits
_WRITE_RANDOM_WORD = """
        shli  r4, r4, 12
        add   r4, r4, r1
        shri  r6, r3, 55
        shli  r6, r6, 3
        add   r4, r4, r6
        addi  r5, r5, 1
        st    r5, [r4]
        tick
        jmp   loop
"""


def _uniform(c: dict, p: dict) -> str:
    return _PROLOGUE + """
    loop:
        rand  r3
        modu  r4, r3, r2
    """ + _WRITE_RANDOM_WORD


def _rewrite(c: dict, p: dict) -> str:
    """A random page rewritten whole with random words per TICK: what a guest
    copying buffers does, and what neither BLOCK nor DELTA can shrink."""
    return _PROLOGUE + """
    loop:
        rand  r3
        modu  r4, r3, r2
        shli  r4, r4, 12
        add   r4, r4, r1
        li    r6, 512
    fill:
        rand  r7
        st    r7, [r4]
        addi  r4, r4, 8
        addi  r6, r6, -1
        bne   r6, r0, fill
        tick
        jmp   loop
    """


def _hotset(c: dict, p: dict) -> str:
    return _PROLOGUE + """
        li64  r7, HOT_NPAGES
        li    r8, HOT_PERMILLE
    loop:
        rand  r3
        modui r9, r3, 1000
        shri  r10, r3, 10
        bltu  r9, r8, hot
        modu  r4, r10, r2
        jmp   write
    hot:
        modu  r4, r10, r7
    write:
    """ + _WRITE_RANDOM_WORD


def _sweep(c: dict, p: dict) -> str:
    return _PROLOGUE + """
        li    r4, 0
    loop:
        shli  r6, r4, 12
        add   r6, r6, r1
        addi  r5, r5, 1
        st    r5, [r6]
        tick
        addi  r4, r4, STRIDE
        bltu  r4, r2, loop
        sub   r4, r4, r2
        bltu  r4, r2, loop
        li    r4, 0
        jmp   loop
    """


def _memtest(c: dict, p: dict) -> str:
    return _PROLOGUE + """
        li    r14, REPORT_MASK
        li    r15, REPORT_CHAR
    loop:
        rand  r3
        modu  r4, r3, r2
        shli  r4, r4, 12
        add   r4, r4, r1          ; r4 = page
        psum  r5, r4
        bne   r5, r0, corrupt
        ld    r6, [r4 + 8]        ; the visit counter, weight 3
        addi  r6, r6, 1
        st    r6, [r4 + 8]
        rand  r7                  ; new value v for word j
        shri  r8, r3, 32
        modui r8, r8, 510
        addi  r8, r8, 2           ; j in 2..511
        shli  r9, r8, 3
        add   r9, r9, r4
        ld    r10, [r9]           ; old value o
        st    r7, [r9]
        sub   r10, r7, r10
        shli  r11, r8, 1
        addi  r11, r11, 1
        mul   r10, r10, r11       ; (v - o) * (2j + 1)
        addi  r10, r10, 3         ; + the counter's change
        ld    r11, [r4]
        sub   r11, r11, r10
        st    r11, [r4]           ; word 0 rebalances the page
        tick
        addi  r12, r12, 1
        and   r13, r12, r14
        bne   r13, r0, loop
        out   r15
        jmp   loop
    corrupt:
        fail  MEMTEST_FAIL_CODE
    """


def _trace(c: dict, p: dict) -> str:
    """Replay of a recorded dirty-page trace (vm/trace.py): walk this vCPU's
    trace area; per interval write each listed page (one TICK each), then pad
    with TICKs to SLOTS; at END go back to the start."""
    return _PROLOGUE + """
        li64  r2, TRACE
        li    r3, -1              ; END
        li64  r7, SLOTS
        mov   r4, r2
    interval:
        ld    r6, [r4]
        beq   r6, r3, rewind
        addi  r4, r4, 8
        mov   r8, r7
    page:
        beq   r6, r0, pad
        ld    r9, [r4]
        addi  r4, r4, 8
        shli  r9, r9, 12
        add   r9, r9, r1
        addi  r5, r5, 1
        st    r5, [r9]
        tick
        addi  r6, r6, -1
        addi  r8, r8, -1
        jmp   page
    pad:
        beq   r8, r0, interval
        tick
        addi  r8, r8, -1
        jmp   pad
    rewind:
        mov   r4, r2
        jmp   interval
    """


TRACE_PREFIX = "trace:"
"""``trace:FILE`` names a recorded trace as a workload (machine.py loads it)."""

WORKLOADS: dict[str, Workload] = {
    "idle": Workload("idle", _idle, 0),
    "uniform": Workload("uniform", _uniform, isa.PAGE_SIZE),
    "hotset": Workload("hotset", _hotset, isa.PAGE_SIZE,
                       {"hot_fraction": 0.1, "hot_probability": 0.9}),
    "sweep": Workload("sweep", _sweep, isa.PAGE_SIZE, {"stride_pages": 1}),
    "memtest": Workload("memtest", _memtest, isa.PAGE_SIZE),
    "rewrite": Workload("rewrite", _rewrite, isa.PAGE_SIZE),
    # built from a file (``trace:FILE``): the parameters come from vm/trace.py
    "trace": Workload("trace", _trace, isa.PAGE_SIZE,
                      {"trace_npages": 0, "slots": 1, "pages_per_tick": 1.0}),
}


def workload(name: str) -> Workload:
    if name.startswith(TRACE_PREFIX):
        name = "trace"
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ConfigError(
            f"unknown workload {name!r}; choose one of {', '.join(sorted(WORKLOADS))}"
        ) from None


def resolve_params(name: str, params: dict | None) -> dict:
    """The workload's defaults overlaid with ``params``; unknown keys refused."""
    w = workload(name)
    params = dict(params or {})
    unknown = set(params) - set(w.defaults)
    if unknown:
        raise ConfigError(f"workload {name!r} has no parameter(s) {sorted(unknown)}; "
                          f"it takes {sorted(w.defaults) or 'none'}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"workload parameter {key!r} must be a number, got {value!r}")
    return {**w.defaults, **params}


def build(name: str, layout: Layout, vcpu: int, nvcpus: int, seed: int,
          params: dict | None = None) -> Program:
    """The program vCPU ``vcpu`` runs for workload ``name``.

    ``seed`` does not change the code: it seeds the vCPU's PRNG register
    (see ``initial_rng``), which is where the workloads take randomness from.
    """
    w = workload(name)
    p = resolve_params(name, params)
    data_npages = layout.data_npages
    hot = p.get("hot_fraction", 0.1)
    prob = p.get("hot_probability", 0.9)
    stride = int(p.get("stride_pages", 1))
    if not 0 < hot <= 1 or not 0 <= prob <= 1:
        raise ConfigError("hotset needs 0 < hot_fraction <= 1 and 0 <= hot_probability <= 1")
    if not 1 <= stride <= data_npages:
        raise ConfigError(f"sweep stride_pages must be 1..{data_npages}, got {stride}")
    trace_npages, slots = int(p.get("trace_npages", 0)), int(p.get("slots", 1))
    if name == "trace" and not (1 <= trace_npages < data_npages and slots >= 1):
        raise ConfigError("the trace workload is built from a recorded file: use "
                          f"{TRACE_PREFIX}FILE (see docs/vm.md)")
    constants = {
        "DATA": layout.data_first_page(vcpu) * isa.PAGE_SIZE,
        "NPAGES": data_npages,
        "HOT_NPAGES": max(1, int(data_npages * hot)),
        "HOT_PERMILLE": int(round(prob * 1000)),
        "STRIDE": stride,
        "HEARTBEAT_MASK": IDLE_HEARTBEAT_EVERY - 1,
        "REPORT_MASK": MEMTEST_REPORT_EVERY - 1,
        "REPORT_CHAR": ord("a") + vcpu % 26,
        "MEMTEST_FAIL_CODE": MEMTEST_FAIL_CODE,
        "TRACE": (layout.data_first_page(vcpu) + data_npages - trace_npages) * isa.PAGE_SIZE,
        "SLOTS": slots,
    }
    origin = layout.code_base(vcpu)
    code = asm.assemble(w.build(constants, p), origin=origin, constants=constants)
    if len(code) > CODE_PAGES_PER_VCPU * isa.PAGE_SIZE:  # pragma: no cover - a code bug
        raise ConfigError(f"workload {name!r} does not fit its code pages")
    return Program(code, origin)


def initial_rng(seed: int, vcpu: int) -> int:
    """Each vCPU's PRNG state: distinct per vCPU, fixed by the seed."""
    x = (seed * 0x9E3779B97F4A7C15 + (vcpu + 1) * 0xD1B54A32D192ED03) & isa.MASK64
    x ^= x >> 31
    return (x * 0xBF58476D1CE4E5B9) & isa.MASK64


#: An idle guest wakes this often per vCPU, like a halted CPU woken by its timer
#: tick: it stays off the host's cores instead of spinning on them (timing only).
IDLE_TICKS_PER_S = 250_000


def bytes_per_tick(name: str, params: dict | None = None) -> float:
    """Bytes a workload dirties per TICK; a trace's depends on its padding."""
    w = workload(name)
    if w.name == "trace":
        return w.bytes_per_tick * float(resolve_params("trace", params)["pages_per_tick"])
    return w.bytes_per_tick


def pace_for(name: str, dirty_rate_bps: float | None, nvcpus: int,
             params: dict | None = None) -> int:
    """TICKs per second per vCPU for a VM-wide dirty rate (0: unpaced). A
    workload that writes no memory runs at IDLE_TICKS_PER_S."""
    bpt = bytes_per_tick(name, params)
    if not dirty_rate_bps:
        return IDLE_TICKS_PER_S if bpt == 0 else 0
    if bpt <= 0:
        raise ConfigError(f"workload {name!r} does not write memory; it takes no dirty rate")
    return max(1, int(round(dirty_rate_bps / bpt / nvcpus)))

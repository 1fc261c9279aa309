"""The native vCPU: instruction semantics, faults, run control, state."""
import errno
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from livemig.errors import VMBusy
from livemig.native.memory import GuestMemory
from livemig.native import ffi, lib
from livemig.vm import asm, isa
from livemig.vm.devices import FNV_BASIS, console_hash
from livemig.vm.vcpu import VCpu
from support.waiting import PATIENCE_S, wait_for

MASK = (1 << 64) - 1
DATA = 0x10000  # data area used by the snippets, well past the code


@pytest.fixture
def mem():
    m = GuestMemory("1MiB", hugepages=False)
    yield m
    for user in list(m._users):  # vCPUs left open by a failing test
        user.close()
    m.close()


def run_snippet(mem, source, *, regs=None, rng=0, timeout_s=PATIENCE_S):
    """Assemble at address 0, run to HALT or a fault, return (state, vcpu)."""
    code = asm.assemble(source, constants={"DATA": DATA})
    mem.bytes[:len(code)] = np.frombuffer(code, dtype=np.uint8)
    v = VCpu(mem, 0)
    st = v.get_state()
    st.pc = 0
    st.rng = rng
    for i, val in (regs or {}).items():
        st.regs[i] = val & MASK
    v.set_state(st)
    v.resume()
    assert v.wait_parked(timeout_s), "snippet did not finish"
    st = v.get_state()
    return st, v


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def test_header_opcodes_match_isa_table():
    for op in isa.OPS:
        assert getattr(lib, f"LM_OP_{op.name}") == op.code, op.name
    assert lib.LM_OP_COUNT == max(op.code for op in isa.OPS) + 1
    assert lib.LM_VCPU_NREGS == isa.NREGS
    assert (lib.LM_VCPU_PARKED, lib.LM_VCPU_RUNNING, lib.LM_VCPU_HALTED, lib.LM_VCPU_FAULTED) == \
        (isa.STATUS_PARKED, isa.STATUS_RUNNING, isa.STATUS_HALTED, isa.STATUS_FAULTED)
    for name in ("BAD_OPCODE", "BAD_ADDRESS", "BAD_PC", "MISALIGNED", "BAD_REGISTER", "DIVIDE"):
        assert getattr(lib, f"LM_VCPU_FAULT_{name}") == getattr(isa, f"FAULT_{name}")


A, B = 0xF0F0_1234_5678_9ABC, 0x0000_0000_0000_0025
ALU_CASES = [
    ("li r3, -5", -5 & MASK),
    ("li r3, 7\n lih r3, 0x12345678", 0x12345678_00000007),
    ("li r3, -1\n lih r3, 0", 0xFFFFFFFF),
    ("mov r3, r1", A),
    ("add r3, r1, r2", (A + B) & MASK),
    ("sub r3, r2, r1", (B - A) & MASK),
    ("mul r3, r1, r2", (A * B) & MASK),
    ("and r3, r1, r2", A & B),
    ("or r3, r1, r2", A | B),
    ("xor r3, r1, r2", A ^ B),
    ("shl r3, r1, r2", (A << (B & 63)) & MASK),
    ("shr r3, r1, r2", A >> (B & 63)),
    ("modu r3, r1, r2", A % B),
    ("addi r3, r1, -16", (A - 16) & MASK),
    ("muli r3, r1, 3", (A * 3) & MASK),
    ("andi r3, r1, 0xff", A & 0xFF),
    ("ori r3, r1, -256", A | (-256 & MASK)),
    ("xori r3, r1, 0x0f", A ^ 0x0F),
    ("shli r3, r1, 4", (A << 4) & MASK),
    ("shri r3, r1, 60", A >> 60),
    ("modui r3, r1, 1000", A % 1000),
    ("li64 r3, 0xdeadbeefcafef00d", 0xDEADBEEFCAFEF00D),
]


@pytest.mark.parametrize("source,expected", ALU_CASES, ids=[c[0].split()[0] for c in ALU_CASES])
def test_alu(mem, source, expected):
    st, v = run_snippet(mem, source + "\nhalt", regs={1: A, 2: B})
    assert st.status == isa.STATUS_HALTED
    assert st.regs[3] == expected
    assert st.regs[1] == A and st.regs[2] == B
    v.close()


def test_loads_and_stores(mem):
    st, v = run_snippet(mem, """
        li64 r1, DATA
        li64 r2, 0x1122334455667788
        st   r2, [r1 + 16]
        ld   r3, [r1 + 16]
        ldb  r4, [r1 + 17]
        li   r5, 0x1ab
        stb  r5, [r1 + 3]
        ld   r6, [r1 + 0]
        halt
    """)
    assert st.regs[3] == 0x1122334455667788
    assert st.regs[4] == 0x77
    assert st.regs[6] == 0xAB << 24
    assert mem.words[DATA // 4096, 2] == 0x1122334455667788
    steps, ticks, stores = v.counters()
    assert stores == 2 and steps == st.steps == 11
    v.close()


@pytest.mark.parametrize("op,a,b,taken", [
    ("beq", 5, 5, True), ("beq", 5, 6, False), ("bne", 5, 6, True), ("bne", 5, 5, False),
    ("bltu", 1, 2, True), ("bltu", MASK, 2, False), ("bgeu", MASK, 2, True), ("bgeu", 1, 2, False),
])
def test_branches(mem, op, a, b, taken):
    st, v = run_snippet(mem, f"""
        {op} r1, r2, yes
        li r3, 1
        halt
    yes:
        li r3, 2
        halt
    """, regs={1: a, 2: b})
    assert st.regs[3] == (2 if taken else 1)
    v.close()


def test_jmp_jal_jr(mem):
    st, v = run_snippet(mem, """
        jal  r15, func
        addi r3, r3, 100
        jmp  end
        li   r3, 999
    func:
        li   r3, 1
        jr   r15
    end:
        halt
    """)
    assert st.regs[3] == 101 and st.regs[15] == 8
    v.close()


def test_rand_is_splitmix_of_the_state_field(mem):
    st, v = run_snippet(mem, "rand r1\nrand r2\nhalt", rng=12345)
    s, z1 = splitmix64(12345)
    s, z2 = splitmix64(s)
    assert (st.regs[1], st.regs[2], st.rng) == (z1, z2, s)
    v.close()


def test_clock_counts_steps_from_clock_base(mem):
    code = asm.assemble("nop\nnop\nclock r1\nhalt")
    mem.bytes[:len(code)] = np.frombuffer(code, dtype=np.uint8)
    v = VCpu(mem, 0)
    st = v.get_state()
    st.clock_base = 1000
    v.set_state(st)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    assert v.get_state().regs[1] == 1002
    v.close()


def test_psum_matches_the_host_checksum(mem):
    rng = np.random.default_rng(1)
    page = DATA // 4096
    mem.words[page] = rng.integers(0, 2**63, 512, dtype=np.uint64) * np.uint64(2) + \
        np.uint64(1)
    st, v = run_snippet(mem, "li64 r1, DATA\naddi r1, r1, 100\npsum r2, r1\nhalt")
    expected = isa.page_sum(mem.words[page])
    assert st.regs[2] == expected
    assert lib.lm_vcpu_page_sum(ffi.from_buffer(mem.pages[page])) == expected
    v.close()


def test_out_feeds_console_tail_count_and_hash(mem):
    st, v = run_snippet(mem, "li r1, 'h'\nout r1\nli r1, 'i'\nout r1\nhalt")
    assert st.console_count == 2
    assert st.console_hash == console_hash(b"hi") != FNV_BASIS
    assert v.console_tail() == b"hi"
    v.set_console_tail(b"x" * 4096)
    assert v.console_tail() == b"x" * 4096
    v.close()


def test_console_keeps_only_the_tail(mem):
    st, v = run_snippet(mem, """
        li r2, 5000
    loop:
        andi r3, r1, 0x3f
        addi r3, r3, 48
        out  r3
        addi r1, r1, 1
        bne  r1, r2, loop
        halt
    """)
    out = bytes(48 + (i & 0x3F) for i in range(5000))
    assert st.console_count == 5000 and st.console_hash == console_hash(out)
    assert v.console_tail() == out[-4096:]
    v.close()




@pytest.mark.parametrize("source,code,addr_of", [
    ("li64 r1, 0x100000\nld r2, [r1]", isa.FAULT_BAD_ADDRESS, lambda st: 0x100000),
    ("li r1, -8\nst r1, [r1]", isa.FAULT_BAD_ADDRESS, lambda st: MASK - 7),
    ("li64 r1, 0xfffff\nstb r1, [r1 + 1]", isa.FAULT_BAD_ADDRESS, lambda st: 0x100000),
    ("li r1, 4\nld r2, [r1]", isa.FAULT_MISALIGNED, lambda st: 4),
    ("li64 r1, 0x200000\npsum r2, r1", isa.FAULT_BAD_ADDRESS, lambda st: 0x200000),
    ("jmp 4", isa.FAULT_BAD_PC, lambda st: 4),
    ("li64 r1, 0x100000\njr r1", isa.FAULT_BAD_PC, lambda st: 0x100000),
    ("modu r1, r1, r0", isa.FAULT_DIVIDE, lambda st: 0),
    ("nop\nfail 0x4d54", 0x4D54, lambda st: 8),
    ("nop\nnop", isa.FAULT_BAD_OPCODE, lambda st: 16),  # runs into zeroed memory
])
def test_faults_are_reported_not_crashes(mem, source, code, addr_of):
    st, v = run_snippet(mem, source)
    assert st.status == isa.STATUS_FAULTED
    assert st.fault_code == code
    assert st.fault_addr == addr_of(st)
    assert v.status == isa.STATUS_FAULTED
    # a faulted vCPU stays parked when resumed
    v.resume()
    assert v.wait_parked(1) and v.get_state().steps == st.steps
    v.close()


def test_bad_register_and_opcode_fields(mem):
    mem.bytes[:8] = np.frombuffer(isa.encode(isa.BY_NAME["NOP"].code), dtype=np.uint8)
    mem.bytes[8:16] = np.frombuffer(bytes([isa.BY_NAME["MOV"].code, 16, 0, 0, 0, 0, 0, 0]),
                                    dtype=np.uint8)
    v = VCpu(mem, 0)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    st = v.get_state()
    assert (st.fault_code, st.fault_addr, st.steps, st.pc) == (isa.FAULT_BAD_REGISTER, 8, 1, 8)
    st.status, st.pc = isa.STATUS_PARKED, 16
    mem.bytes[16:24] = np.frombuffer(bytes([200, 0, 0, 0, 0, 0, 0, 0]), dtype=np.uint8)
    v.set_state(st)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    assert v.get_state().fault_code == isa.FAULT_BAD_OPCODE
    v.close()


SPIN = """
    li64 r1, DATA
loop:
    addi r2, r2, 1
    andi r3, r2, 511
    shli r3, r3, 3
    add  r3, r3, r1
    st   r2, [r3]
    tick
    jmp  loop
"""


PSUM_LOOP = """
    li64 r1, DATA
loop:
    psum r2, r1
    jmp  loop
"""


def spinner(mem, source=SPIN):
    code = asm.assemble(source, constants={"DATA": DATA})
    mem.bytes[:len(code)] = np.frombuffer(code, dtype=np.uint8)
    return VCpu(mem, 0)


def _let_it_step(v):
    """Wait until a running vCPU has retired another instruction."""
    before = v.counters()[0]
    wait_for("the vCPU to step", lambda: v.counters()[0] > before)


@pytest.mark.parametrize("source", [SPIN, PSUM_LOOP], ids=["stores", "psum"])
def test_pause_parks_a_running_vcpu(mem, source):
    # How fast it parks is measured by bench/vcpu_speed.py.
    v = spinner(mem, source)
    for _ in range(60):
        v.resume()
        _let_it_step(v)
        v.pause()
        assert v.status == isa.STATUS_PARKED
    v.close()


def test_state_is_refused_while_running(mem):
    v = spinner(mem)
    v.resume()
    try:
        with pytest.raises(VMBusy):
            v.get_state()
        with pytest.raises(VMBusy):
            v.console_tail()
        assert lib.lm_vcpu_set_state(v.handle, ffi.new("lm_vcpu_state *", {"status": 1})) \
            == -errno.EBUSY
        assert v.status == isa.STATUS_RUNNING
    finally:
        v.pause()
    v.close()


@pytest.mark.parametrize("stop", [1, 7, 4096, 4097, 123_457])
def test_stop_step_is_exact(mem, stop):
    v = spinner(mem)
    v.set_stop_step(stop)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    assert v.get_state().steps == stop == v.counters()[0]
    # a later stop continues from there
    v.set_stop_step(stop + 1000)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    assert v.get_state().steps == stop + 1000
    v.close()


def test_stop_step_interplays_with_pause(mem):
    v = spinner(mem)
    v.set_stop_step(50_000_000)
    v.set_throttle(90)      # timing only: keeps it seconds away from the stop step
    for _ in range(5):
        v.resume()
        _let_it_step(v)
        v.pause()
    steps = v.get_state().steps
    assert 0 < steps < 50_000_000
    v.set_throttle(0)
    v.resume()
    assert v.wait_parked(PATIENCE_S)
    assert v.get_state().steps == 50_000_000
    v.close()


def test_throttle_makes_the_vcpu_sleep_and_pause_interrupts_it(mem):
    # How much a throttle slows the guest is measured by bench/, not here.
    v = spinner(mem)
    v.set_throttle(90)
    v.resume()

    def caught_asleep():
        before = v.counters()[0]
        time.sleep(0.002)     # a fifth of a 9 ms throttle sleep
        return v.counters()[0] == before

    wait_for("the throttled vCPU to be caught in its sleep", caught_asleep)
    v.pause()                 # interrupts the sleep: parks, however long it had left
    assert v.status == isa.STATUS_PARKED
    with pytest.raises(Exception):
        v.set_throttle(100)
    v.close()


def test_pace_limits_ticks_per_second(mem):
    pace = 20_000
    v = spinner(mem)
    v.set_pace(pace)
    t0, ticks0 = time.monotonic(), v.counters()[1]
    v.resume()
    wait_for("0.3 s worth of ticks at the pace", lambda: v.counters()[1] - ticks0 >= pace * 0.3)
    v.pause()
    rate = (v.counters()[1] - ticks0) / (time.monotonic() - t0)
    # At most the pace plus its 50 ms catch-up allowance over the window.
    assert rate < 26_000, rate
    v.close()


def test_tick_counts_and_changes_nothing_else(mem):
    st, v = run_snippet(mem, "li r1, 3\ntick\ntick\ntick\nhalt")
    assert v.counters() == (st.steps, 3, 0) == (5, 3, 0)
    assert st.regs[1] == 3 and all(r == 0 for r in list(st.regs)[2:])
    v.close()


# -- property: straight-line ALU programs agree with a Python model ------------
_ALU = {
    "ADD": lambda a, b: a + b, "SUB": lambda a, b: a - b, "MUL": lambda a, b: a * b,
    "AND": lambda a, b: a & b, "OR": lambda a, b: a | b, "XOR": lambda a, b: a ^ b,
    "SHL": lambda a, b: a << (b & 63), "SHR": lambda a, b: a >> (b & 63),
}
_ALUI = {
    "ADDI": lambda a, i: a + i, "MULI": lambda a, i: a * i, "ANDI": lambda a, i: a & i,
    "ORI": lambda a, i: a | i, "XORI": lambda a, i: a ^ i,
    "SHLI": lambda a, i: a << (i & 63), "SHRI": lambda a, i: a >> (i & 63),
}
_reg = st.integers(0, 15)
_imm = st.integers(-(1 << 31), (1 << 31) - 1)
_insn = st.one_of(
    st.tuples(st.sampled_from(sorted(_ALU)), _reg, _reg, _reg, st.just(0)),
    st.tuples(st.sampled_from(sorted(_ALUI)), _reg, _reg, st.just(0), _imm),
    st.tuples(st.sampled_from(["LI", "LIH"]), _reg, st.just(0), st.just(0), _imm),
    st.tuples(st.just("MOV"), _reg, _reg, st.just(0), st.just(0)),
)


def _model(program, regs):
    r = list(regs)
    for name, rd, ra, rb, imm in program:
        if name in _ALU:
            r[rd] = _ALU[name](r[ra], r[rb]) & MASK
        elif name in _ALUI:
            r[rd] = _ALUI[name](r[ra], imm & MASK if name not in ("SHLI", "SHRI") else imm) & MASK
        elif name == "LI":
            r[rd] = imm & MASK
        elif name == "LIH":
            r[rd] = (r[rd] & 0xFFFFFFFF) | ((imm & 0xFFFFFFFF) << 32)
        else:
            r[rd] = r[ra]
    return r


@settings(max_examples=60, deadline=None)
@given(program=st.lists(_insn, min_size=1, max_size=40),
       regs=st.lists(st.integers(0, MASK), min_size=16, max_size=16))
def test_alu_programs_match_the_model(program, regs):
    code = b"".join(isa.encode(isa.BY_NAME[n].code, rd, ra, rb, imm)
                    for n, rd, ra, rb, imm in program) + isa.encode(isa.BY_NAME["HALT"].code)
    with GuestMemory("64KiB", hugepages=False) as m:
        m.bytes[:len(code)] = np.frombuffer(code, dtype=np.uint8)
        v = VCpu(m, 0)
        s = v.get_state()
        s.regs = regs
        v.set_state(s)
        v.resume()
        assert v.wait_parked(PATIENCE_S)
        s = v.get_state()
        v.close()
    assert s.status == isa.STATUS_HALTED and s.steps == len(program) + 1
    assert list(s.regs) == _model(program, regs)


_command = st.one_of(
    st.tuples(st.just("resume"), st.just(0)),
    st.tuples(st.just("pause"), st.just(0)),
    st.tuples(st.just("sleep_us"), st.integers(0, 2000)),
    st.tuples(st.just("stop_ahead"), st.integers(0, 50_000)),
    st.tuples(st.just("throttle"), st.integers(0, 99)),
    st.tuples(st.just("pace"), st.sampled_from([0, 1000, 100_000])),
)


@settings(max_examples=25, deadline=None)
@given(commands=st.lists(_command, max_size=12))
def test_any_command_sequence_ends_exactly_at_the_stop_step(commands):
    """Pauses, stop steps, throttle and pace change timing, never the state
    the vCPU reaches at a given step."""
    target = 3_000_000
    states = []
    for script in (commands, []):
        with GuestMemory("1MiB", hugepages=False) as m:
            v = spinner(m)
            v.set_stop_step(target)  # never beyond the comparison point
            for name, arg in script:
                if name == "resume":
                    v.resume()
                elif name == "pause":
                    v.pause()
                    assert v.status == isa.STATUS_PARKED
                elif name == "sleep_us":
                    time.sleep(arg / 1e6)   # lets it run a while; the end state cannot depend on it
                elif name == "stop_ahead":
                    v.pause()
                    v.set_stop_step(min(target, v.counters()[0] + arg))
                elif name == "throttle":
                    v.set_throttle(arg)
                else:
                    v.set_pace(arg)
            v.pause()
            assert v.counters()[0] <= target
            v.set_throttle(0)
            v.set_pace(0)
            v.set_stop_step(target)
            v.resume()
            assert v.wait_parked(PATIENCE_S)
            s = v.get_state()
            states.append((list(s.regs), s.pc, s.steps, bytes(m.bytes[DATA:DATA + 4096])))
            v.close()
    assert states[0] == states[1]
    assert states[0][2] == target


def test_a_vcpu_thread_is_named_after_its_index(mem):
    v = VCpu(mem, 3)
    try:
        names = [open(f"/proc/self/task/{t}/comm").read().strip()
                 for t in os.listdir("/proc/self/task")]
        assert "lm-vcpu-3" in names, names
    finally:
        v.close()

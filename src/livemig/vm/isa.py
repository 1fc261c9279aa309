"""The toy ISA: one table of opcodes, their operand forms, and the encoding.

An instruction is 8 bytes, little-endian: ``u8 opcode, u8 rd, u8 ra, u8 rb,
i32 imm``. There are 16 general 64-bit registers ``r0..r15``. Branch and jump
offsets are in bytes, relative to the branching instruction. Opcode 0 is
invalid on purpose: a vCPU that runs into zeroed memory faults.

The numbers repeat ``LM_OP_*`` in csrc/livemig.h (the interpreter's side of
the contract); tests/native/test_vcpu.py checks that both agree. This module
is pure: no native code, so the assembler runs anywhere.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..units import PAGE_SIZE

INSN_BYTES = 8
NREGS = 16
WORDS_PER_PAGE = PAGE_SIZE // 8

# Operand forms (what the assembler accepts after the mnemonic):
#   ""        no operands                       HALT
#   "d"       rd                                RAND r1
#   "a"       ra                                OUT r1 / JR r1
#   "di"      rd, imm                           LI r1, 5
#   "da"      rd, ra                            MOV r1, r2 / PSUM r1, r2
#   "dab"     rd, ra, rb                        ADD r1, r2, r3
#   "dai"     rd, ra, imm                       ADDI r1, r2, -1
#   "dm"      rd, [ra + imm]                    LD r1, [r2 + 8] / ST r1, [r2]
#   "abt"     ra, rb, target                    BEQ r1, r2, loop
#   "t"       target                            JMP loop
#   "dt"      rd, target                        JAL r15, func
#   "i"       imm                               FAIL 0x4d54


@dataclass(frozen=True)
class Op:
    name: str
    code: int
    form: str
    doc: str


OPS: tuple[Op, ...] = (
    Op("HALT", 1, "", "stop; status HALTED"),
    Op("LI", 2, "di", "rd = sign-extended imm"),
    Op("LIH", 3, "di", "rd = low32(rd) | imm << 32"),
    Op("MOV", 4, "da", "rd = ra"),
    Op("ADD", 5, "dab", "rd = ra + rb"),
    Op("SUB", 6, "dab", "rd = ra - rb"),
    Op("MUL", 7, "dab", "rd = ra * rb"),
    Op("AND", 8, "dab", "rd = ra & rb"),
    Op("OR", 9, "dab", "rd = ra | rb"),
    Op("XOR", 10, "dab", "rd = ra ^ rb"),
    Op("SHL", 11, "dab", "rd = ra << (rb & 63)"),
    Op("SHR", 12, "dab", "rd = ra >> (rb & 63), logical"),
    Op("MODU", 13, "dab", "rd = ra % rb, unsigned; rb == 0 faults"),
    Op("ADDI", 14, "dai", "rd = ra + imm"),
    Op("MULI", 15, "dai", "rd = ra * imm"),
    Op("ANDI", 16, "dai", "rd = ra & imm (sign-extended)"),
    Op("ORI", 17, "dai", "rd = ra | imm (sign-extended)"),
    Op("XORI", 18, "dai", "rd = ra ^ imm (sign-extended)"),
    Op("SHLI", 19, "dai", "rd = ra << (imm & 63)"),
    Op("SHRI", 20, "dai", "rd = ra >> (imm & 63)"),
    Op("MODUI", 21, "dai", "rd = ra % u32(imm); imm == 0 faults"),
    Op("LD", 22, "dm", "rd = u64 [ra + imm], 8-byte aligned"),
    Op("ST", 23, "dm", "u64 [ra + imm] = rd, 8-byte aligned"),
    Op("LDB", 24, "dm", "rd = u8 [ra + imm]"),
    Op("STB", 25, "dm", "u8 [ra + imm] = low8(rd)"),
    Op("BEQ", 26, "abt", "if ra == rb: jump"),
    Op("BNE", 27, "abt", "if ra != rb: jump"),
    Op("BLTU", 28, "abt", "if ra < rb (unsigned): jump"),
    Op("BGEU", 29, "abt", "if ra >= rb (unsigned): jump"),
    Op("JMP", 30, "t", "jump"),
    Op("JAL", 31, "dt", "rd = return address; jump"),
    Op("JR", 32, "a", "pc = ra"),
    Op("RAND", 33, "d", "rd = next splitmix64 output of the vCPU's PRNG"),
    Op("OUT", 34, "a", "write low8(ra) to this vCPU's console"),
    Op("CLOCK", 35, "d", "rd = virtual clock (clock_base + retired steps)"),
    Op("PSUM", 36, "da", "rd = page checksum of the page holding address ra"),
    Op("TICK", 37, "", "one unit of paced work (timing only)"),
    Op("FAIL", 38, "i", "guest-detected error: status FAULTED, fault code imm"),
    Op("NOP", 39, "", "nothing"),
)

BY_NAME: dict[str, Op] = {op.name: op for op in OPS}
BY_CODE: dict[int, Op] = {op.code: op for op in OPS}

# What a host must offer to run a guest from here (checked by a destination
# before any page travels, as QEMU checks CPU models): the ISA revision, which
# grows when opcodes are added, and the named vCPU devices beyond plain
# arithmetic and memory that guests may use.
ISA_REVISION = 1
VCPU_FEATURES = frozenset({"rand", "console", "clock", "psum"})

# vCPU status values and native fault codes (csrc/livemig.h, LM_VCPU_*).
STATUS_PARKED = 1
STATUS_RUNNING = 2
STATUS_HALTED = 3
STATUS_FAULTED = 4
STATUS_NAMES = {1: "parked", 2: "running", 3: "halted", 4: "faulted"}

FAULT_BAD_OPCODE = 0x80000001
FAULT_BAD_ADDRESS = 0x80000002
FAULT_BAD_PC = 0x80000003
FAULT_MISALIGNED = 0x80000004
FAULT_BAD_REGISTER = 0x80000005
FAULT_DIVIDE = 0x80000006
FAULT_NAMES = {
    FAULT_BAD_OPCODE: "bad opcode",
    FAULT_BAD_ADDRESS: "address outside guest memory",
    FAULT_BAD_PC: "pc misaligned or outside guest memory",
    FAULT_MISALIGNED: "misaligned 64-bit access",
    FAULT_BAD_REGISTER: "register field out of range",
    FAULT_DIVIDE: "division by zero",
}
MAX_FAIL_CODE = 0x7FFFFFFF  # FAIL codes stay below the native ones

_INSN = struct.Struct("<BBBBi")
MASK64 = (1 << 64) - 1


def encode(code: int, rd: int = 0, ra: int = 0, rb: int = 0, imm: int = 0) -> bytes:
    """One instruction's 8 bytes; raises ValueError on out-of-range fields."""
    if code not in BY_CODE:
        raise ValueError(f"unknown opcode {code}")
    for name, reg in (("rd", rd), ("ra", ra), ("rb", rb)):
        if not 0 <= reg < NREGS:
            raise ValueError(f"{name} must be a register 0..{NREGS - 1}, got {reg}")
    if not -(1 << 31) <= imm < (1 << 31):
        raise ValueError(f"immediate {imm} does not fit in 32 signed bits")
    return _INSN.pack(code, rd, ra, rb, imm)


def decode(insn: bytes) -> tuple[int, int, int, int, int]:
    """(opcode, rd, ra, rb, imm) of one 8-byte instruction."""
    return _INSN.unpack(insn)


def page_sum(words) -> int:
    """What PSUM computes over one page given as 512 uint64 words (numpy)."""
    import numpy as np

    w = np.asarray(words, dtype=np.uint64)
    weights = np.arange(1, 2 * WORDS_PER_PAGE, 2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(w * weights, dtype=np.uint64))

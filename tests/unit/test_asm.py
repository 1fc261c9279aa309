"""The ISA table and the assembler (pure Python, no native code)."""
import pytest
from hypothesis import given, strategies as st

from livemig.errors import AsmError
from livemig.vm import asm, isa


def test_isa_table_is_consistent():
    codes = [op.code for op in isa.OPS]
    assert len(set(codes)) == len(codes) and 0 not in codes
    assert len(isa.BY_NAME) == len(isa.OPS)


@given(op=st.sampled_from(isa.OPS), rd=st.integers(0, 15), ra=st.integers(0, 15),
       rb=st.integers(0, 15), imm=st.integers(-(1 << 31), (1 << 31) - 1))
def test_encode_decode_round_trip(op, rd, ra, rb, imm):
    raw = isa.encode(op.code, rd, ra, rb, imm)
    assert len(raw) == isa.INSN_BYTES
    assert isa.decode(raw) == (op.code, rd, ra, rb, imm)


@pytest.mark.parametrize("kwargs", [dict(code=0), dict(code=1, rd=16), dict(code=1, imm=1 << 31)])
def test_encode_refuses_bad_fields(kwargs):
    with pytest.raises(ValueError):
        isa.encode(**kwargs)


def test_labels_branches_and_memory_operands():
    code = asm.assemble("""
    start:  li   r1, 5        ; comment
    loop:   addi r1, r1, -1   # other comment
            st   r1, [r2 + 8]
            ld   r3, [r2-16]
            ldb  r4, [r2]
            bne  r1, r0, loop
            li   r5, @start
            jal  r15, start
            halt
    """, origin=0x2000)
    insns = [isa.decode(code[i:i + 8]) for i in range(0, len(code), 8)]
    assert insns[0] == (isa.BY_NAME["LI"].code, 1, 0, 0, 5)
    assert insns[2] == (isa.BY_NAME["ST"].code, 1, 2, 0, 8)
    assert insns[3] == (isa.BY_NAME["LD"].code, 3, 2, 0, -16)
    assert insns[4] == (isa.BY_NAME["LDB"].code, 4, 2, 0, 0)
    assert insns[5] == (isa.BY_NAME["BNE"].code, 0, 1, 0, -32)   # back to loop
    assert insns[6][4] == 0x2000                                   # @start is absolute
    assert insns[7] == (isa.BY_NAME["JAL"].code, 15, 0, 0, -56)
    assert asm.disassemble(code, origin=0x2000)[5] == "0x00002028: bne r1, r0, 0x2008"


def test_constants_chars_and_li64():
    code = asm.assemble("li r1, ' '\nli r2, -N\nli64 r3, BIG", constants={"N": 7, "BIG": 1 << 63})
    li, lih = isa.BY_NAME["LI"].code, isa.BY_NAME["LIH"].code
    assert isa.decode(code[0:8])[4] == 32
    assert isa.decode(code[8:16])[4] == -7
    assert isa.decode(code[16:24]) == (li, 3, 0, 0, 0)
    assert isa.decode(code[24:32]) == (lih, 3, 0, 0, -(1 << 31))


@given(st.integers(0, (1 << 64) - 1))
def test_li64_reconstructs_every_value(value):
    code = asm.assemble("li64 r1, V", constants={"V": value})
    _, _, _, _, lo = isa.decode(code[:8])
    _, _, _, _, hi = isa.decode(code[8:])
    reg = lo & isa.MASK64                                 # LI sign-extends
    reg = (reg & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)  # LIH replaces the high half
    assert reg == value


@pytest.mark.parametrize("source,needle", [
    ("frob r1", "unknown mnemonic"),
    ("li r16, 1", "register"),
    ("add r1, r2", "takes 3"),
    ("li r1, 0x1ffffffff", "does not fit"),
    ("jmp nowhere", "unknown label"),
    ("a:\na:\nhalt", "defined twice"),
    ("ld r1, r2", "memory operand"),
    ("li r1, UNKNOWN", "unknown constant"),
    ("fail 0", "FAIL code"),
    ("li r1, 12abc", "cannot read"),
])
def test_errors_name_the_line(source, needle):
    with pytest.raises(AsmError) as ei:
        asm.assemble("nop\n" + source)
    assert needle in str(ei.value)
    assert ei.value.line is not None and ei.value.line >= 2


def test_origin_must_be_aligned():
    with pytest.raises(AsmError):
        asm.assemble("halt", origin=4)

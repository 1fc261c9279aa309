"""A small two-pass assembler for the toy ISA (see isa.py).

Syntax, one statement per line::

    loop:                     ; a label (may share its line with an instruction)
        li64  r1, 0x123456789 ; pseudo: LI + LIH, any 64-bit value
        addi  r2, r2, -1      ; immediates: decimal, 0x.., 'c', or a named constant
        st    r2, [r1 + 8]    ; memory operands [reg], [reg + imm], [reg - imm]
        bne   r2, r0, loop    ; branch targets are labels (or byte offsets)
        li    r3, @loop       ; @label: the label's absolute address

Comments start with ``;`` or ``#``. Named constants come from the
``constants`` argument, so workload builders write readable text with the
layout numbers passed in. ``assemble`` returns the program's bytes, to be
placed at ``origin`` in guest memory (absolute addresses depend on it).
"""
from __future__ import annotations

import re

from ..errors import AsmError
from . import isa

_LABEL_RE = re.compile(r"^([A-Za-z_.][\w.]*)\s*:\s*(.*)$")
_REG_RE = re.compile(r"^[rR](\d+)$")
_MEM_RE = re.compile(r"^\[\s*([rR]\d+)\s*(?:([+-])\s*(.+?))?\s*\]$")
_NAME_RE = re.compile(r"^[A-Za-z_][\w.]*$")
_PSEUDO_SIZES = {"LI64": 2}


def _strip_comment(line: str) -> str:
    # a ';' or '#' inside a character literal is not a comment
    out, quoted = [], False
    for ch in line:
        if ch == "'":
            quoted = not quoted
        elif ch in ";#" and not quoted:
            break
        out.append(ch)
    return "".join(out).strip()


def _split_operands(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    last = "".join(cur).strip()
    if last or parts:
        parts.append(last)
    return parts


class _Assembler:
    def __init__(self, origin: int, constants: dict[str, int]):
        self.origin = origin
        self.constants = dict(constants)
        self.labels: dict[str, int] = {}

    def reg(self, tok: str, lineno: int) -> int:
        m = _REG_RE.match(tok)
        if not m or not 0 <= int(m.group(1)) < isa.NREGS:
            raise AsmError(f"expected a register r0..r{isa.NREGS - 1}, got {tok!r}", line=lineno)
        return int(m.group(1))

    def value(self, tok: str, lineno: int) -> int:
        tok = tok.strip()
        if len(tok) == 3 and tok[0] == tok[2] == "'":
            return ord(tok[1])
        if tok.startswith("@"):
            name = tok[1:]
            if name not in self.labels:
                raise AsmError(f"unknown label {name!r}", line=lineno)
            return self.labels[name]
        neg = tok.startswith("-")
        body = tok[1:].strip() if neg else tok
        if _NAME_RE.match(body):
            if body not in self.constants:
                raise AsmError(f"unknown constant {body!r}", line=lineno)
            v = self.constants[body]
        else:
            try:
                v = int(body, 0)
            except ValueError:
                raise AsmError(f"cannot read {tok!r} as a number", line=lineno) from None
        return -v if neg else v

    def imm32(self, tok: str, lineno: int) -> int:
        v = self.value(tok, lineno)
        if -(1 << 31) <= v < (1 << 31):
            return v
        if 0 <= v < (1 << 32):  # an unsigned 32-bit pattern, e.g. a mask
            return v - (1 << 32) if v >= (1 << 31) else v
        raise AsmError(f"immediate {tok!r} = {v} does not fit in 32 bits (use li64)", line=lineno)

    def target(self, tok: str, here: int, lineno: int) -> int:
        if tok in self.labels:
            return self.labels[tok] - here
        if _NAME_RE.match(tok):
            raise AsmError(f"unknown label {tok!r}", line=lineno)
        return self.imm32(tok, lineno)

    def mem(self, tok: str, lineno: int) -> tuple[int, int]:
        m = _MEM_RE.match(tok)
        if not m:
            raise AsmError(f"expected a memory operand like [r1 + 8], got {tok!r}", line=lineno)
        base = self.reg(m.group(1), lineno)
        off = 0
        if m.group(3) is not None:
            off = self.imm32(m.group(3), lineno)
            if m.group(2) == "-":
                off = -off
        return base, off


def _statements(source: str):
    """(lineno, label or None, mnemonic or None, operand text)."""
    for lineno, raw in enumerate(source.splitlines(), 1):
        text = _strip_comment(raw)
        while text:
            m = _LABEL_RE.match(text)
            if m:
                yield lineno, m.group(1), None, ""
                text = m.group(2).strip()
                continue
            mnemonic, _, rest = text.partition(" ")
            yield lineno, None, mnemonic.upper(), rest.strip()
            break


def assemble(source: str, *, origin: int = 0, constants: dict[str, int] | None = None) -> bytes:
    """Assemble ``source`` for placement at byte address ``origin``."""
    if origin % isa.INSN_BYTES:
        raise AsmError(f"origin {origin:#x} is not {isa.INSN_BYTES}-byte aligned")
    a = _Assembler(origin, constants or {})
    stmts = list(_statements(source))
    # pass 1: addresses of labels
    addr = origin
    for lineno, label, mnemonic, _ in stmts:
        if label is not None:
            if label in a.labels:
                raise AsmError(f"label {label!r} defined twice", line=lineno)
            a.labels[label] = addr
        elif mnemonic in _PSEUDO_SIZES:
            addr += isa.INSN_BYTES * _PSEUDO_SIZES[mnemonic]
        elif mnemonic in isa.BY_NAME:
            addr += isa.INSN_BYTES
        else:
            raise AsmError(f"unknown mnemonic {mnemonic!r}", line=lineno)
    # pass 2: encoding
    out = bytearray()
    for lineno, label, mnemonic, rest in stmts:
        if label is not None:
            continue
        here = origin + len(out)
        ops = _split_operands(rest)
        if mnemonic == "LI64":
            if len(ops) != 2:
                raise AsmError("LI64 takes rd, value", line=lineno)
            rd = a.reg(ops[0], lineno)
            v = a.value(ops[1], lineno) & isa.MASK64
            lo, hi = v & 0xFFFFFFFF, v >> 32
            out += isa.encode(isa.BY_NAME["LI"].code, rd, imm=lo - (1 << 32) if lo >> 31 else lo)
            out += isa.encode(isa.BY_NAME["LIH"].code, rd, imm=hi - (1 << 32) if hi >> 31 else hi)
            continue
        op = isa.BY_NAME[mnemonic]
        form = op.form
        want = {"": 0, "d": 1, "a": 1, "di": 2, "da": 2, "dab": 3, "dai": 3, "dm": 2,
                "abt": 3, "t": 1, "dt": 2, "i": 1}[form]
        if len(ops) != want:
            raise AsmError(f"{mnemonic} takes {want} operand(s), got {len(ops)}", line=lineno)
        rd = ra = rb = imm = 0
        if form == "d":
            rd = a.reg(ops[0], lineno)
        elif form == "a":
            ra = a.reg(ops[0], lineno)
        elif form == "di":
            rd, imm = a.reg(ops[0], lineno), a.imm32(ops[1], lineno)
        elif form == "da":
            rd, ra = a.reg(ops[0], lineno), a.reg(ops[1], lineno)
        elif form == "dab":
            rd, ra, rb = (a.reg(t, lineno) for t in ops)
        elif form == "dai":
            rd, ra, imm = a.reg(ops[0], lineno), a.reg(ops[1], lineno), a.imm32(ops[2], lineno)
        elif form == "dm":
            rd = a.reg(ops[0], lineno)
            ra, imm = a.mem(ops[1], lineno)
        elif form == "abt":
            ra, rb = a.reg(ops[0], lineno), a.reg(ops[1], lineno)
            imm = a.target(ops[2], here, lineno)
        elif form == "t":
            imm = a.target(ops[0], here, lineno)
        elif form == "dt":
            rd, imm = a.reg(ops[0], lineno), a.target(ops[1], here, lineno)
        elif form == "i":
            imm = a.imm32(ops[0], lineno)
            if mnemonic == "FAIL" and not 0 < imm <= isa.MAX_FAIL_CODE:
                raise AsmError(f"FAIL code must be 1..{isa.MAX_FAIL_CODE:#x}", line=lineno)
        out += isa.encode(op.code, rd, ra, rb, imm)
    return bytes(out)


def disassemble(code: bytes, *, origin: int = 0) -> list[str]:
    """One line per instruction, for error messages and debugging."""
    lines = []
    for off in range(0, len(code) - len(code) % isa.INSN_BYTES, isa.INSN_BYTES):
        opc, rd, ra, rb, imm = isa.decode(code[off:off + isa.INSN_BYTES])
        op = isa.BY_CODE.get(opc)
        addr = origin + off
        if op is None:
            lines.append(f"{addr:#010x}: .invalid {opc}")
            continue
        f = op.form
        args = {"": "", "d": f"r{rd}", "a": f"r{ra}", "di": f"r{rd}, {imm}",
                "da": f"r{rd}, r{ra}", "dab": f"r{rd}, r{ra}, r{rb}",
                "dai": f"r{rd}, r{ra}, {imm}", "dm": f"r{rd}, [r{ra} + {imm}]",
                "abt": f"r{ra}, r{rb}, {addr + imm:#x}", "t": f"{addr + imm:#x}",
                "dt": f"r{rd}, {addr + imm:#x}", "i": f"{imm}"}[f]
        lines.append(f"{addr:#010x}: {op.name.lower()} {args}".rstrip())
    return lines

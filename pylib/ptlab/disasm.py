"""``ptlab disasm``: instructions at a VA, read through the page tables, decoded by capstone
(the architecture's CS_ARCH/CS_MODE from :class:`ptlab.arch.ArchOps`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import arch_for
from .formats.base import Attrs, Format
from .walk import translate


class DisasmError(ValueError):
    """The VA cannot be disassembled (not mapped, not executable without force)."""


@dataclass(frozen=True, slots=True)
class Insn:
    va: int
    pa: int
    raw: bytes
    mnemonic: str
    operands: str


def read_va(fmt: Format, mem: Any, root: int, va: int, size: int) -> tuple[bytes, list[int]]:
    """Up to ``size`` bytes at ``va`` through the tables, page by page (stops at the first
    unmapped page); the bytes and the PA of each page's first byte read."""
    out, pas = bytearray(), []
    while len(out) < size:
        t = translate(fmt, mem, root, (va + len(out)) & ((1 << 64) - 1))
        if t.fault is not None or t.pa is None or t.page_size is None:
            break
        n = min(size - len(out), t.page_size - t.pa % t.page_size)
        out += mem.read(t.pa, n)
        pas.append(t.pa)
    return bytes(out), pas


def disassemble(fmt: Format, mem: Any, root: int, va: int, count: int,
                force: bool = False) -> tuple[Attrs, list[Insn]]:
    """``count`` instructions at ``va`` and the mapping's (effective) attributes; refuses a
    mapping the kernel cannot execute unless ``force``."""
    import capstone

    t = translate(fmt, mem, root, va)
    if t.fault is not None or t.attrs is None or t.pa is None:
        raise DisasmError(f"VA {va:#x} is not mapped ({t.fault})")
    if not t.attrs.exec and not force:
        raise DisasmError(f"VA {va:#x} is not executable (a non-executable mapping); "
                          "--force to disassemble it anyway")
    ops = arch_for(fmt)
    data, _ = read_va(fmt, mem, root, va, count * ops.max_insn)
    cs = capstone.Cs(getattr(capstone, ops.capstone[0]), getattr(capstone, ops.capstone[1]))
    # Words that are no instruction come out as ".byte" (4 bytes on arm64) and decoding goes
    # on, as objdump does: Linux 6.12 arm64 (DYNAMIC_FTRACE_WITH_CALL_OPS) keeps an 8-byte
    # ftrace_ops pointer in front of each function, _stext's included.
    cs.skipdata = True
    out = []
    for insn in cs.disasm(data, va, count):
        off = insn.address - va
        tr = translate(fmt, mem, root, insn.address)
        out.append(Insn(insn.address, tr.pa if tr.pa is not None else -1, bytes(insn.bytes),
                        insn.mnemonic, insn.op_str))
        if off + insn.size >= len(data):
            break
    return t.attrs, out

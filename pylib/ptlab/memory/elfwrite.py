"""Write ELF64 little-endian core files shaped like QEMU's ``dump-guest-memory`` output.

For tests and the harness: a model memory image becomes a core that :class:`ElfCore` (and
crash/gdb) can read. Layout as QEMU writes it: ELF header, PT_NOTE, PT_LOADs, [section header 0
when e_phnum overflows], notes, memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..arch import all_arches, arch_for
from .elfcore import (
    EHDR,
    ET_CORE,
    NT_PRSTATUS,
    PHDR,
    PN_XNUM,
    PRSTATUS_PID_OFFSET,
    PRSTATUS_REG_OFFSET,
    PT_LOAD,
    PT_NOTE,
    QEMU_CPUSTATE_CR_OFFSET,
    QEMU_CPUSTATE_REGS,
    QEMU_CPUSTATE_SIZE,
    SHDR,
)
from .sparse import SparseMemory

MACHINE_CODES = {ops.name: ops.elf_machines[0] for ops in all_arches()}  # e_machine written


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One PT_LOAD to write: ``data`` at ``paddr``; ``memsz`` > len(data) adds a zero tail."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


def note(name: str, ntype: int, desc: bytes) -> bytes:
    """One ELF note with 4-byte aligned name and desc."""
    raw = name.encode() + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(raw), len(desc), ntype) + pad(raw) + pad(desc)


def prstatus(machine: str, regs: Mapping[str, int], pid: int = 1) -> bytes:
    """NT_PRSTATUS desc (struct elf_prstatus) for ``machine`` with ``regs`` by name."""
    ops = arch_for(machine)
    names = ops.prstatus_regs
    desc = bytearray(ops.prstatus_size)
    struct.pack_into("<I", desc, PRSTATUS_PID_OFFSET, pid)
    struct.pack_into(f"<{len(names)}Q", desc, PRSTATUS_REG_OFFSET,
                     *(regs.get(n, 0) for n in names))
    return bytes(desc)


def qemu_cpustate(cr: Sequence[int], regs: Mapping[str, int] | None = None) -> bytes:
    """QEMU's x86 ``QEMUCPUState`` note desc (version 1) with CR0..CR4 = ``cr``."""
    desc = bytearray(QEMU_CPUSTATE_SIZE)
    struct.pack_into("<II", desc, 0, 1, QEMU_CPUSTATE_SIZE)
    regs = regs or {}
    struct.pack_into("<18Q", desc, 8, *(regs.get(n, 0) for n in QEMU_CPUSTATE_REGS))
    struct.pack_into("<5Q", desc, QEMU_CPUSTATE_CR_OFFSET, *cr)
    return bytes(desc)


def cpu_notes(machine: str, cr3: int | None = None, cr4: int = 0,
              regs: Mapping[str, int] | None = None, ncpus: int = 1) -> list[bytes]:
    """The per-CPU notes QEMU writes: NT_PRSTATUS for each CPU, then (x86) a QEMU note each."""
    regs = regs or {}
    out = [note("CORE", NT_PRSTATUS, prstatus(machine, regs, pid=i + 1)) for i in range(ncpus)]
    if arch_for(machine).qemu_cpustate_note:
        cr = (0x8005_0033, 0, 0, cr3 or 0, cr4)
        out += [note("QEMU", 0, qemu_cpustate(cr, regs)) for _ in range(ncpus)]
    return out


def vmcoreinfo_note(text: str) -> bytes:
    return note("VMCOREINFO", 0, text.encode())


def write_core(path: str | os.PathLike[str], machine: str, loads: Iterable[LoadSpec],
               notes: Iterable[bytes] = (), *, force_xnum: bool = False) -> None:
    """Write an ELF64 LE ET_CORE file: one PT_NOTE holding ``notes`` (raw, from :func:`note`),
    then one PT_LOAD per ``loads`` entry. ``force_xnum`` uses the PN_XNUM section header even
    for few segments (to test readers)."""
    loads = list(loads)
    note_blob = b"".join(notes)
    phnum = 1 + len(loads)
    xnum = force_xnum or phnum >= PN_XNUM
    phoff = EHDR.size
    shoff = phoff + phnum * PHDR.itemsize
    note_off = shoff + (SHDR.size if xnum else 0)
    data_off = note_off + len(note_blob)
    ehdr = EHDR.pack(
        b"\x7fELF\x02\x01\x01" + bytes(9), ET_CORE, MACHINE_CODES[machine], 1, 0, phoff,
        shoff if xnum else 0, 0, EHDR.size, PHDR.itemsize, PN_XNUM if xnum else phnum,
        SHDR.size if xnum else 0, 1 if xnum else 0, 0,
    )
    phdrs = bytearray()
    phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(note_blob),
                         len(note_blob), 0)
    off = data_off
    for ld in loads:
        memsz = len(ld.data) if ld.memsz is None else ld.memsz
        if memsz < len(ld.data):
            raise ValueError(f"load at {ld.paddr:#x}: memsz {memsz:#x} < data {len(ld.data):#x}")
        vaddr = ld.paddr if ld.vaddr is None else ld.vaddr
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 0, off if ld.data else 0, vaddr, ld.paddr,
                             len(ld.data), memsz, 0)
        off += len(ld.data)
    with open(path, "wb") as f:
        f.write(ehdr)
        f.write(phdrs)
        if xnum:
            f.write(SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
        f.write(note_blob)
        for ld in loads:
            f.write(ld.data)


def loads_from_sparse(mem: SparseMemory, ranges: Iterable[tuple[int, int]]) -> list[LoadSpec]:
    """PT_LOADs holding ``mem``'s bytes over each [start, end) range (e.g. the guest's RAM)."""
    return [LoadSpec(s, mem.read(s, e - s)) for s, e in ranges]

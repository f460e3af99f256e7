"""ELF64 little-endian core files as physical memory: QEMU ``dump-guest-memory`` and kdump.

Layout facts (qemu dump/dump.c, target/{i386,arm}/arch_dump.c; the kernel's /proc/vmcore):
one or more PT_NOTE segments (per-CPU ``CORE``/NT_PRSTATUS notes, QEMU's ``QEMU`` CPU-state
note on x86 with the control registers, and a ``VMCOREINFO`` note when the guest published
one), then PT_LOAD segments whose ``p_paddr`` is the guest physical address. ``p_filesz <
p_memsz`` means the tail reads as zero; ``p_filesz == 0`` segments (filtered out by QEMU, with
``p_offset == -1``) hold only zeros. With more than 65534 segments ``e_phnum`` is PN_XNUM and
section header 0's ``sh_info`` has the count.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ..arch import all_arches, arch_for
from .base import MemoryError_
from .raw import FileMemory, Segment, open_regular, pread_exact
from .vmcoreinfo import VmcoreInfo

EM_ARM = 40
# e_machine -> architecture (ptlab.arch): QEMU writes an ELF64 core with EM_386 when the first
# x86 CPU is not in long mode (target/i386/arch_dump.c cpu_get_dump_info): same x86 RAM.
MACHINES = {m: ops.name for ops in all_arches() for m in ops.elf_machines}
_OTHER_MACHINES = {EM_ARM: "arm (EM_ARM)"}
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
NT_PRSTATUS, NT_PRFPREG = 1, 2
MAX_PHNUM = 1 << 20  # program headers read at most (real cores: one per RAM range)
MAX_NOTE_BYTES = 64 << 20  # note bytes read at most (real cores: a few KiB per CPU)

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = np.dtype(
    [("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"),
     ("paddr", "<u8"), ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")]
)  # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes

# struct elf_prstatus (64-bit): pr_reg at offset 112.
PRSTATUS_REG_OFFSET = 112
PRSTATUS_PID_OFFSET = 32
# pr_reg names and sizeof(struct elf_prstatus): ArchOps.prstatus_regs / prstatus_size.
# QEMU's QEMUCPUState (target/i386/arch_dump.c, version 1): version, size, 18 u64 registers,
# 10 segments of 24 bytes, cr[5].
QEMU_CPUSTATE_REGS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "rflags",
)
QEMU_CPUSTATE_CR_OFFSET = 8 + 18 * 8 + 10 * 24
QEMU_CPUSTATE_SIZE = QEMU_CPUSTATE_CR_OFFSET + 5 * 8


class ElfCoreError(MemoryError_, ValueError):
    """A file that is not a usable ELF64 little-endian core (one clear message)."""


class WrongArch(ElfCoreError):
    """The core's machine is not the one asked for."""


@dataclass(frozen=True, slots=True)
class Load:
    """One PT_LOAD program header."""

    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True, slots=True)
class Note:
    name: str
    type: int
    desc: bytes


@dataclass(slots=True)
class CpuState:
    """Registers of one CPU gathered from its notes (what the dump writer recorded)."""

    index: int  # order of the CPU's NT_PRSTATUS note (0-based)
    pid: int | None = None  # pr_pid (QEMU writes cpu_index + 1)
    regs: dict[str, int] = field(default_factory=dict)  # general registers (NT_PRSTATUS)
    cr: tuple[int, ...] | None = None  # x86 CR0..CR4 from QEMU's "QEMU" note

    @property
    def cr3(self) -> int | None:
        return self.cr[3] if self.cr else None

    @property
    def cr4(self) -> int | None:
        return self.cr[4] if self.cr else None

    @property
    def control(self) -> dict[str, int]:
        """Control registers by lower-case name (``cr0`` .. ``cr4``), empty when not recorded:
        the ``regs`` :mod:`ptlab.arch` infers the format and root from."""
        return {f"cr{i}": v for i, v in enumerate(self.cr)} if self.cr else {}


def parse_notes(data: bytes, where: str = "PT_NOTE") -> list[Note]:
    """ELF notes (4-byte aligned name and desc, as Linux and QEMU write them)."""
    notes = []
    pos, end = 0, len(data)
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break  # the kernel's final_note terminator / zero padding
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        nxt = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > end:
            raise ElfCoreError(
                f"{where}: note at offset {pos:#x} (namesz {namesz}, descsz {descsz}) "
                f"runs past the segment end ({end:#x}); file truncated or corrupt"
            )
        name = data[name_at : name_at + namesz].split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(Note(name, ntype, bytes(data[desc_at : desc_at + descsz])))
        pos = nxt
    return notes


def cpu_states(notes: list[Note], machine: str) -> list[CpuState]:
    """The CPUs the notes describe: NT_PRSTATUS registers, QEMU's control-register notes."""
    cpus: list[CpuState] = []
    qemu_states = []
    for n in notes:
        if n.name == "CORE" and n.type == NT_PRSTATUS:
            ops = arch_for(machine)
            names = ops.prstatus_regs
            cpu = CpuState(len(cpus))
            if len(n.desc) >= PRSTATUS_PID_OFFSET + 4:
                cpu.pid = int.from_bytes(n.desc[PRSTATUS_PID_OFFSET : PRSTATUS_PID_OFFSET + 4],
                                         "little")
            nregs = len(names)
            if len(n.desc) == ops.prstatus_size:  # EM_386 cores carry 32-bit ones
                vals = struct.unpack_from(f"<{nregs}Q", n.desc, PRSTATUS_REG_OFFSET)
                cpu.regs = dict(zip(names, vals, strict=True))
            cpus.append(cpu)
        elif n.name == "QEMU" and len(n.desc) >= QEMU_CPUSTATE_SIZE:
            version, size = struct.unpack_from("<II", n.desc, 0)
            if version == 1 and size >= QEMU_CPUSTATE_SIZE:
                qemu_states.append(n.desc)
    for i, desc in enumerate(qemu_states):
        if i == len(cpus):
            cpus.append(CpuState(i))
        cpu = cpus[i]
        cpu.cr = struct.unpack_from("<5Q", desc, QEMU_CPUSTATE_CR_OFFSET)
        regs = struct.unpack_from("<18Q", desc, 8)
        for k, v in zip(QEMU_CPUSTATE_REGS, regs, strict=True):
            cpu.regs.setdefault(k, v)
    return cpus


class ElfCore(FileMemory):
    """Physical memory of an ELF64 LE core file (QEMU ``dump-guest-memory``, kdump vmcore).

    Attributes: ``machine`` ("x86_64" | "arm64"; an ELF64 EM_386 core, which QEMU writes
    for an x86 guest outside long mode, counts as "x86_64"), ``e_machine``, ``loads``
    (PT_LOAD headers in file order), ``notes``, ``vmcoreinfo`` (:class:`VmcoreInfo` or
    None), ``cpus`` (:class:`CpuState` per CPU). Memory is addressed by ``p_paddr``; loads
    that alias one PA (QEMU ``paging=true`` dumps) are read from the first covering it.
    Raises :class:`ElfCoreError` (:class:`WrongArch` when ``arch`` is given and differs).
    """

    def __init__(self, path: str | os.PathLike[str], arch: str | None = None) -> None:
        self.path = os.fspath(path)
        fd, size = open_regular(path)
        try:
            segs = self._parse(fd, size, arch)
        except BaseException:
            os.close(fd)
            raise
        self._attach(fd, size, segs)

    # --- parsing --------------------------------------------------------------------------
    def _fail(self, msg: str) -> ElfCoreError:
        return ElfCoreError(f"{self.path}: {msg}")

    def _parse(self, fd: int, size: int, arch: str | None) -> list[Segment]:
        def at(offset: int, n: int) -> bytes:
            return pread_exact(fd, n, offset, self.path)

        buf = at(0, min(size, EHDR.size))
        if size < 4 or buf[:4] != b"\x7fELF":
            head = bytes(buf[:16])
            if head.startswith(b"makedumpfile"):
                raise self._fail("flattened kdump-compressed file (QEMU kdump-* format / "
                                 "makedumpfile -F), not ELF; open it with --dump")
            if head.startswith((b"KDUMP   ", b"DISKDUMP")):
                raise self._fail("kdump-compressed file, not ELF; open it with --dump")
            raise self._fail("not an ELF file (no \\x7fELF magic)")
        if size < EHDR.size:
            raise self._fail(f"truncated ELF header ({size} of {EHDR.size} bytes)")
        (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize,
         e_phentsize, e_phnum, e_shentsize, e_shnum, _shstrndx) = EHDR.unpack_from(buf, 0)
        if ident[4] == 1:
            raise self._fail(
                "32-bit ELF (ELFCLASS32) is not supported; QEMU writes ELF32 when the guest "
                "CPU is not in 64-bit mode"
            )
        if ident[4] != 2:
            raise self._fail(f"unknown ELF class {ident[4]}")
        if ident[5] == 2:
            raise self._fail("big-endian ELF (ELFDATA2MSB) is not supported")
        if ident[5] != 1:
            raise self._fail(f"unknown ELF data encoding {ident[5]}")
        if e_type != ET_CORE:
            raise self._fail(f"not a core file (e_type {e_type}, want ET_CORE {ET_CORE})")
        machine = MACHINES.get(e_machine)
        if machine is None:
            what = _OTHER_MACHINES.get(e_machine, f"e_machine {e_machine}")
            raise self._fail(f"unsupported machine {what}; ptlab reads x86_64 and arm64 cores")
        if arch is not None and arch != machine:
            raise WrongArch(f"{self.path}: core is {machine}, not {arch}")
        self.machine = machine
        self.e_machine = e_machine
        if e_phentsize != PHDR.itemsize:
            raise self._fail(f"e_phentsize {e_phentsize}, want {PHDR.itemsize}")
        phnum = e_phnum
        if e_phnum == PN_XNUM:
            if e_shoff == 0 or e_shnum < 1 or e_shentsize != SHDR.size:
                raise self._fail("e_phnum is PN_XNUM but there is no section header 0")
            if e_shoff + SHDR.size > size:
                raise self._fail("section header 0 lies past the end of the file (truncated)")
            phnum = SHDR.unpack_from(at(e_shoff, SHDR.size), 0)[7]  # sh_info
        if phnum > MAX_PHNUM:
            raise self._fail(f"{phnum} program headers: more than {MAX_PHNUM}, not a real core")
        if e_phoff + phnum * PHDR.itemsize > size:
            raise self._fail(
                f"program headers ({phnum} at {e_phoff:#x}) run past the end of the file "
                f"({size:#x} bytes): truncated"
            )
        ph = np.frombuffer(at(e_phoff, phnum * PHDR.itemsize), dtype=PHDR)
        note_bytes = 0
        self.notes: list[Note] = []
        self.loads: list[Load] = []
        for i, p in enumerate(ph):
            ptype, off, filesz, memsz = int(p["type"]), int(p["offset"]), int(p["filesz"]), int(
                p["memsz"])
            if ptype == PT_NOTE:
                if off + filesz > size:
                    raise self._fail(f"PT_NOTE #{i} runs past the end of the file: truncated")
                note_bytes += filesz
                if note_bytes > MAX_NOTE_BYTES:
                    raise self._fail(f"PT_NOTE segments hold over {MAX_NOTE_BYTES >> 20} MiB: "
                                     "not a real core")
                self.notes += parse_notes(at(off, filesz), f"{self.path}: PT_NOTE #{i}")
            elif ptype == PT_LOAD:
                paddr = int(p["paddr"])
                if filesz > memsz:
                    raise self._fail(f"PT_LOAD #{i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
                if filesz and off + filesz > size:
                    raise self._fail(
                        f"PT_LOAD #{i} (PA {paddr:#x}, file {off:#x}+{filesz:#x}) runs past the "
                        f"end of the file ({size:#x} bytes): truncated"
                    )
                if paddr + memsz > 1 << 64:
                    raise self._fail(f"PT_LOAD #{i} PA {paddr:#x}+{memsz:#x} wraps past 2**64")
                self.loads.append(Load(paddr, int(p["vaddr"]), off if filesz else 0, filesz,
                                       memsz))
        if not self.loads:
            raise self._fail("no PT_LOAD segments: the core holds no memory")
        vmci = [n for n in self.notes if n.name == "VMCOREINFO"]
        self.vmcoreinfo: VmcoreInfo | None = VmcoreInfo(vmci[0].desc) if vmci else None
        self.cpus: list[CpuState] = cpu_states(self.notes, machine)
        return _unalias(self.loads)


def _unalias(loads: list[Load]) -> list[Segment]:
    """Non-overlapping segments by PA: where loads overlap, the earlier-sorted one wins."""
    out: list[Segment] = []
    covered_to = -1
    for ld in sorted(loads, key=lambda x: (x.paddr, -x.memsz)):
        start, end = ld.paddr, ld.paddr + ld.memsz
        if end <= covered_to or ld.memsz == 0:
            continue
        if start < covered_to:
            cut = covered_to - start
            start = covered_to
            filesz = max(0, ld.filesz - cut)
            out.append(Segment(start, ld.offset + cut if filesz else 0, filesz, end - start))
        else:
            out.append(Segment(start, ld.offset, ld.filesz, ld.memsz))
        covered_to = end
    return out

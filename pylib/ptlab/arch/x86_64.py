"""x86-64: everything architecture-specific that is not the entry codec (Linux 6.1).

The entry codec is :mod:`ptlab.formats.x86`. Each constant names the kernel source it comes
from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..formats import x86 as _codec
from ..formats.base import Attrs, Format
from .base import END, U64, ArchError, ArchOps, Marker, WxCount, size_text

# --- control registers (arch/x86/include/uapi/asm/processor-flags.h) -----------------------
CR0_PG = 1 << 31  # X86_CR0_PG
CR4_LA57 = 1 << 12  # X86_CR4_LA57
# CR3_ADDR_MASK (arch/x86/include/asm/processor-flags.h): PHYSICAL_PAGE_MASK, bits 51:12;
# the PCID (11:0) and CR3_NOFLUSH (63) are dropped.
CR3_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
# PTI_USER_PGTABLE_MASK (arch/x86/entry/calling.h): PTI PGDs are 8 KiB, the user half at +4K.
PTI_USER_PGTABLE_MASK = 1 << 12

# --- ELF cores -----------------------------------------------------------------------------
EM_X86_64, EM_386 = 62, 3  # include/uapi/linux/elf-em.h
# struct user_regs_struct (arch/x86/include/asm/user_64.h): elf_prstatus.pr_reg
PRSTATUS_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
    "ds", "es", "fs", "gs",
)
PRSTATUS_SIZE = 336  # sizeof(struct elf_prstatus) on x86-64

# --- kernel layout (6.1) ---------------------------------------------------------------------
# arch/x86/include/asm/page_64_types.h
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
KERNEL_IMAGE_SIZE = 1 << 30  # KERNEL_IMAGE_SIZE with RANDOMIZE_BASE
PAGE_OFFSET = {4: 0xFFFF_8880_0000_0000, 5: 0xFF11_0000_0000_0000}  # __PAGE_OFFSET_BASE_L4/5
# arch/x86/include/asm/pgtable_64_types.h
VMALLOC_BASE = {4: 0xFFFF_C900_0000_0000, 5: 0xFFA0_0000_0000_0000}  # __VMALLOC_BASE_L4/5
VMEMMAP_BASE = {4: 0xFFFF_EA00_0000_0000, 5: 0xFFD4_0000_0000_0000}  # __VMEMMAP_BASE_L4/5
LDT_BASE = {4: (-240 << 39) % (1 << 64), 5: (-112 << 48) % (1 << 64)}  # LDT_BASE_ADDR
GUARD_HOLE = {4: (0xFFFF_8000_0000_0000, 0xFFFF_8800_0000_0000),
              5: (0xFF00_0000_0000_0000, 0xFF10_0000_0000_0000)}  # GUARD_HOLE_{BASE,END}_ADDR
CPU_ENTRY_AREA_BASE = (-4 << 39) % (1 << 64)  # CPU_ENTRY_AREA_PGD << P4D_SHIFT
ESPFIX_BASE = (-2 << 39) % (1 << 64)  # ESPFIX_PGD_ENTRY << P4D_SHIFT
MODULES_VADDR = START_KERNEL_MAP + KERNEL_IMAGE_SIZE  # MODULES_VADDR
MODULES_END = 0xFFFF_FFFF_FF00_0000  # MODULES_END
PHYSICAL_START = 0x100_0000  # CONFIG_PHYSICAL_START (Debian's, the default): __START_KERNEL
VSYSCALL_ADDR = (-10 << 20) % (1 << 64)  # uapi/asm/vsyscall.h VSYSCALL_ADDR
REALMODE_LIMIT = 1 << 20  # the real-mode trampoline lives below 1 MiB (realmode/init.c)
# arch/x86/include/asm/efi.h
EFI_VA_END = (-68 << 30) % (1 << 64)  # EFI_VA_END
# arch/x86/include/asm/fixmap.h: round_up(VSYSCALL_ADDR + PAGE_SIZE, PMD_SIZE) - PAGE_SIZE
FIXADDR_TOP = 0xFFFF_FFFF_FF7F_F000
FIXADDR_PAGES = 647  # permanent fixmap slots: config dependent, an estimate for Debian's

# __PAGE_KERNEL (arch/x86/include/asm/pgtable_types.h): P RW A D G NX.
PAGE_KERNEL = Attrs(present=True, writable=True, user=False, exec=False, uexec=False,
                    global_=True, accessed=True, dirty=True)

# --- ptdump (arch/x86/mm/dump_pagetables.c) --------------------------------------------------
# the bits printk_prot() tests, the codec's (arch/x86/include/asm/pgtable_types.h)
_P, _RW, _US, _PWT, _PCD = _codec.P, _codec.RW, _codec.US, _codec.PWT, _codec.PCD
_PSE, _PAT, _G, _PAT_LARGE, _NX = _codec.PS, _codec.PAT, _codec.G, _codec.PAT_LARGE, _codec.NX
PTE_FLAGS_MASK = U64 & ~_codec.PTE_PFN_MASK  # PTE_FLAGS_MASK (asm/pgtable_types.h)
FLAG_WORDS = ("USR", "RW", "ro", "PWT", "PCD", "PSE", "PAT", "GLB", "NX", "x")
LEVEL_WORDS = ("pgd", "p4d", "pud", "pmd", "pte")  # level_name[] after "cr3", by depth
_UNITS = "BKMGTPE"  # printk of the size in bytes


def markers(levels: int = 4, *, page_offset_base: int | None = None,
            vmalloc_base: int | None = None, vmemmap_base: int | None = None,
            fixaddr_start: int | None = None, ldt: bool = True, espfix: bool = True,
            efi: bool = True, kasan: tuple[int, int] | None = None) -> list[Marker]:
    """``address_markers[]`` for 4- or 5-level paging in enum order (KASAN off, LDT, ESPFIX
    and EFI on as in Debian's config), END-terminated. page_offset_base / vmalloc_base /
    vmemmap_base move with KASLR (RANDOMIZE_MEMORY): pass the guest's values."""
    if levels not in (4, 5):
        raise ArchError(f"x86-64 paging has 4 or 5 levels, not {levels!r}")
    fix = fixaddr_start if fixaddr_start is not None else FIXADDR_TOP - FIXADDR_PAGES * 4096
    out = [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")]
    if ldt:
        out.append(Marker(LDT_BASE[levels], "LDT remap"))
    out += [
        Marker(page_offset_base if page_offset_base is not None else PAGE_OFFSET[levels],
               "Low Kernel Mapping"),
        Marker(vmalloc_base if vmalloc_base is not None else VMALLOC_BASE[levels],
               "vmalloc() Area"),
        Marker(vmemmap_base if vmemmap_base is not None else VMEMMAP_BASE[levels], "Vmemmap"),
    ]
    if kasan is not None:
        out += [Marker(kasan[0], "KASAN shadow"), Marker(kasan[1], "KASAN shadow end")]
    out.append(Marker(CPU_ENTRY_AREA_BASE, "CPU entry Area"))
    if espfix:
        out.append(Marker(ESPFIX_BASE, "ESPfix Area", 16))
    if efi:
        out.append(Marker(EFI_VA_END, "EFI Runtime Services"))
    out += [
        Marker(START_KERNEL_MAP, "High Kernel Mapping"),
        Marker(MODULES_VADDR, "Modules"),
        Marker(MODULES_END, "End Modules"),
        Marker(fix, "Fixmap Area"),
        END,
    ]
    return out


def flag_words(prot: int, depth: int) -> tuple[str, ...]:
    """printk_prot(): the words printed for ``prot`` at ptdump depth ``depth`` (0 pgd..4 pte)."""
    if not prot & _P:
        return ()
    out = ["USR"] if prot & _US else []
    out.append("RW" if prot & _RW else "ro")
    if prot & _PWT:
        out.append("PWT")
    if prot & _PCD:
        out.append("PCD")
    if depth <= 3 and prot & _PSE:
        out.append("PSE")
    if (depth == 4 and prot & _PAT) or (depth in (2, 3) and prot & _PAT_LARGE):
        out.append("PAT")
    if prot & _G:
        out.append("GLB")
    out.append("NX" if prot & _NX else "x")
    return tuple(out)


def _prot_text(flags: tuple[str, ...]) -> str:
    if not flags:
        return " " * 30
    unknown = set(flags) - set(FLAG_WORDS)
    if unknown:
        raise ArchError(f"unknown x86 ptdump flags {sorted(unknown)}")
    f = set(flags)
    return ("USR " if "USR" in f else "    ") + ("RW " if "RW" in f else "ro ") + "".join(
        f"{w} " if w in f else "    " for w in ("PWT", "PCD", "PSE", "PAT", "GLB")
    ) + ("NX " if "NX" in f else "x  ")


class X86_64Ops(ArchOps):
    """x86-64, 4- and 5-level paging."""

    name = "x86_64"
    elf_machines = (EM_X86_64, EM_386)  # QEMU writes EM_386 for a CPU outside long mode
    uname_machines = ("x86_64",)  # utsname.machine (arch/x86/Makefile UTS_MACHINE)
    prstatus_regs = PRSTATUS_REGS
    prstatus_size = PRSTATUS_SIZE
    qemu_cpustate_note = True  # QEMUCPUState with CR0..CR4 (qemu target/i386/arch_dump.c)
    root_symbol = "init_top_pgt"  # arch/x86/kernel/head_64.S
    page_kernel = PAGE_KERNEL
    capstone = ("CS_ARCH_X86", "CS_MODE_64")
    max_insn = 15
    ptdump_first_start = False
    ptdump_caps_lines = True
    ptdump_recheck_marker = False

    def linear_map_base(self, fmt: Format) -> int:
        return PAGE_OFFSET[fmt.levels]

    def direct_map(self, vmcoreinfo: Any, read_variable: Any) -> tuple[int, int]:
        """The variable ``page_offset_base`` (arch/x86/kernel/head64.c, moved by
        RANDOMIZE_MEMORY) holds the base, which maps PA 0 (asm/page_64.h
        __phys_addr_nodebug)."""
        return read_variable("page_offset_base"), 0

    # --- VMCOREINFO (arch/x86/kernel/machine_kexec_64.c arch_crash_save_vmcoreinfo) -------
    def describes(self, vmci: Any) -> bool:
        return vmci.has("SYMBOL", "init_top_pgt") or vmci.has("NUMBER", "phys_base")

    def pa_symbol(self, vmci: Any, name: str) -> int:
        """``__phys_addr_symbol`` (arch/x86/mm/physaddr.c): x - __START_KERNEL_map + phys_base."""
        return vmci.symbol(name) - START_KERNEL_MAP + vmci.number("phys_base")

    # --- registers -----------------------------------------------------------------------
    def format_from(self, regs: Mapping[str, int] | None, vmci: Any,
                    where: str = "registers") -> tuple[Format, str]:
        """4- or 5-level from VMCOREINFO ``pgtable_l5_enabled`` and/or CR4.LA57; 4-level
        when neither is known."""
        l5v = vmci.pgtable_l5_enabled if vmci is not None else None
        cr4 = (regs or {}).get("cr4")
        l5r = bool(cr4 & CR4_LA57) if cr4 is not None else None
        if l5v is not None and l5r is not None and l5v != l5r:
            raise ArchError(f"{where} CR4.LA57={l5r} but VMCOREINFO pgtable_l5_enabled={l5v}")
        if l5v is not None:
            l5, why = l5v, "VMCOREINFO pgtable_l5_enabled"
        elif l5r is not None:
            l5, why = l5r, f"{where} CR4.LA57"
        else:
            l5, why = False, "default (no VMCOREINFO or CR4)"
        levels = 5 if l5 else 4
        return next(f for f in self.formats() if f.levels == levels), why

    def root_from_registers(self, regs: Mapping[str, int],
                            where: str = "registers") -> tuple[int, str]:
        cr3, cr0 = regs.get("cr3"), regs.get("cr0")
        if cr3 is None:
            raise ArchError(f"{where} hold no CR3")
        if cr0 is not None and not cr0 & CR0_PG:
            raise ArchError(f"{where}: paging is off (CR0={cr0:#x})")
        why = f"{where} CR3 {cr3:#x}"
        if cr3 & PTI_USER_PGTABLE_MASK:
            why += " (bit 12 set: under PTI the user PGD, kernel PGD = root - 0x1000)"
        return cr3 & CR3_ADDR_MASK, why

    def check_root(self, regs: Mapping[str, int], root: int, mem: Any,
                   isolation: bool) -> None:
        """CR3 holds the current mm's PGD (with PTI maybe its user half): its kernel half
        must be init_top_pgt's (the kernel PGD entries are copied into every mm's pgd_alloc,
        arch/x86/mm/pgtable.c pgd_ctor)."""
        base = regs["cr3"] & CR3_ADDR_MASK
        if isolation:
            base &= ~PTI_USER_PGTABLE_MASK
        if base == root:
            return
        mine = mem.read_table(base, 512)[256:]
        init = mem.read_table(root, 512)[256:]
        if not (mine == init).all():
            raise ArchError(f"CR3 {regs['cr3']:#x} and {self.root_symbol} {root:#x} "
                            "disagree on the kernel half")

    def user_regime(self, regs: Mapping[str, int], kernel_root: int) -> bool:
        return bool(regs["cr3"] & PTI_USER_PGTABLE_MASK)

    # --- ptdump --------------------------------------------------------------------------
    def ptdump_markers(self, fmt: Format, **overrides: Any) -> list[Marker]:
        return markers(fmt.levels, **overrides)

    def ptdump_ranges(self, fmt: Format) -> list[tuple[int, int]]:
        """ptdump_walk_pgd_level_core(): {0, PTRS_PER_PGD * PGD_LEVEL_MULT / 2} and
        {GUARD_HOLE_END_ADDR, ~0UL}: the hypervisor hole is skipped."""
        return [(0, 1 << (fmt.va_bits - 1)), (GUARD_HOLE[fmt.levels][1], 1 << 64)]

    def ptdump_names(self, fmt: Format) -> tuple[str, ...]:
        return LEVEL_WORDS

    def ptdump_depth(self, fmt: Format, level: int, hole: bool) -> int:
        # mm/pagewalk.c real_depth(): the folded p4d of 4-level paging reports at pgd
        return 0 if level == fmt.top_level else 4 - level

    def ptdump_prot(self, raw: int, eff_raw: int, depth: int) -> tuple[object, tuple[str, ...]]:
        """note_page() compares ``val & PTE_FLAGS_MASK`` (which drops a large leaf's PAT bit
        12) and the effective RW/USR/NX."""
        prot = raw & PTE_FLAGS_MASK
        return (prot, eff_raw & (_RW | _US | _NX)), flag_words(prot, depth)

    def ptdump_size_text(self, span: int) -> str:
        return size_text(span, _UNITS)

    def ptdump_line(self, va: int, end: int, flags: tuple[str, ...], level: str) -> str:
        """"0x%0*lx-0x%0*lx   ", "%9lu%c ", printk_prot() words padded, then the level."""
        span = (end - va) % (1 << 64)
        return f"0x{va:016x}-0x{end:016x}   {size_text(span, _UNITS)} {_prot_text(flags)}{level}"

    def ptdump_words(self, words: list[str]) -> tuple[str, tuple[str, ...]] | None:
        if words and words[-1] in LEVEL_WORDS:
            return words[-1], tuple(words[:-1])
        return None

    # --- W+X (note_wx(): effective RW && !NX) ---------------------------------------------
    def wx_message(self, count: WxCount) -> str:
        if count.wx_pages:
            return f"x86/mm: Checked W+X mappings: FAILED, {count.wx_pages} W+X pages found."
        return "x86/mm: Checked W+X mappings: passed, no W+X pages found."

    # --- check ---------------------------------------------------------------------------
    def image_range(self, fmt: Format) -> tuple[int, int]:
        return START_KERNEL_MAP, MODULES_VADDR

    def image_base(self, fmt: Format) -> int:
        return START_KERNEL_MAP + PHYSICAL_START  # __START_KERNEL: _text without KASLR

    def exec_reason(self, fmt: Format, run: Any,
                    text: tuple[int, int] | None) -> str | None:
        a = run.attrs
        if MODULES_VADDR <= run.va and run.va + run.size <= MODULES_END:
            return "module text"
        if run.pa + run.size <= REALMODE_LIMIT and not a.writable:
            # arch/x86/realmode/init.c set_real_mode_permissions(): set_memory_x() on the
            # trampoline's text in the direct map, below 1 MiB
            return "real-mode trampoline text"
        if run.va == VSYSCALL_ADDR and run.size == 4096 and a.user and not a.writable:
            return "vsyscall page (vsyscall=emulate)"
        return None

    def user_root(self, fmt: Format, mem: Any, root: int) -> tuple[int, str] | None:
        """PTI's user PGD is the second page of the 8 KiB PGD (kernel_to_user_pgdp()); it
        shares the CPU entry area's top-level entry (pti_clone_user_shared()). Without PTI
        the page after init_top_pgt is the kernel's own next-level table (head_64.S), which
        the root points to."""
        user = root + PTI_USER_PGTABLE_MASK
        n = fmt.entries(fmt.top_level)
        if not mem.contains(user, n * 8):
            return None
        kernel, upage = mem.read_table(root, n), mem.read_table(user, n)
        oas = fmt.oas(kernel, fmt.top_level)
        if ((oas == user) & (fmt.kinds(kernel, fmt.top_level) != 0)).any():
            return None
        slot = (CPU_ENTRY_AREA_BASE >> fmt.shift(fmt.top_level)) & (n - 1)
        if not (int(kernel[slot]) & 1 and int(upage[slot]) & 1):
            return None
        return user, "PTI user PGD (kernel PGD + 0x1000)"

    def user_root_reasons(self, fmt: Format, runs: Sequence[Any]) -> list[str | None]:
        """What pti_init() maps into the user PGD (arch/x86/mm/pti.c): the CPU entry area
        and each CPU's TSS page at its per-CPU address, whose sp2 slot SYSCALL64 spills a
        register to (pti_clone_user_shared; the CPU entry area maps the same page), ESPfix
        (pti_setup_espfix64), the LDT remap, the entry text and, without PCID, the kernel
        text read-only (pti_clone_entry_text, pti_clone_kernel_text), and the vsyscall page
        (pti_setup_vsyscall)."""
        top = fmt.entry_size(fmt.top_level)
        ldt = LDT_BASE[fmt.levels]

        def inside(r: Any, base: int) -> bool:
            return base <= r.va and r.va + r.size <= base + top

        cea_pages = {pa for r in runs if inside(r, CPU_ENTRY_AREA_BASE)
                     for pa in range(r.pa, r.pa + min(r.size, 1 << 24), 4096)}
        out: list[str | None] = []
        for r in runs:
            a = r.attrs
            if inside(r, CPU_ENTRY_AREA_BASE) and not a.exec:
                out.append("CPU entry area")
            elif r.size == 4096 and not a.exec and r.pa in cea_pages:
                out.append("per-CPU TSS page (SYSCALL64 scratch), also in the CPU entry area")
            elif inside(r, ESPFIX_BASE) and not a.exec and not a.writable:
                out.append("ESPfix")
            elif inside(r, ldt) and not a.exec:
                out.append("LDT remap")
            elif (START_KERNEL_MAP <= r.va and r.va + r.size <= MODULES_VADDR and a.exec
                  and not a.writable):
                out.append("entry text")
            elif r.va == VSYSCALL_ADDR and r.size == 4096 and not a.writable:
                out.append("vsyscall page")
            else:
                out.append(None)
        return out

OPS = X86_64Ops()

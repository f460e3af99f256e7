"""arm64: everything architecture-specific that is not the entry codec (Linux 6.1; the 6.9+
layout of 6.12 where it differs: :func:`layout`).

The entry codec is :mod:`ptlab.formats.arm64`. Each constant names the kernel source it
comes from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..formats.arm64 import (
    AF,
    ATTRINDX,
    CONT,
    GP,
    NG,
    PXN,
    RDONLY,
    SH,
    TABLE_BIT,
    USER,
    UXN,
    VALID,
)
from ..formats.base import Attrs, Format
from .base import END, U64, ArchError, ArchOps, Marker, WxCount, size_text

# --- system registers (arch/arm64/include/asm/pgtable-hwdef.h) -------------------------------
TCR_T1SZ_OFFSET = 16  # TCR_T1SZ_OFFSET: T1SZ is bits 21:16
TCR_TG1_SHIFT = 30  # TCR_TG1_SHIFT: TG1 is bits 31:30
TCR_TG1_GRANULE = {0b10: 4096, 0b01: 16384, 0b11: 65536}  # TCR_TG1_4K / _16K / _64K
# TTBRn_EL1.BADDR without FEAT_LPA: bits 47:1 (TTBR_ASID_MASK 63:48 and TTBR_CNP_BIT 0 dropped)
TTBR_BADDR = 0x0000_FFFF_FFFF_FFFE
# With 52-bit PAs (ARM64_PA_BITS_52) BADDR is bits 47:2 and bits 5:2 hold PA[51:48]:
# phys_to_ttbr(addr) = (addr | addr >> 46) & TTBR_BADDR_MASK_52 (asm/assembler.h, pgtable.h).
TTBR_BADDR_52 = 0x0000_FFFF_FFFF_FFC0


def ttbr_baddr(ttbr: int) -> int:
    """PA of the table a TTBRn_EL1 value points to (``__phys_to_ttbr`` undone). Bits 5:2 are
    zero for any table of 64 bytes or more in a 48-bit PA configuration, so one rule serves
    both."""
    return (ttbr & TTBR_BADDR_52) | (ttbr & 0x3C) << 46
PAGE_SIZE = 4096  # the 4K-granule kernels booted here; PAGESIZE when VMCOREINFO lacks it
# arch/arm64/kernel/vmlinux.lds.S (6.1): tramp_pg_dir, reserved_pg_dir, swapper_pg_dir follow
# each other, one page each; KPTI's TTBR1 points at tramp_pg_dir at EL0.
TRAMP_SWAPPER_OFFSET = 2 * PAGE_SIZE

# --- ELF cores -----------------------------------------------------------------------------
EM_AARCH64 = 183  # include/uapi/linux/elf-em.h
PRSTATUS_REGS = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")  # struct user_pt_regs
PRSTATUS_SIZE = 392  # sizeof(struct elf_prstatus) on arm64

# PAGE_KERNEL (arch/arm64/include/asm/pgtable-prot.h): RW, PXN, UXN, AF, SH inner, nG,
# MT_NORMAL, with PTE_DIRTY and PTE_WRITE (DBM).
PAGE_KERNEL = Attrs(present=True, writable=True, user=False, exec=False, uexec=False,
                    global_=False, accessed=True, dirty=True, cache=0, shareability=3, dbm=True)

SZ_1M = 1 << 20
# Permanent fixmap slots of Debian's 6.1 arm64 kernel (arch/arm64/include/asm/fixmap.h):
# FIX_HOLE 1 + FIX_FDT_SIZE (MAX_FDT_SIZE + SZ_2M = 4 MiB) 1024 + EARLYCON 1 + TEXT_POKE0 1
# + APEI GHES IRQ/SEA 2 + SDEI normal/critical 2 + ENTRY_TRAMP_TEXT4..1 4 (UNMAP_KERNEL_AT_EL0,
# RELOCATABLE) = 1035: the real trampoline alias sits at FIXADDR_TOP - 1034 pages.
FIXADDR_PAGES = 1035


SZ_1G = 1 << 30
U64_MOD = 1 << 64


def lpa2_kernel(va_bits: int, page_shift: int) -> bool:
    """A 52-bit kernel VA with a 4K or 16K granule needs FEAT_LPA2, which Linux supports from
    6.9 on (ARM64_LPA2) -- the same series that moved the fixmap, PCI I/O and vmemmap to the
    top of the address space, so such a format proves the 6.9+ layout."""
    return va_bits == 52 and page_shift in (12, 14)


def layout(va_bits: int = 48, page_shift: int = 12, *,
           top_vmemmap: bool | None = None) -> dict[str, int]:
    """Kernel VA layout (arch/arm64/include/asm/memory.h and pgtable.h).

    ``top_vmemmap`` False: the 5.11..6.4 layout of Debian's 6.1 (linear map, 128 MiB of modules,
    vmalloc, fixmap, PCI I/O, vmemmap). True: the 6.9+ layout of Debian's 6.12 (2 GiB of
    modules since 6.5; vmemmap ends at -1 GiB, PCI I/O 8 MiB above it, FIXADDR_TOP at -8 MiB,
    VMEMMAP_SIZE covers the linear map of VA_BITS_MIN, vmalloc ends 8 MiB below vmemmap;
    checked against the VMCOREINFO ranges of Debian's 6.12.117). None: True exactly when the
    format is one only a 6.9+ kernel can run (:func:`lpa2_kernel`); pass the kernel's own
    answer when known (:func:`layout_from_vmcoreinfo`)."""
    if top_vmemmap is None:
        top_vmemmap = lpa2_kernel(va_bits, page_shift)
    va_min = va_bits if va_bits <= 48 else 47 if page_shift == 14 else 48  # VA_BITS_MIN
    page_offset = (-(1 << va_bits)) % U64_MOD  # _PAGE_OFFSET(VA_BITS)
    page_end = (-(1 << (va_min - 1))) % U64_MOD  # _PAGE_END(VA_BITS_MIN)
    vmemmap_shift = page_shift - 6  # VMEMMAP_SHIFT: PAGE_SHIFT - STRUCT_PAGE_MAX_SHIFT
    vmemmap_size = (page_end - page_offset) >> vmemmap_shift  # VMEMMAP_SIZE
    if top_vmemmap:
        modules_vsize = 2 * SZ_1G  # MODULES_VSIZE (SZ_2G)
        vmemmap_end = U64_MOD - SZ_1G  # VMEMMAP_END = -SZ_1G
        vmemmap_start = vmemmap_end - vmemmap_size  # VMEMMAP_END - VMEMMAP_SIZE
        pci_io_start = vmemmap_end + 8 * SZ_1M  # PCI_IO_START = VMEMMAP_END + SZ_8M
        pci_io_end = pci_io_start + 16 * SZ_1M
        fixaddr_top = U64_MOD - 8 * SZ_1M  # FIXADDR_TOP = -SZ_8M
        vmalloc_end = vmemmap_start - 8 * SZ_1M  # VMALLOC_END = VMEMMAP_START - SZ_8M
    else:
        modules_vsize = 128 * SZ_1M
        vmemmap_start = (-(1 << (va_bits - vmemmap_shift))) % U64_MOD  # VMEMMAP_START
        vmemmap_end = vmemmap_start + vmemmap_size
        pci_io_end = vmemmap_start - 8 * SZ_1M  # PCI_IO_END
        pci_io_start = pci_io_end - 16 * SZ_1M  # PCI_IO_END - PCI_IO_SIZE
        fixaddr_top = vmemmap_start - 32 * SZ_1M  # FIXADDR_TOP
        vmalloc_end = vmemmap_start - 256 * SZ_1M  # VMALLOC_END = VMEMMAP_START - SZ_256M
    return {
        "PAGE_OFFSET": page_offset,
        "PAGE_END": page_end,
        "MODULES_VADDR": page_end,  # MODULES_VADDR = _PAGE_END(VA_BITS_MIN)
        "MODULES_END": page_end + modules_vsize,  # + MODULES_VSIZE
        "VMALLOC_START": page_end + modules_vsize,  # VMALLOC_START = MODULES_END
        "VMALLOC_END": vmalloc_end,  # pgtable.h
        "FIXADDR_TOP": fixaddr_top,
        "PCI_IO_START": pci_io_start,
        "PCI_IO_END": pci_io_end,
        "VMEMMAP_START": vmemmap_start,
        "VMEMMAP_END": vmemmap_end,
    }


# The ranges arch_crash_save_vmcoreinfo() exports (arch/arm64/kernel/crash_core.c, 6.1 and 6.12)
VMCOREINFO_RANGES = ("MODULES_VADDR", "MODULES_END", "VMALLOC_START", "VMALLOC_END",
                     "VMEMMAP_START", "VMEMMAP_END")


def layout_from_vmcoreinfo(vmci: Any, page_shift: int | None = None) -> dict[str, int]:
    """The layout of the kernel that wrote ``vmci``: its own MODULES/VMALLOC/VMEMMAP ranges,
    the rest (linear map, fixmap, PCI I/O) by :func:`layout` for the generation those ranges
    show (VMEMMAP_END at -1 GiB: 6.9+). ArchError when a range disagrees with the formula:
    a layout this module does not know."""
    shift = page_shift or (vmci.page_size or PAGE_SIZE).bit_length() - 1
    va_bits = vmci.number("VA_BITS")
    own = {k: vmci.number(k) % U64_MOD for k in VMCOREINFO_RANGES if vmci.has("NUMBER", k)}
    top = own.get("VMEMMAP_END") == U64_MOD - SZ_1G if "VMEMMAP_END" in own else None
    lay = layout(va_bits, shift, top_vmemmap=top)
    wrong = {k: v for k, v in own.items() if lay[k] != v}
    if wrong:
        raise ArchError("arm64 VMCOREINFO ranges differ from the known layouts: " + ", ".join(
            f"{k} {v:#x} (expected {lay[k]:#x})" for k, v in wrong.items()))
    return lay


def markers(va_bits: int = 48, page_shift: int = 12, *,
            fixaddr_start: int | None = None) -> list[Marker]:
    """``address_markers[]`` of arch/arm64/mm/ptdump.c (no KASAN), END-terminated, in address
    order (the 6.9+ layout puts vmemmap and PCI I/O below the fixmap). FIXADDR_START depends
    on the configured fixmap slots: pass the guest's value."""
    lay = layout(va_bits, page_shift)
    fix = fixaddr_start if fixaddr_start is not None else (
        lay["FIXADDR_TOP"] - FIXADDR_PAGES * (1 << page_shift))
    regions = [
        [Marker(fix, "Fixmap start"), Marker(lay["FIXADDR_TOP"], "Fixmap end")],
        [Marker(lay["PCI_IO_START"], "PCI I/O start"), Marker(lay["PCI_IO_END"], "PCI I/O end")],
        [Marker(lay["VMEMMAP_START"], "vmemmap start"),
         Marker(lay["VMEMMAP_END"], "vmemmap end")],
    ]
    regions.sort(key=lambda pair: pair[0].start)
    return [
        Marker(lay["PAGE_OFFSET"], "Linear Mapping start"),
        Marker(lay["PAGE_END"], "Linear Mapping end"),
        Marker(lay["MODULES_VADDR"], "Modules start"),
        Marker(lay["MODULES_END"], "Modules end"),
        Marker(lay["VMALLOC_START"], "vmalloc() area"),
        Marker(lay["VMALLOC_END"], "vmalloc() end"),
        *(m for pair in regions for m in pair),
        END,
    ]


# --- ptdump (arch/arm64/mm/ptdump.c pte_bits[]: mask, val, set, clear) -----------------------
# MT_* AttrIndx values (arch/arm64/include/asm/memory.h, 6.1)
MT_NAMES = {3: "DEVICE/nGnRnE", 4: "DEVICE/nGnRE", 2: "MEM/NORMAL-NC", 0: "MEM/NORMAL",
            1: "MEM/NORMAL-TAGGED"}
PTE_BITS: tuple[tuple[int, int, str, str | None], ...] = (
    (VALID, VALID, " ", "F"),
    (USER, USER, "USR", "   "),
    (RDONLY, RDONLY, "ro", "RW"),
    (PXN, PXN, "NX", "x "),
    (SH, SH, "SHD", "   "),
    (AF, AF, "AF", "  "),
    (NG, NG, "NG", "  "),
    (CONT, CONT, "CON", "   "),
    (TABLE_BIT, TABLE_BIT, "   ", "BLK"),
    (UXN, UXN, "UXN", "   "),
    (GP, GP, "GP", "  "),
    *((ATTRINDX, idx << 2, name, None) for idx, name in MT_NAMES.items()),
)
PROT_MASK = 0
for _mask, *_ in PTE_BITS:
    PROT_MASK |= _mask
FLAG_WORDS = frozenset({"F", "USR", "RW", "ro", "NX", "x", "SHD", "AF", "NG", "CON", "BLK",
                        "UXN", "GP", *MT_NAMES.values()})
LEVEL_WORDS = ("PGD", "P4D", "PUD", "PMD", "PTE")  # pg_level[].name
_UNITS = "KMGTPE"  # printk of the size in KiB


def flag_words(prot: int) -> tuple[str, ...]:
    """dump_prot() over pte_bits[]: the non-blank words printed for ``prot`` (empty if 0)."""
    if not prot:
        return ()
    out = []
    for mask, val, on, off in PTE_BITS:
        word = on if prot & mask == val else off
        if word and word.strip():
            out.append(word.strip())
    return tuple(out)


def _prot_text(flags: tuple[str, ...]) -> str:
    if not flags:
        return ""
    f = set(flags)
    if f - FLAG_WORDS:
        raise ArchError(f"unknown arm64 ptdump flags {sorted(f - FLAG_WORDS)}")
    words = []
    for _mask, _val, on, off in PTE_BITS:
        if off is None:  # memory types: printed only when matched
            if on in f:
                words.append(on)
            continue
        on_word, off_word = on.strip(), off.strip()
        if on_word:
            words.append(on if on_word in f else off)
        else:
            words.append(off if off_word in f else on)
    return "".join(" " + w for w in words)


class Arm64Ops(ArchOps):
    """arm64 stage 1, 4K/16K/64K granules; the kernel root is TTBR1's."""

    name = "arm64"
    elf_machines = (EM_AARCH64,)
    uname_machines = ("aarch64",)  # utsname.machine (arch/arm64/Makefile UTS_MACHINE)
    prstatus_regs = PRSTATUS_REGS
    prstatus_size = PRSTATUS_SIZE
    qemu_cpustate_note = False
    root_symbol = "swapper_pg_dir"  # arch/arm64/kernel/vmlinux.lds.S
    page_kernel = PAGE_KERNEL
    capstone = ("CS_ARCH_ARM64", "CS_MODE_ARM")
    max_insn = 4
    ptdump_first_start = True
    ptdump_caps_lines = False
    ptdump_recheck_marker = True

    def linear_map_base(self, fmt: Format) -> int:
        return (1 << 64) - fmt.va_span  # PAGE_OFFSET

    def direct_map(self, vmcoreinfo: Any, read_variable: Any) -> tuple[int, int]:
        """PAGE_OFFSET = -(1 << VA_BITS) maps PHYS_OFFSET (memstart_addr, randomised by
        KASLR): __phys_to_virt(pa) = (pa - PHYS_OFFSET) | PAGE_OFFSET (asm/memory.h)."""
        vi = vmcoreinfo()
        va_bits = vi.number("VA_BITS")
        return (1 << 64) - (1 << va_bits), vi.number("PHYS_OFFSET") & U64

    # --- VMCOREINFO (arch/arm64/kernel/crash_core.c arch_crash_save_vmcoreinfo) -----------
    def describes(self, vmci: Any) -> bool:
        return vmci.has("NUMBER", "kimage_voffset") or vmci.has("NUMBER", "TCR_EL1_T1SZ")

    def pa_symbol(self, vmci: Any, name: str) -> int:
        """``__pa_symbol`` = ``__kimg_to_phys`` (arch/arm64/include/asm/memory.h):
        x - kimage_voffset."""
        return (vmci.symbol(name) - vmci.number("kimage_voffset")) & U64

    # --- registers -----------------------------------------------------------------------
    def format_from(self, regs: Mapping[str, int] | None, vmci: Any,
                    where: str = "registers") -> tuple[Format, str]:
        """Granule and kernel VA bits from TCR_EL1 (TG1, 64 - T1SZ) and/or VMCOREINFO
        (PAGESIZE, 64 - TCR_EL1_T1SZ or VA_BITS); they must agree when both are there."""
        tcr = (regs or {}).get("tcr_el1")
        from_regs = from_vmci = None
        if tcr is not None:
            granule = TCR_TG1_GRANULE.get((tcr >> TCR_TG1_SHIFT) & 3)
            if granule is None:
                raise ArchError(f"{where} TCR_EL1 {tcr:#x}: reserved TG1")
            from_regs = granule, 64 - ((tcr >> TCR_T1SZ_OFFSET) & 0x3F)
        if vmci is not None and vmci.kernel_va_bits is not None:
            from_vmci = vmci.page_size or PAGE_SIZE, vmci.kernel_va_bits
        if from_regs and from_vmci and from_regs != from_vmci:
            raise ArchError(f"{where} TCR_EL1 gives granule {from_regs[0]} and {from_regs[1]} "
                            f"VA bits but VMCOREINFO says {from_vmci[0]} and {from_vmci[1]}")
        if from_regs:
            (page, va_bits), why = from_regs, f"{where} TCR_EL1 TG1/T1SZ"
        elif from_vmci:
            (page, va_bits), why = from_vmci, "VMCOREINFO PAGESIZE/VA bits"
        else:
            raise ArchError("cannot infer the arm64 format without VMCOREINFO (VA_BITS) or "
                            "TCR_EL1")
        why += f" (granule {page}, {va_bits} VA bits)"
        for f in self.formats():
            if f.upper and f.table_bytes == page and f.va_bits == va_bits:
                return f, why
        raise ArchError(f"no known arm64 format fits ({why})")

    def root_from_registers(self, regs: Mapping[str, int],
                            where: str = "registers") -> tuple[int, str]:
        ttbr1 = regs.get("ttbr1_el1")
        if ttbr1 is None:
            raise ArchError(f"{where} hold no TTBR1_EL1")
        return ttbr_baddr(ttbr1), f"{where} TTBR1_EL1 {ttbr1:#x}"

    def check_root(self, regs: Mapping[str, int], root: int, mem: Any,
                   isolation: bool) -> None:
        """TTBR1_EL1 is swapper_pg_dir, or with KPTI at EL0 tramp_pg_dir."""
        base = ttbr_baddr(regs["ttbr1_el1"])
        allowed = {root, root - TRAMP_SWAPPER_OFFSET} if isolation else {root}
        if base not in allowed:
            raise ArchError(f"TTBR1_EL1 {regs['ttbr1_el1']:#x} is not {self.root_symbol} "
                            f"{root:#x}")

    def user_regime(self, regs: Mapping[str, int], kernel_root: int) -> bool:
        return ttbr_baddr(regs["ttbr1_el1"]) == kernel_root - TRAMP_SWAPPER_OFFSET

    # --- ptdump --------------------------------------------------------------------------
    def ptdump_markers(self, fmt: Format, **overrides: Any) -> list[Marker]:
        if not fmt.upper:
            # efi_page_tables (drivers/firmware/efi/arm-runtime.c): the only TTBR0 dump
            return [Marker(0, "UEFI runtime start"),
                    Marker(1 << min(fmt.va_bits, 48), "UEFI runtime end"), END]
        return markers(fmt.va_bits, fmt.page_shift, **overrides)

    def ptdump_names(self, fmt: Format) -> tuple[str, ...]:
        """pg_level[] names by depth; folded levels print as PGD."""
        lv = fmt.levels
        return ("PGD", "P4D", "PUD" if lv > 3 else "PGD", "PMD" if lv > 2 else "PGD", "PTE")

    def ptdump_depth(self, fmt: Format, level: int, hole: bool) -> int:
        # mm/pagewalk.c real_depth(): a hole in a folded top level reports at pgd
        if level == fmt.top_level and hole:
            return 0
        return max(0, 4 - level)

    def ptdump_prot(self, raw: int, eff_raw: int, depth: int) -> tuple[object, tuple[str, ...]]:
        """note_page() compares ``val & pg_level[].mask``: the own bits only."""
        prot = raw & PROT_MASK
        return prot, flag_words(prot)

    def ptdump_size_text(self, span: int) -> str:
        return size_text(span >> 10, _UNITS)

    def ptdump_line(self, va: int, end: int, flags: tuple[str, ...], level: str) -> str:
        """"0x%016lx-0x%016lx   ", "%9lu%c %s" in KiB units, " %s" per pte_bits[] word."""
        span = (end - va) % (1 << 64)
        return (f"0x{va:016x}-0x{end:016x}   {size_text(span >> 10, _UNITS)} {level}"
                + _prot_text(flags))

    def ptdump_words(self, words: list[str]) -> tuple[str, tuple[str, ...]] | None:
        if words and words[0] in LEVEL_WORDS:
            return words[0], tuple(words[1:])
        return None

    # --- W+X (note_prot_wx(): !PTERDONLY && !PTEPXN; note_prot_uxn(): !PTEUXN) ---------
    def wx_count(self, runs: Sequence[Any], unit: int) -> WxCount:
        """arm64's note_page() judges ``val & pg_level[level].mask``: the leaf's OWN bits,
        table entries' PXNTable/APTable not applied (arch/arm64/mm/ptdump.c), so a leaf
        without PXN under a PXNTable entry still counts."""
        own = [(r, r.own if r.own is not None else r.attrs) for r in runs]
        wx = [r for r, a in own if a.writable and a.exec]
        uxn = sum(r.size // unit for r, a in own if a.uexec)
        return WxCount(wx, sum(r.size // unit for r in wx), uxn)

    def wx_message(self, count: WxCount) -> str:
        if count.wx_pages or count.uxn_pages:
            return (f"Checked W+X mappings: FAILED, {count.wx_pages} W+X pages found, "
                    f"{count.uxn_pages} non-UXN pages found")
        return "Checked W+X mappings: passed, no W+X pages found"

    # --- check ---------------------------------------------------------------------------
    def _layout(self, fmt: Format) -> dict[str, int]:
        return layout(fmt.va_bits, fmt.page_shift)

    def image_range(self, fmt: Format) -> tuple[int, int]:
        lay = self._layout(fmt)  # KIMAGE_VADDR = MODULES_END; KASLR moves it within vmalloc
        return lay["MODULES_END"], lay["VMALLOC_END"]

    def _fixmap(self, fmt: Format) -> tuple[int, int]:
        """The fixmap's top 8 MiB: the FDT slots (4 MiB in 6.1) and the entry trampoline's
        FIX_ENTRY_TRAMP_TEXT* pages below them (asm/fixmap.h)."""
        top = self._layout(fmt)["FIXADDR_TOP"]
        return top - (8 << 20), top

    def image_base(self, fmt: Format) -> int:
        return self._layout(fmt)["MODULES_END"]  # KIMAGE_VADDR (asm/memory.h): _text

    def exec_reason(self, fmt: Format, run: Any,
                    text: tuple[int, int] | None) -> str | None:
        """Module text: MODULES_VADDR..MODULES_END, or with KASLR anywhere module_alloc() may
        place it, within 2 GiB of the kernel image (arch/arm64/kernel/kaslr.c
        module_alloc_base, module.c module_alloc()); the entry trampoline's alias in the
        fixmap (map_entry_trampoline(): TRAMP_VALIAS, read-only)."""
        lay = self._layout(fmt)
        end = run.va + run.size
        if lay["MODULES_VADDR"] <= run.va and end <= lay["MODULES_END"]:
            return "module text"
        if (text is not None and text[1] - (2 << 30) <= run.va and end <= text[0] + (2 << 30)
                and not run.attrs.writable):
            return "module text (KASLR module region, within 2 GiB of the kernel)"
        lo, hi = self._fixmap(fmt)
        if lo <= run.va and end <= hi and not run.attrs.writable:
            return "KPTI trampoline alias (fixmap TRAMP_VALIAS)"
        if (lay["VMALLOC_START"] <= run.va and end <= lay["VMALLOC_END"]
                and not run.attrs.writable and run.page_size == 1 << fmt.page_shift):
            # probes/kprobes.c alloc_insn_page(): PAGE_KERNEL_ROX in vmalloc; the BPF JIT's
            # vmalloc'd images are made read-only executable too (bpf_jit_comp.c)
            return "generated code in vmalloc (kprobes instruction slots, BPF JIT)"
        return None

    def el0_exec_runs(self, runs: Sequence[Any]) -> list[Any]:
        """note_prot_uxn(): kernel leaves without UXN, by their own bits."""
        return [r for r in runs if (r.own if r.own is not None else r.attrs).uexec]

    def user_root(self, fmt: Format, mem: Any, root: int) -> tuple[int, str] | None:
        """tramp_pg_dir lies two pages below swapper_pg_dir (vmlinux.lds.S); KPTI's
        map_entry_trampoline() populates it, else it stays zero."""
        tramp = root - TRAMP_SWAPPER_OFFSET
        n = fmt.entries(fmt.top_level)
        if tramp < 0 or not mem.contains(tramp, n * 8):
            return None
        if not (fmt.kinds(mem.read_table(tramp, n), fmt.top_level) != 0).any():
            return None
        return tramp, "KPTI tramp_pg_dir (swapper_pg_dir - 0x2000)"

    def user_root_reasons(self, fmt: Format, runs: Sequence[Any]) -> list[str | None]:
        """map_entry_trampoline() (arch/arm64/mm/mmu.c): the trampoline text at TRAMP_VALIAS,
        read-only executable, and its data page read-only, in the fixmap."""
        lo, hi = self._fixmap(fmt)
        return ["entry trampoline (TRAMP_VALIAS)"
                if lo <= r.va and r.va + r.size <= hi and not r.attrs.writable
                and not r.attrs.user else None for r in runs]

OPS = Arm64Ops()

"""What every architecture module provides (:class:`ArchOps`) and the types it uses.

The entry codec of a format lives in :mod:`ptlab.formats`; everything else that differs
between architectures lives behind one :class:`ArchOps` object per architecture: the
kernel's level names, ptdump flag words and address markers, the W+X rule, control-register
decoding, format and root inference from registers or VMCOREINFO, kernel layout constants
and ELF core facts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..formats.base import Attrs, Format

__all__ = ["END", "ArchError", "ArchOps", "Marker", "WxCount", "folded_level_names", "size_text"]

U64 = (1 << 64) - 1


class ArchError(ValueError):
    """Registers, VMCOREINFO or names from which an architecture fact cannot be derived."""


@dataclass(frozen=True, slots=True)
class Marker:
    """``struct addr_marker``: a ptdump section of the address space starting at ``start``.
    ``max_lines`` > 0 caps the lines printed in the section (x86 ESPfix: 16)."""

    start: int
    name: str | None
    max_lines: int = 0


END = Marker(U64, None)  # { -1, NULL }


@dataclass(frozen=True, slots=True)
class WxCount:
    """What the kernel's DEBUG_WX walk counts: the W+X runs, their pages, and (arm64) the
    kernel pages executable at EL0."""

    runs: list[Any]
    wx_pages: int
    uxn_pages: int


def folded_level_names(levels: int) -> tuple[str, ...]:
    """The kernel's names for ``levels`` levels, leaf first: pte, pmd, pud, p4d as far as they
    exist, the root always pgd (include/asm-generic/pgtable-nop4d.h, -nopud.h, -nopmd.h fold
    the missing middle levels into the pgd)."""
    if not 1 <= levels <= 5:
        raise ArchError(f"the kernel names 1..5 page-table levels, not {levels!r}")
    return (*("pte", "pmd", "pud", "p4d")[: levels - 1], "pgd")


def size_text(delta: int, units: str) -> str:
    """The kernel's "%9lu%c": the largest unit that divides ``delta`` exactly."""
    unit = 0
    while not delta & 1023 and unit + 1 < len(units):
        delta >>= 10
        unit += 1
    return f"{delta:9d}{units[unit]}"


class ArchOps(ABC):
    """Architecture facts that are not the entry codec. One instance per architecture,
    from :func:`ptlab.arch.arch_for`."""

    name: str  # "x86_64" | "arm64": Format.arch, ElfCore.machine, Profile.arch
    # ELF cores (include/uapi/linux/elf-em.h; struct elf_prstatus of the arch's asm/elf.h)
    elf_machines: tuple[int, ...]  # e_machine values read as this arch; the first is written
    uname_machines: tuple[str, ...]  # utsname.machine values (kdump-compressed headers)
    prstatus_regs: tuple[str, ...]  # pr_reg names in order
    prstatus_size: int  # sizeof(struct elf_prstatus)
    qemu_cpustate_note: bool  # QEMU adds a "QEMU" note with the control registers
    root_symbol: str  # the kernel's root table: init_top_pgt / swapper_pg_dir
    page_kernel: Attrs  # PAGE_KERNEL: the kernel's RW data mapping
    capstone: tuple[str, str]  # capstone's CS_ARCH_* and CS_MODE_* names for kernel code
    max_insn: int  # longest instruction in bytes

    # --- formats and level names ---------------------------------------------------------
    def formats(self) -> list[Format]:
        """Every catalog configuration of this architecture."""
        from ..formats.catalog import all_configs

        return [f for f in all_configs() if f.arch == self.name]

    def level_names(self, levels: int) -> tuple[str, ...]:
        """The kernel's name of each level of a ``levels``-level table, leaf first."""
        return folded_level_names(levels)

    @abstractmethod
    def linear_map_base(self, fmt: Format) -> int:
        """The direct map's default base VA for ``fmt`` (PAGE_OFFSET without KASLR)."""

    @abstractmethod
    def direct_map(self, vmcoreinfo: Callable[[], Any],
                   read_variable: Callable[[str], int]) -> tuple[int, int]:
        """(base VA, PA it maps) of the running kernel's direct map, from ``vmcoreinfo()``
        or a kernel variable's value ``read_variable(name)``."""

    # --- VMCOREINFO ----------------------------------------------------------------------
    @abstractmethod
    def describes(self, vmci: Any) -> bool:
        """Whether ``vmci`` (a VmcoreInfo) carries this architecture's own keys."""

    @abstractmethod
    def pa_symbol(self, vmci: Any, name: str) -> int:
        """``__pa_symbol(name)`` from VMCOREINFO: the PA of a kernel-image symbol."""

    def vmcoreinfo_root(self, vmci: Any) -> int:
        """PA of the kernel's top table from VMCOREINFO (unchecked)."""
        return self.pa_symbol(vmci, self.root_symbol)

    # --- registers -----------------------------------------------------------------------
    @abstractmethod
    def format_from(self, regs: Mapping[str, int] | None, vmci: Any,
                    where: str = "registers") -> tuple[Format, str]:
        """The kernel's format from control registers ``regs`` (lower-case names, e.g. from
        QEMU) and/or VMCOREINFO, with the reason; ArchError when they disagree or say
        nothing. ``where`` names the registers' source in messages."""

    @abstractmethod
    def root_from_registers(self, regs: Mapping[str, int],
                            where: str = "registers") -> tuple[int, str]:
        """(root PA, reason) from the root register in ``regs``."""

    @abstractmethod
    def check_root(self, regs: Mapping[str, int], root: int, mem: Any,
                   isolation: bool) -> None:
        """ArchError unless the live root register in ``regs`` agrees with the kernel root
        ``root`` (``isolation``: KPTI/PTI on, the register may hold the user-side table)."""

    @abstractmethod
    def user_regime(self, regs: Mapping[str, int], kernel_root: int) -> bool:
        """Whether ``regs`` show the CPU on the page-table-isolation user tables."""

    # --- ptdump --------------------------------------------------------------------------
    # note_page() differences (arch/x86/mm/dump_pagetables.c vs arch/arm64/mm/ptdump.c)
    ptdump_first_start: bool  # the first note sets start_address (x86 leaves it 0)
    ptdump_caps_lines: bool  # markers with max_lines print "... N entries skipped ..."
    ptdump_recheck_marker: bool  # a second marker check after every note (arm64)

    @abstractmethod
    def ptdump_markers(self, fmt: Format, **overrides: Any) -> list[Marker]:
        """The kernel's ``address_markers[]`` for ``fmt``, END-terminated."""

    def ptdump_ranges(self, fmt: Format) -> list[tuple[int, int]]:
        """VA ranges the kernel's ptdump (and DEBUG_WX) walk covers."""
        return fmt.va_ranges()

    @abstractmethod
    def ptdump_names(self, fmt: Format) -> tuple[str, ...]:
        """The level names ptdump prints, by ptdump depth 0 (pgd) .. 4 (pte)."""

    @abstractmethod
    def ptdump_depth(self, fmt: Format, level: int, hole: bool) -> int:
        """ptdump depth of an entry at ``level`` (``hole``: an empty entry)."""

    @abstractmethod
    def ptdump_prot(self, raw: int, eff_raw: int, depth: int) -> tuple[object, tuple[str, ...]]:
        """(comparison key, printed words) of a leaf with own bits ``raw`` and effective bits
        ``eff_raw`` at ``depth``: note_page() starts a new line when the key changes."""

    @abstractmethod
    def ptdump_size_text(self, span: int) -> str:
        """The size column for a line spanning ``span`` bytes (as printed, 10 columns)."""

    @abstractmethod
    def ptdump_line(self, va: int, end: int, flags: tuple[str, ...], level: str) -> str:
        """One ptdump range line exactly as the kernel prints it (no newline)."""

    @abstractmethod
    def ptdump_words(self, words: list[str]) -> tuple[str, tuple[str, ...]] | None:
        """(level name, flag words) of a range line's words after the size, or None when
        they are not this architecture's."""

    # --- W+X -----------------------------------------------------------------------------
    def wx_count(self, runs: Sequence[Any], unit: int) -> WxCount:
        """The DEBUG_WX counts over walker runs (entries' bits whether present or not)."""
        wx = [r for r in runs if r.attrs.writable and r.attrs.exec]
        return WxCount(wx, sum(r.size // unit for r in wx), 0)

    @abstractmethod
    def wx_message(self, count: WxCount) -> str:
        """The kernel's "Checked W+X mappings" boot-log line for ``count``."""

    # --- check (ptlab.check) -------------------------------------------------------------
    @abstractmethod
    def image_range(self, fmt: Format) -> tuple[int, int]:
        """VA range the kernel image can be mapped in (its text is found there when
        VMCOREINFO does not say where ``_stext`` is)."""

    @abstractmethod
    def image_base(self, fmt: Format) -> int:
        """Where the kernel image's first byte (``_text``) is linked: its VA without KASLR."""

    @abstractmethod
    def exec_reason(self, fmt: Format, run: Any,
                    text: tuple[int, int] | None) -> str | None:
        """Why a kernel-executable ``run`` outside the kernel's text (``text``: its VA range
        when known) may be executable (module text, a trampoline), or None: data that should
        not be executable."""

    def el0_exec_runs(self, runs: Sequence[Any]) -> list[Any]:
        """Kernel runs user mode could execute although the architecture lets the kernel
        forbid it separately (arm64 UXN); none where one bit rules both (x86 NX)."""
        return []

    @abstractmethod
    def user_root(self, fmt: Format, mem: Any, root: int) -> tuple[int, str] | None:
        """(PA, what) of the page-table-isolation user-side root belonging to kernel root
        ``root`` (x86 PTI user PGD, arm64 KPTI tramp_pg_dir) when the memory holds a
        populated one, else None."""

    @abstractmethod
    def user_root_reasons(self, fmt: Format, runs: Sequence[Any]) -> list[str | None]:
        """Why the user-side root maps each of ``runs`` (its kernel half: entry code, the CPU
        entry area...), or None: a mapping the entry code does not need (a leak)."""

    def __repr__(self) -> str:
        return f"<ArchOps {self.name}>"

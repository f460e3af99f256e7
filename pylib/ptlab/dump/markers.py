"""The kernel's ptdump address markers (``struct addr_marker``) for x86-64 and arm64, 6.1.

x86-64: arch/x86/mm/dump_pagetables.c ``address_markers[]`` in enum order (CONFIG_KASAN off,
MODIFY_LDT_SYSCALL, X86_ESPFIX64 and EFI on, as in Debian's config), with the values of
arch/x86/include/asm/pgtable_64_types.h, page_64_types.h, cpu_entry_area.h and efi.h.
page_offset_base / vmalloc_base / vmemmap_base move with KASLR (RANDOMIZE_MEMORY): pass the
guest's values. arm64: arch/arm64/mm/ptdump.c with the layout of arch/arm64/include/asm/
memory.h and pgtable.h (the 5.11..6.4 layout: modules, vmalloc, fixmap, PCI I/O, vmemmap).
FIXADDR_START depends on the configured fixmap slots on both arches: the defaults are estimates,
pass the guest's value for exact section placement.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats.base import Format

__all__ = ["END", "Marker", "arm64_markers", "default_markers", "x86_markers"]

_U64 = 1 << 64
SZ_1M = 1 << 20


@dataclass(frozen=True, slots=True)
class Marker:
    """``struct addr_marker``: a section of the address space starting at ``start``.
    ``max_lines`` > 0 caps the lines printed in the section (x86 ESPfix: 16)."""

    start: int
    name: str | None
    max_lines: int = 0


END = Marker(_U64 - 1, None)  # { -1, NULL }

# x86-64 constants (6.1): L4 / L5 defaults where they differ.
X86_PAGE_OFFSET = {4: 0xFFFF_8880_0000_0000, 5: 0xFF11_0000_0000_0000}  # __PAGE_OFFSET_BASE_L*
X86_VMALLOC_BASE = {4: 0xFFFF_C900_0000_0000, 5: 0xFFA0_0000_0000_0000}  # __VMALLOC_BASE_L*
X86_VMEMMAP_BASE = {4: 0xFFFF_EA00_0000_0000, 5: 0xFFD4_0000_0000_0000}  # __VMEMMAP_BASE_L*
X86_LDT_BASE = {4: (-240 << 39) % _U64, 5: (-112 << 48) % _U64}  # LDT_PGD_ENTRY << PGDIR_SHIFT
X86_GUARD_HOLE = {4: (0xFFFF_8000_0000_0000, 0xFFFF_8800_0000_0000),
                  5: (0xFF00_0000_0000_0000, 0xFF10_0000_0000_0000)}  # GUARD_HOLE_{BASE,END}
X86_CPU_ENTRY_AREA_BASE = (-4 << 39) % _U64  # CPU_ENTRY_AREA_PGD << P4D_SHIFT
X86_ESPFIX_BASE = (-2 << 39) % _U64  # ESPFIX_PGD_ENTRY << P4D_SHIFT
X86_EFI_VA_END = (-68 << 30) % _U64  # EFI_VA_END
X86_START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
X86_MODULES_VADDR = X86_START_KERNEL_MAP + (1 << 30)  # + KERNEL_IMAGE_SIZE (1G with KASLR)
X86_MODULES_END = 0xFFFF_FFFF_FF00_0000
X86_FIXADDR_TOP = 0xFFFF_FFFF_FF7F_F000  # round_up(VSYSCALL_ADDR + PAGE_SIZE, PMD_SIZE) - 4K
X86_FIXADDR_PAGES = 647  # permanent fixmap slots (config dependent): estimate
ARM64_FIXADDR_PAGES = 525  # FIX_HOLE, FDT (2M), earlycon, text poke, GHES, tramp: estimate


def x86_markers(levels: int = 4, *, page_offset_base: int | None = None,
                vmalloc_base: int | None = None, vmemmap_base: int | None = None,
                fixaddr_start: int | None = None, ldt: bool = True, espfix: bool = True,
                efi: bool = True, kasan: tuple[int, int] | None = None) -> list[Marker]:
    """x86-64 ``address_markers[]`` for 4- or 5-level paging, END-terminated."""
    if levels not in (4, 5):
        raise ValueError(f"x86-64 paging has 4 or 5 levels, not {levels!r}")
    fix = fixaddr_start if fixaddr_start is not None else X86_FIXADDR_TOP - X86_FIXADDR_PAGES * 4096
    out = [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")]
    if ldt:
        out.append(Marker(X86_LDT_BASE[levels], "LDT remap"))
    out += [
        Marker(page_offset_base if page_offset_base is not None else X86_PAGE_OFFSET[levels],
               "Low Kernel Mapping"),
        Marker(vmalloc_base if vmalloc_base is not None else X86_VMALLOC_BASE[levels],
               "vmalloc() Area"),
        Marker(vmemmap_base if vmemmap_base is not None else X86_VMEMMAP_BASE[levels],
               "Vmemmap"),
    ]
    if kasan is not None:
        out += [Marker(kasan[0], "KASAN shadow"), Marker(kasan[1], "KASAN shadow end")]
    out.append(Marker(X86_CPU_ENTRY_AREA_BASE, "CPU entry Area"))
    if espfix:
        out.append(Marker(X86_ESPFIX_BASE, "ESPfix Area", 16))
    if efi:
        out.append(Marker(X86_EFI_VA_END, "EFI Runtime Services"))
    out += [
        Marker(X86_START_KERNEL_MAP, "High Kernel Mapping"),
        Marker(X86_MODULES_VADDR, "Modules"),
        Marker(X86_MODULES_END, "End Modules"),
        Marker(fix, "Fixmap Area"),
        END,
    ]
    return out


def arm64_layout(va_bits: int = 48, page_shift: int = 12) -> dict[str, int]:
    """arm64 kernel VA layout constants (arch/arm64/include/asm/memory.h, 6.1)."""
    va_min = min(va_bits, 48)  # VA_BITS_MIN
    page_offset = (-(1 << va_bits)) % _U64
    page_end = (-(1 << (va_min - 1))) % _U64  # _PAGE_END(VA_BITS_MIN)
    vmemmap_shift = page_shift - 6  # PAGE_SHIFT - STRUCT_PAGE_MAX_SHIFT
    vmemmap_start = (-(1 << (va_bits - vmemmap_shift))) % _U64
    vmemmap_size = (page_end - page_offset) >> vmemmap_shift
    pci_io_end = vmemmap_start - 8 * SZ_1M
    return {
        "PAGE_OFFSET": page_offset,
        "PAGE_END": page_end,
        "MODULES_VADDR": page_end,
        "MODULES_END": page_end + 128 * SZ_1M,
        "VMALLOC_START": page_end + 128 * SZ_1M,
        "VMALLOC_END": vmemmap_start - 256 * SZ_1M,
        "FIXADDR_TOP": vmemmap_start - 32 * SZ_1M,
        "PCI_IO_START": pci_io_end - 16 * SZ_1M,
        "PCI_IO_END": pci_io_end,
        "VMEMMAP_START": vmemmap_start,
        "VMEMMAP_END": vmemmap_start + vmemmap_size,
    }


def arm64_markers(va_bits: int = 48, page_shift: int = 12, *,
                  fixaddr_start: int | None = None) -> list[Marker]:
    """arm64 ``address_markers[]`` (no KASAN), END-terminated."""
    lay = arm64_layout(va_bits, page_shift)
    fix = fixaddr_start if fixaddr_start is not None else (
        lay["FIXADDR_TOP"] - ARM64_FIXADDR_PAGES * (1 << page_shift))
    return [
        Marker(lay["PAGE_OFFSET"], "Linear Mapping start"),
        Marker(lay["PAGE_END"], "Linear Mapping end"),
        Marker(lay["MODULES_VADDR"], "Modules start"),
        Marker(lay["MODULES_END"], "Modules end"),
        Marker(lay["VMALLOC_START"], "vmalloc() area"),
        Marker(lay["VMALLOC_END"], "vmalloc() end"),
        Marker(fix, "Fixmap start"),
        Marker(lay["FIXADDR_TOP"], "Fixmap end"),
        Marker(lay["PCI_IO_START"], "PCI I/O start"),
        Marker(lay["PCI_IO_END"], "PCI I/O end"),
        Marker(lay["VMEMMAP_START"], "vmemmap start"),
        Marker(lay["VMEMMAP_END"], "vmemmap end"),
        END,
    ]


def default_markers(fmt: Format, **overrides: object) -> list[Marker]:
    """The markers the kernel uses for ``fmt`` (keyword overrides as in x86_markers /
    arm64_markers)."""
    if fmt.arch == "x86_64":
        return x86_markers(fmt.levels, **overrides)  # type: ignore[arg-type]
    if fmt.arch == "arm64" and not fmt.upper:
        # efi_page_tables (drivers/firmware/efi/arm-runtime.c): the only TTBR0 dump
        return [Marker(0, "UEFI runtime start"), Marker(1 << min(fmt.va_bits, 48),
                                                        "UEFI runtime end"), END]
    if fmt.arch == "arm64":
        return arm64_markers(fmt.va_bits, fmt.page_shift, **overrides)  # type: ignore[arg-type]
    raise ValueError(f"no ptdump markers for arch {fmt.arch!r}")

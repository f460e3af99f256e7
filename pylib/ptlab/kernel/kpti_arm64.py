"""arm64 KPTI: the trampoline table, as arch/arm64/mm/mmu.c ``map_entry_trampoline`` (6.1).

With kpti, EL0 runs on ``tramp_pg_dir`` in TTBR1: it maps only the entry trampoline text
(``.entry.tramp.text``, at most 3 pages) at ``TRAMP_VALIAS`` =
``__fix_to_virt(FIX_ENTRY_TRAMP_TEXT1)``, with ``PAGE_KERNEL_ROX`` (``rodata_enabled``, else
``PAGE_KERNEL_EXEC``) minus ``PTE_NG`` ("always mapped and can therefore be global"),
page by page (``NO_BLOCK_MAPPINGS``), tables from ``__pgd_pgtable_alloc``. The same pages
go into the kernel's fixmap (``__set_fixmap(FIX_ENTRY_TRAMP_TEXT1 - i, ...)``) with the
same prot; the fixmap enum depends on the configuration, so the caller gives the VA (and,
arm64 kallsyms lacking the section symbols without KALLSYMS_ALL, the text's PA and size).
"""

from __future__ import annotations

from ..alloc import Allocator
from ..arch import arm64
from ..engine import PageTable
from ..formats.base import Attrs

PAGE = 4096
# (PROT_NORMAL & ~(PTE_WRITE | PTE_PXN)) | PTE_RDONLY, arch/arm64/include/asm/pgtable-prot.h
PAGE_KERNEL_ROX = arm64.PAGE_KERNEL.with_(writable=False, dbm=False, exec=True)
PAGE_KERNEL_EXEC = arm64.PAGE_KERNEL.with_(exec=True)  # PROT_NORMAL & ~PTE_PXN


def map_entry_trampoline(kernel: PageTable, pa_start: int, size: int, tramp_valias: int,
                         alloc: Allocator, *, rodata_enabled: bool = True,
                         root: int | None = None) -> PageTable:
    """Build ``tramp_pg_dir`` (at ``root`` if given, else a new table from ``alloc``):
    ``pa_start`` = ``__pa_symbol(__entry_tramp_text_start)``, ``size`` =
    ``entry_tramp_text_size()`` (rounded up to pages, as ``__create_pgd_mapping`` does)."""
    if pa_start % PAGE or not 0 < size <= 3 * PAGE:
        raise ValueError(f"trampoline text {pa_start:#x}+{size:#x}: not a page-aligned "
                         "1..3-page range (vmlinux.lds.S asserts <= 3 pages)")
    prot: Attrs = (PAGE_KERNEL_ROX if rodata_enabled else PAGE_KERNEL_EXEC).with_(global_=True)
    tramp = PageTable(kernel.fmt, kernel.mem, root=root, alloc=alloc, gather=kernel.gather)
    size = -(-size // PAGE) * PAGE
    tramp.map(tramp_valias, pa_start, size, kernel.fmt.normalize(prot), page_sizes=[PAGE])
    return tramp

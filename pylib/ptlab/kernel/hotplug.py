"""Memory hotplug: the direct map and vmemmap of a hot-added range, and their removal.

x86-64, arch/x86/mm/init_64.c (6.1): ``arch_add_memory`` → ``init_memory_mapping`` of
[start, end) (the CPU's 1G/2M policy through ``split_mem_range``, see
:mod:`.direct_map`), then ``__add_pages`` → ``sparse_add_section`` →
``__populate_section_memmap`` → ``vmemmap_populate`` → ``vmemmap_populate_hugepages``:
each 2M of vmemmap (``struct page`` = 64 bytes, so one 2M block per 128M section) gets a
``PAGE_KERNEL_LARGE`` PMD leaf on a block from ``vmemmap_alloc_block_buf``.
``arch_remove_memory`` → ``__remove_pages`` (``vmemmap_free`` → ``remove_pagetable``,
direct=false) and ``kernel_physical_mapping_remove`` (``remove_pagetable``, direct=true):
leaves cleared, then ``free_pte_table`` / ``free_pmd_table`` free tables left empty
(``free_pud_table`` only with 5 levels: ``remove_p4d_table``; the engine frees any table
left empty, which differs only if a PUD table empties — never here: the direct map's and
the vmemmap's PUD tables also hold boot RAM's).

arm64, arch/arm64/mm/mmu.c (6.1): ``arch_add_memory`` → ``__create_pgd_mapping`` with
NO_EXEC_MAPPINGS, plus NO_BLOCK_MAPPINGS | NO_CONT_MAPPINGS when ``can_set_direct_map()``
(rodata=full: a 4K linear map); ``vmemmap_populate`` maps PMD blocks
(``pmd_set_huge``, PROT_SECT_NORMAL). ``arch_remove_memory`` → ``__remove_pgd_mapping``
→ ``unmap_hotplug_range`` + ``free_empty_tables`` (every level below the PGD).

Whatever the kernel's page allocator picks (the vmemmap blocks' PAs) is an input, as the
secretmem pages are: the model predicts where and how they are mapped, not which frames.
Onlining and offlining (``online_pages`` / ``offline_pages``) change no kernel table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..alloc import Allocator
from ..engine import PageTable
from ..formats.base import Attrs
from .direct_map import G1, K4, M2, Ranges, init_memory_mapping

STRUCT_PAGE = 64  # sizeof(struct page) in the Debian 6.1 kernels (STRUCT_PAGE_MAX_SHIFT 6)


def vmemmap_range(vmemmap: int, start: int, end: int, page: int = K4) -> tuple[int, int]:
    """[va, va_end) of the ``struct page`` array for PAs [start, end) (``pfn_to_page``)."""
    return vmemmap + start // page * STRUCT_PAGE, vmemmap + end // page * STRUCT_PAGE


@dataclass
class HotplugCost:
    """What the model's operation did to the tables."""

    tables_allocated: int = 0
    tables_freed: int = 0
    flushes: int = 0


def vmemmap_populate_hugepages(pt: PageTable, va: int, end: int, prot: Attrs,
                               blocks: Mapping[int, int]) -> None:
    """One PMD leaf per 2M of [va, end) where nothing is mapped yet; ``blocks``: the PA the
    kernel's ``vmemmap_alloc_block_buf`` returned for each 2M VA (an existing leaf is kept:
    ``vmemmap_verify``)."""
    for blk in range(va - va % M2, end, M2):
        if pt.lookup(blk) is not None:
            continue
        if blk not in blocks:
            raise ValueError(f"no vmemmap block PA for {blk:#x}")
        pt.map(blk, blocks[blk], M2, prot, page_sizes=[M2])


class KernelPages(Allocator):
    """The kernel's table pages: new ones from ``inner``; any table may be freed
    (``free_pagetable``), those ``inner`` did not hand out are recorded in ``foreign``."""

    def __init__(self, inner: Allocator) -> None:
        self.inner, self.page_size, self.mem = inner, inner.page_size, inner.mem
        self.allocated = 0
        self.foreign: list[int] = []

    def reserve(self, n: int) -> list[int]:
        out = self.inner.reserve(n)
        self.allocated += len(out)
        return out

    def free(self, pa: int) -> None:
        if self.inner.owns(pa):
            self.inner.free(pa)
        else:
            self.foreign.append(pa)

    def owns(self, pa: int) -> bool:
        return True

    def pa_range(self) -> tuple[int, int] | None:
        return self.inner.pa_range()


def _run(pt: PageTable, op: Callable[[], None]) -> HotplugCost:
    inner = pt.alloc
    pt.alloc = kp = KernelPages(inner)
    freed0, flush0 = pt.gather.stats.tables_freed, pt.gather.stats.flushes
    try:
        op()
        pt.gather.flush()
    finally:
        pt.alloc = inner
    return HotplugCost(kp.allocated, pt.gather.stats.tables_freed - freed0,
                       pt.gather.stats.flushes - flush0)


def x86_arch_add_memory(pt: PageTable, page_offset: int, start: int, size: int,
                        memory: Ranges, prot: Attrs, *, gbpages: bool, vmemmap: int,
                        blocks: Mapping[int, int]) -> HotplugCost:
    """``arch_add_memory``: direct map of [start, start+size) + its vmemmap."""
    sizes = frozenset({M2, G1} if gbpages else {M2})

    def op() -> None:
        init_memory_mapping(pt, page_offset, start, start + size, memory, prot, sizes)
        vmemmap_populate_hugepages(pt, *vmemmap_range(vmemmap, start, start + size), prot,
                                   blocks)
    return _run(pt, op)


def arch_remove_memory(pt: PageTable, linear: int, start: int, size: int,
                       vmemmap: int) -> HotplugCost:
    """``arch_remove_memory`` (x86 ``remove_pagetable`` twice, arm64
    ``unmap_hotplug_range`` + ``free_empty_tables``): the vmemmap and the linear map of
    the range unmapped, tables left empty freed. ``linear``: VA of PA 0 (x86 page_offset,
    arm64 PAGE_OFFSET - PHYS_OFFSET). Whole vmemmap blocks only (sections of 128M)."""
    vlo, vhi = vmemmap_range(vmemmap, start, start + size)
    if vlo % M2 or vhi % M2:
        raise ValueError(f"[{start:#x}, +{size:#x}) is not whole 128M sections")

    def op() -> None:
        pt.unmap(vlo, vhi - vlo, free_tables=True)
        pt.unmap((linear + start) % (1 << 64), size, free_tables=True)
    return _run(pt, op)


def arm64_arch_add_memory(pt: PageTable, linear: int, start: int, size: int, prot: Attrs,
                          *, can_set_direct_map: bool, vmemmap: int,
                          blocks: Mapping[int, int], vmemmap_prot: Attrs) -> HotplugCost:
    """``arch_add_memory``: ``__create_pgd_mapping`` (PXNTable on new tables; 4K only with
    rodata=full) + ``vmemmap_populate`` (PMD blocks)."""
    sizes = pt.page_sizes()
    allowed: Sequence[int] = [K4] if can_set_direct_map else sorted(sizes)

    def op() -> None:
        lm = PageTable(pt.fmt, pt.mem, root=pt.root, alloc=pt.alloc, gather=pt.gather,
                       table_attrs=pt.fmt.table_attrs().with_(exec=False))
        lm.map((linear + start) % (1 << 64), start, size, prot, page_sizes=allowed)
        vmemmap_populate_hugepages(pt, *vmemmap_range(vmemmap, start, start + size),
                                   vmemmap_prot, blocks)
    return _run(pt, op)

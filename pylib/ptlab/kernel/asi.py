"""ASI: a second, *nonsensitive* kernel root that shares the kernel's sub-tables.

Models Address Space Isolation as in bjackman/linux arch/x86/mm/asi.c (out of tree; no
released kernel has it): one nonsensitive root next to the kernel's (``init_mm.pgd``);
``asi_clone_range`` shares whole upper-level entries, so every later change below them is
seen through both roots; the tables of the private ranges are preallocated at init
(``asi_init``), so the top entries never change afterwards and ``asi_map`` — which makes
a nonsensitive page of a private range visible, at pageblock granularity — never
allocates. What is shared and what is private is data (:class:`Region`), not code.

Map-path guarantees made checkable: :meth:`Asi.map` / :meth:`Asi.unmap` run through a
view of the nonsensitive root whose allocator is a :class:`NoAllocAllocator` (it would
raise on any table need: ``noalloc.refused`` counts attempts), and every table page is
charged to its owner by the :class:`AccountingAllocator` the root was built with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..alloc import Allocator, NoAllocAllocator
from ..arch import x86_64
from ..engine import PageTable
from ..formats.base import Kind


class AsiError(Exception):
    """A policy or map request the nonsensitive root cannot honour."""


@dataclass(frozen=True)
class Region:
    """[start, end) of the kernel's VA space: ``share`` links the kernel's tables below
    the ``level`` entries (asi_clone_range); ``private`` preallocates own tables down to
    ``level`` entries, which :meth:`Asi.map` later points at the kernel's (one entry of
    ``level`` = one pageblock)."""

    name: str
    start: int
    end: int
    how: Literal["share", "private"]
    level: int


def x86_policy(levels: int = 4, direct_map_size: int = 1 << 30,
               direct_map_base: int | None = None,
               vmemmap_base: int | None = None) -> list[Region]:
    """A nonsensitive policy for x86-64 (layout from arch/x86/include/asm/
    pgtable_64_types.h, page_64_types.h): kernel image, modules and fixmap, the CPU entry
    area and vmemmap shared at the top level; the direct map private at pmd level (2M
    pageblocks); everything else (vmalloc, LDT, ESPFIX, EFI) absent. The bases default to
    the unrandomised ones; a RANDOMIZE_MEMORY kernel's are ``page_offset_base`` and
    ``vmemmap_base`` (arch/x86/mm/kaslr.c)."""
    top = levels - 1
    pgd = 1 << (12 + 9 * top)  # what one top-level entry maps
    dm = x86_64.PAGE_OFFSET[levels] if direct_map_base is None else direct_map_base
    vmm = x86_64.VMEMMAP_BASE[levels] if vmemmap_base is None else vmemmap_base
    vmm -= vmm % pgd
    return [
        Region("direct map", dm, dm + direct_map_size, "private", 1),
        Region("vmemmap", vmm, vmm + pgd, "share", top),
        Region("cpu_entry_area", x86_64.CPU_ENTRY_AREA_BASE, x86_64.CPU_ENTRY_AREA_BASE + pgd,
               "share", top),
        Region("kernel image, modules, fixmap", (-pgd) % (1 << 64), 1 << 64, "share", top),
    ]


class Asi:
    """The nonsensitive root for ``kernel`` under ``policy``; tables from ``alloc``
    (an AccountingAllocator naming the owner, e.g. ``owner="asi"``)."""

    def __init__(self, kernel: PageTable, policy: Sequence[Region], alloc: Allocator) -> None:
        self.kernel, self.policy = kernel, list(policy)
        self.root = PageTable(kernel.fmt, kernel.mem, alloc=alloc, gather=kernel.gather)
        self.prepared = 0
        for r in self.policy:  # asi_init: everything the map path will ever need
            if r.how == "share":
                self.root.share(kernel, r.start, r.end - r.start, r.level)
            elif r.how == "private":
                self.prepared += self.root.preallocate(r.start, r.end - r.start, r.level)
            else:
                raise AsiError(f"region {r.name!r}: unknown policy {r.how!r}")
        self.noalloc = NoAllocAllocator(kernel.fmt.table_bytes)
        self.atomic = PageTable(kernel.fmt, kernel.mem, root=self.root.root,
                                alloc=self.noalloc, gather=kernel.gather)

    def _private(self, va: int, size: int) -> Region:
        for r in self.policy:
            if r.how == "private" and r.start <= va and va + size <= r.end:
                esz = self.kernel.fmt.entry_size(r.level)
                if va % esz or size % esz:
                    raise AsiError(f"{r.name}: [{va:#x}, +{size:#x}) is not in whole "
                                   f"{esz:#x}-byte pageblocks")
                return r
        raise AsiError(f"[{va:#x}, +{size:#x}) is not inside one private region")

    def map(self, va: int, size: int) -> None:
        """``asi_map``: make the kernel's mapping of [va, va+size) nonsensitive. Each
        pageblock's entry points to the kernel's table below it (or copies its leaf of
        that size); the kernel's tables are never changed, nothing is allocated."""
        r = self._private(va, size)
        esz = self.kernel.fmt.entry_size(r.level)
        for blk in range(va, va + size, esz):
            t = self.kernel.translate(blk)
            step = next((s for s in t.steps if s.level == r.level), None)
            if step is None or step.entry.kind is Kind.EMPTY:
                raise AsiError(f"{blk:#x}: the kernel maps nothing there at level {r.level}")
            if step.entry.kind is Kind.LEAF and t.level != r.level:
                raise AsiError(f"{blk:#x}: kernel leaf at level {t.level} > {r.level}")
        self.atomic.share(self.kernel, va, size, r.level)

    def unmap(self, va: int, size: int) -> None:
        """``asi_unmap``: make [va, va+size) sensitive again (the kernel keeps it)."""
        r = self._private(va, size)
        esz = self.kernel.fmt.entry_size(r.level)
        for blk in range(va, va + size, esz):
            step = next(s for s in self.atomic.translate(blk).steps if s.level == r.level)
            if step.entry.kind is Kind.TABLE:
                self.atomic.unshare(blk, esz, r.level)
            elif step.entry.kind is Kind.LEAF:
                self.atomic.unmap(blk, esz)  # the copied leaf is the root's own

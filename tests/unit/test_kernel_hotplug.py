"""The memory-hotplug model: x86 arch_add_memory / arch_remove_memory, arm64 arch_add_memory.

Expected layouts follow the kernel's rules by hand (comments)."""

from __future__ import annotations

import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.arch import arm64, x86_64
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.direct_map import init_mem_mapping
from ptlab.kernel.hotplug import (
    arch_remove_memory,
    arm64_arch_add_memory,
    vmemmap_range,
    x86_arch_add_memory,
)
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Walker

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
DM = x86_64.PAGE_OFFSET[4]
VMEMMAP = 0xFFFF_EA00_0000_0000  # x86 VMEMMAP_START (4-level, no KASLR)
QEMU_1G = [(0, 0x9F000), (0x10_0000, 0x3FFE_0000)]
DIMM = (4 * G1, 384 << 20)  # QEMU puts the first pc-dimm at 4G


def table(name: str) -> PageTable:
    mem = SparseMemory()
    return PageTable(by_name(name), mem,
                     alloc=NormalAllocator(PhysPool(mem, 1 << 40, 64 << 20)))


def sizes(pt: PageTable, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(VA, end, page size) runs merged across attributes."""
    out: list[tuple[int, int, int]] = []
    for r in Walker(pt.fmt, pt.mem, pt.root, ignore_ad=True).run_table(lo, hi):
        if out and out[-1][1] == r.va and out[-1][2] == r.page_size:
            out[-1] = (out[-1][0], r.end, r.page_size)
        else:
            out.append((r.va, r.end, r.page_size))
    return out


def booted_x86() -> PageTable:
    pt = table("x86_64-4level")
    init_mem_mapping(pt, DM, QEMU_1G, x86_64.PAGE_KERNEL, gbpages=True)
    v0, v1 = vmemmap_range(VMEMMAP, 0, 1 * G1)  # boot vmemmap: 16M of 2M blocks
    for i, va in enumerate(range(v0, v1, M2)):
        pt.map(va, (2 << 30) + i * M2, M2, x86_64.PAGE_KERNEL, page_sizes=[M2])
    return pt


def blocks(lo: int, hi: int, pa: int = 3 << 30) -> dict[int, int]:
    return {va: pa + i * M2 for i, va in enumerate(range(lo, hi, M2))}


def test_x86_add_maps_dimm_with_2m_and_vmemmap_blocks():
    pt = booted_x86()
    start, size = DIMM
    v0, v1 = vmemmap_range(VMEMMAP, start, start + size)
    assert (v0, v1 - v0) == (VMEMMAP + (64 << 20), 6 << 20)  # 64 bytes per 4K page
    cost = x86_arch_add_memory(pt, DM, start, size, [*QEMU_1G, (start, start + size)],
                               x86_64.PAGE_KERNEL, gbpages=True, vmemmap=VMEMMAP,
                               blocks=blocks(v0, v1))
    # 384M at 4G is 1G-aligned but not a whole 1G: 2M pages (split_mem_range), one new PMD
    # table in the (existing) PUD table; the vmemmap's PMD table already exists
    assert sizes(pt, DM + start, DM + start + G1) == [(DM + start, DM + start + size, M2)]
    assert sizes(pt, v0, v0 + G1) == [(v0, v1, M2)]
    assert pt.translate(v0 + M2).pa == (3 << 30) + M2
    assert cost.tables_allocated == 1 and cost.tables_freed == 0
    rem = arch_remove_memory(pt, DM, start, size, VMEMMAP)
    assert sizes(pt, DM + start, DM + start + G1) == [] and sizes(pt, v0, v0 + G1) == []
    assert rem.tables_freed == 1  # the direct map's PMD table; the vmemmap's stays in use
    assert sizes(pt, VMEMMAP, VMEMMAP + (16 << 20)) == [(VMEMMAP, VMEMMAP + (16 << 20), M2)]


def test_x86_add_without_gbpages_and_4k_head():
    pt = booted_x86()
    start = 4 * G1 + K4 * 3  # not 2M aligned: a 4K head (split_mem_range)
    v0, v1 = vmemmap_range(VMEMMAP, 4 * G1, 4 * G1 + (128 << 20))
    x86_arch_add_memory(pt, DM, start, (128 << 20) - 3 * K4, [(start, 4 * G1 + (128 << 20))],
                        x86_64.PAGE_KERNEL, gbpages=False, vmemmap=VMEMMAP,
                        blocks=blocks(v0, v1))
    got = sizes(pt, DM + 4 * G1, DM + 5 * G1)
    assert got == [(DM + start, DM + 4 * G1 + M2, K4),
                   (DM + 4 * G1 + M2, DM + 4 * G1 + (128 << 20), M2)]


def test_remove_refuses_partial_sections():
    with pytest.raises(ValueError, match="whole 128M sections"):
        arch_remove_memory(booted_x86(), DM, 4 * G1, 64 << 20, VMEMMAP)


def test_missing_vmemmap_block_is_an_error():
    with pytest.raises(ValueError, match="no vmemmap block"):
        x86_arch_add_memory(booted_x86(), DM, *DIMM, [], x86_64.PAGE_KERNEL, gbpages=True,
                            vmemmap=VMEMMAP, blocks={})


def test_arm64_add_is_4k_with_rodata_full_and_remove_frees_tables():
    pt = table("arm64-4k-48")
    lay = arm64.layout(48, 12)
    po, phys = lay["PAGE_OFFSET"], 0x4000_0000
    linear = po - phys
    vmemmap = (lay["VMEMMAP_START"] - phys // K4 * 64) % (1 << 64)
    start, size = 0x1_4000_0000, 128 << 20
    v0, v1 = vmemmap_range(vmemmap, start, start + size)
    cost = arm64_arch_add_memory(pt, linear, start, size, arm64.PAGE_KERNEL,
                                 can_set_direct_map=True, vmemmap=vmemmap,
                                 blocks=blocks(v0, v1, 0x4800_0000),
                                 vmemmap_prot=arm64.PAGE_KERNEL)
    va = (linear + start) % (1 << 64)
    assert sizes(pt, va, va + size) == [(va, va + size, K4)]
    assert sizes(pt, v0, v1) == [(v0, v1, M2)]
    # linear: 64 PTE tables + 1 PMD + 1 PUD; vmemmap: 1 PMD + 1 PUD
    assert cost.tables_allocated == 68
    rem = arch_remove_memory(pt, linear, start, size, vmemmap)
    assert rem.tables_freed == 68 and pt.table_count() == 1


def test_remove_counts_tables_the_model_did_not_allocate():
    """On a real guest the freed tables are the kernel's (an overlay's allocator never
    handed them out): they are freed and counted all the same (``free_pagetable``)."""
    pt = booted_x86()
    start, size = DIMM
    v0, v1 = vmemmap_range(VMEMMAP, start, start + size)
    x86_arch_add_memory(pt, DM, start, size, [], x86_64.PAGE_KERNEL, gbpages=True,
                        vmemmap=VMEMMAP, blocks=blocks(v0, v1))
    pmd = pt.translate(DM + start).steps[-1].entry_pa & ~0xFFF
    other = NormalAllocator(PhysPool(pt.mem, 1 << 41, 1 << 20))
    pt.alloc = other
    rem = arch_remove_memory(pt, DM, start, size, VMEMMAP)
    assert rem.tables_freed == 1 and pt.alloc is other and other.pool.allocated == 0
    assert not other.owns(pmd) and pt.translate(DM + start).pa is None

"""ASI's nonsensitive root on a model kernel: canary hidden, subset page for page, no
allocation on the map path, every table page charged to its owner."""

from __future__ import annotations

import pytest
from ptlab.alloc import (
    AccountingAllocator,
    AllocError,
    NormalAllocator,
    PageListAllocator,
    PhysPool,
)
from ptlab.arch import x86_64
from ptlab.engine import PageTable
from ptlab.formats.base import Kind
from ptlab.formats.catalog import by_name
from ptlab.kernel.asi import Asi, AsiError, x86_policy
from ptlab.kernel.set_direct_map import set_direct_map_invalid_noflush
from ptlab.memory.sparse import SparseMemory
from ptlab.testing import raw_tables
from ptlab.walk import Walker

K4, M2 = 1 << 12, 1 << 21
DM = x86_64.PAGE_OFFSET[4]
TEXT = 0xFFFF_FFFF_8100_0000
CANARY = DM + M2 + 0x3000  # in pageblock 1, which stays sensitive
PK = x86_64.PAGE_KERNEL
TEXT_RX = PK.with_(writable=False, dirty=False, exec=True)


def model_kernel() -> tuple[PageTable, AccountingAllocator, AccountingAllocator]:
    """init_mm: an 8 MiB direct map (4 MiB of ptes, then 2M leaves), 2M of kernel text,
    one cpu_entry_area page; the ASI root gets its own pool, owner "asi"."""
    fmt, mem = by_name("x86_64-4level"), SparseMemory()
    kalloc = AccountingAllocator(NormalAllocator(PhysPool(mem, 0x1000_0000, 4 << 20)),
                                 owner="init_mm")
    aalloc = AccountingAllocator(NormalAllocator(PhysPool(mem, 0x2000_0000, 4 << 20)),
                                 owner="asi")
    k = PageTable(fmt, mem, alloc=kalloc)
    k.map(DM, 0, 4 << 20, PK, page_sizes=[K4])
    k.map(DM + (4 << 20), 4 << 20, 4 << 20, PK)
    k.map(TEXT, 0x100_0000, M2, TEXT_RX)
    k.map(x86_64.CPU_ENTRY_AREA_BASE, 0x50_0000, K4, PK)
    return k, kalloc, aalloc


def tables(pt: PageTable) -> set[int]:
    return raw_tables(pt.fmt, pt.mem, pt.root)


def pages(pt: PageTable) -> dict[int, tuple[int, object]]:
    """VA -> (PA, effective attrs) of every present 4K page of the kernel half."""
    out = {}
    for r in Walker(pt.fmt, pt.mem, pt.root, ignore_ad=True).run_table(1 << 63, 1 << 64):
        for off in range(0, r.size, K4):
            out[r.va + off] = (r.pa + off, r.attrs)
    return out


def test_canary_hidden_subset_page_for_page_and_accounting() -> None:
    k, kalloc, aalloc = model_kernel()
    policy = x86_policy(4, 8 << 20)
    empty_top = [r for r in policy if r.how == "share"
                 and k.translate(r.start).steps[0].entry.kind is Kind.EMPTY]
    kernel_before = kalloc.charged("init_mm")
    asi = Asi(k, policy, aalloc)
    # sharing a top entry the kernel had not populated makes the kernel populate it (the
    # extra kernel tables ASI costs: here vmemmap's pud table)
    assert [r.name for r in empty_top] == ["vmemmap"]
    assert kalloc.charged("init_mm") - kernel_before == len(empty_top)
    # the ASI root's own tables: its root + the direct map's pud and pmd tables
    assert asi.prepared == 2 and aalloc.charged("asi") == 3
    assert aalloc.charged("asi") == len(tables(asi.root) - tables(k))
    charged = (kalloc.totals(), aalloc.totals())
    asi.map(DM, M2)  # pageblock 0: the kernel's pte table, shared
    asi.map(DM + (4 << 20), M2)  # a 2M leaf: copied at that level
    assert asi.noalloc.refused == 0 and (kalloc.totals(), aalloc.totals()) == charged
    assert k.translate(CANARY).pa == M2 + 0x3000
    assert asi.root.translate(CANARY).fault is not None
    assert asi.root.translate(TEXT + 0x1234).pa == 0x100_1234
    kp, ap = pages(k), pages(asi.root)
    assert all(kp.get(va) == v for va, v in ap.items())  # nonsensitive ⊆ unrestricted
    assert len(ap) == 512 + 512 + 512 + 1  # two pageblocks, the text, the entry area
    assert CANARY not in ap and CANARY in kp


def test_changes_below_a_shared_entry_are_seen_through_both_roots() -> None:
    k, _, aalloc = model_kernel()
    asi = Asi(k, x86_policy(4, 8 << 20), aalloc)
    asi.map(DM, M2)
    set_direct_map_invalid_noflush(k, DM + 0x5000)  # secretmem on a nonsensitive page
    assert asi.root.translate(DM + 0x5000).fault is not None
    asi.unmap(DM, M2)
    assert asi.root.translate(DM + 0x6000).fault is not None
    assert k.translate(DM + 0x6000).pa == 0x6000  # the kernel keeps its pte table
    asi.map(DM, M2)
    assert asi.root.translate(DM + 0x6000).pa == 0x6000 and asi.noalloc.refused == 0


def test_map_path_refuses_what_would_allocate_or_change_the_kernel() -> None:
    k, kalloc, aalloc = model_kernel()
    asi = Asi(k, x86_policy(4, 1 << 30), aalloc)
    k.map(DM + (64 << 20), 64 << 20, M2 * 2, PK)
    before = kalloc.totals()
    with pytest.raises(AsiError, match="not inside"):
        asi.map(0xFFFF_C900_0000_0000, M2)  # vmalloc: not in the policy
    with pytest.raises(AsiError, match="pageblocks"):
        asi.map(DM, K4)
    with pytest.raises(AsiError, match="maps nothing"):
        asi.map(DM + (32 << 20), M2)
    # the negative control: a map outside the prepared tables needs tables and is refused
    with pytest.raises(AllocError):
        asi.atomic.map(0xFFFF_C900_0000_0000, 0, K4, PK)
    assert asi.noalloc.refused == 1 and kalloc.totals() == before


def test_randomised_bases_and_tables_in_given_scattered_pages() -> None:
    """A RANDOMIZE_MEMORY layout (direct map, vmemmap moved), and the root's own tables in
    a list of scattered pages (as a guest pins them): only those pages are used."""
    fmt, mem = by_name("x86_64-4level"), SparseMemory()
    k = PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 0x1000_0000, 1 << 20)))
    dm, vmm = 0xFFFF_9A40_0000_0000, 0xFFFF_D3C0_4000_0000  # PUD-aligned, as kaslr.c does
    k.map(dm, 0, 4 << 20, PK)
    k.map(vmm, 0x60_0000, K4, PK)
    k.map(TEXT, 0x100_0000, M2, TEXT_RX)
    policy = x86_policy(4, 1 << 30, dm, vmm)
    assert policy[0].start == dm and policy[1].start == vmm - vmm % (1 << 39)
    pages = [0x3000_0000 + i * 0x5000 for i in (7, 2, 11, 4)]  # scattered, any order
    lst = PageListAllocator(mem, pages)
    asi = Asi(k, policy, AccountingAllocator(lst, owner="asi"))
    asi.map(dm + M2, M2)
    assert lst.in_use() == [pa for pa in pages if pa in tables(asi.root)]
    assert len(lst.in_use()) == 3 and asi.root.root == pages[0]
    assert asi.root.translate(vmm).pa == 0x60_0000 and asi.root.translate(dm).fault
    assert asi.root.translate(dm + M2 + 0x1000).pa == M2 + 0x1000
    with pytest.raises(AllocError, match="exhausted"):
        lst.reserve(2)
    with pytest.raises(ValueError, match="distinct"):
        PageListAllocator(mem, [0x1000, 0x1000])

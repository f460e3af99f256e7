"""set_direct_map_* / set_memory_* on the engine: the kernel's CPA and pageattr rules.

Expected raw entries are built here from the architecture's bit definitions (not through
the format's encoder), and expected split counts from the kernel's rules.
"""

from __future__ import annotations

import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.arm64 import Arm64
from ptlab.formats.catalog import by_name
from ptlab.kernel.cpa import CpaError, change_page_attr_set_clr
from ptlab.kernel.set_direct_map import (
    Arm64Config,
    set_direct_map_default_noflush,
    set_direct_map_invalid_noflush,
    set_memory,
)
from ptlab.memory.overlay import OverlayMemory
from ptlab.memory.sparse import SparseMemory
from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder
from ptlab.tlb import Gather

G1, M2, K4 = 1 << 30, 1 << 21, 1 << 12
X86_DM = 0xFFFF_8880_0000_0000
SCRATCH = (1 << 40, (1 << 40) + (16 << 20))
# arch/x86/include/asm/pgtable_types.h
P, RW, A, D, G, NX = 1, 2, 1 << 5, 1 << 6, 1 << 8, 1 << 63
PFN_MASK = ((1 << 52) - 1) & ~0xFFF


def x86_guest() -> tuple[PageTable, TableBuilder]:
    """A direct map as a 6.1 x86 kernel with gbpages builds it: [0, 1G) one 1G leaf,
    [1G, 1G+8M) 2M leaves, written without the engine; the engine works on an overlay."""
    fmt = by_name("x86_64-4level")
    b = TableBuilder(fmt, SparseMemory(1 << 34))  # a 16 GiB 'guest'
    pk = fmt.normalize(X86_PAGE_KERNEL)
    b.map(X86_DM, 0, G1, pk, level=2)
    b.map(X86_DM + G1, G1, 8 << 20, pk, level=1)
    ov = OverlayMemory(b.mem, [SCRATCH])
    pool = PhysPool(ov, SCRATCH[0], SCRATCH[1] - SCRATCH[0])
    return PageTable(fmt, ov, root=b.root, alloc=NormalAllocator(pool), gather=Gather()), b


def raw_at(pt: PageTable, va: int) -> tuple[int, int]:
    step = pt.translate(va).steps[-1]
    return step.level, step.raw


def test_x86_invalid_splits_1g_then_2m_and_keeps_inverted_pfn() -> None:
    pt, _ = x86_guest()
    pa = 0x1234_5000
    res = set_direct_map_invalid_noflush(pt, X86_DM + pa)
    assert dict(res.splits) == {2: 1, 1: 1}  # 1G -> 2M leaves, then the one 2M -> 4K
    assert res.changed == [(X86_DM + pa, K4)]
    level, raw = raw_at(pt, X86_DM + pa)
    # pfn_pte(pfn, prot & ~(P|RW), G dropped by pgprot_clear_protnone_bits), PFN inverted
    assert (level, raw) == (0, (~pa & PFN_MASK) | A | D | NX)
    assert pt.alloc.pool.allocated == 2  # one pmd table, one pte table
    assert pt.gather.flushes == 0  # noflush: the caller flushes
    # neighbours keep the large page's prot at the smaller size
    assert raw_at(pt, X86_DM + pa + K4) == (0, (pa + K4) | P | RW | A | D | G | NX)
    assert raw_at(pt, X86_DM + pa + M2) == (1, ((pa + M2) & ~(M2 - 1)) | P | RW | A | D | 1 << 7
                                            | G | NX)
    # a second page of the same 2M: no further split
    assert not set_direct_map_invalid_noflush(pt, X86_DM + pa + 3 * K4).splits


def test_x86_default_restores_present_rw_without_global_and_split_stays() -> None:
    pt, _ = x86_guest()
    pa = 0x3000_0000 + 7 * K4
    set_direct_map_invalid_noflush(pt, X86_DM + pa)
    res = set_direct_map_default_noflush(pt, X86_DM + pa)
    assert not res.splits and res.changed == [(X86_DM + pa, K4)]
    # __set_pages_p sets P|RW only: _PAGE_GLOBAL, cleared on the way out, stays cleared
    assert raw_at(pt, X86_DM + pa) == (0, pa | P | RW | A | D | NX)
    assert raw_at(pt, X86_DM + pa - K4)[0] == 0  # 6.1 CPA never re-merges: still 4K
    assert pt.translate(X86_DM + pa).pa == pa


def test_x86_large_page_preserved_when_fully_covered_or_same_prot() -> None:
    pt, _ = x86_guest()
    va = X86_DM + G1 + M2  # a 2M leaf
    res = set_memory(pt, "ro", va, 512)  # exactly one aligned 2M page: changed in place
    assert not res.splits and res.preserved == 1 and res.changed == [(va, M2)]
    assert raw_at(pt, va) == (1, (G1 + M2) | P | A | D | 1 << 7 | G | NX)  # RW cleared (6.1)
    assert pt.gather.flushes == 1
    res = set_memory(pt, "ro", va + 5 * K4, 3)  # already RO: sameprot, no split
    assert not res.splits and res.preserved == 1 and not res.changed
    assert pt.gather.flushes == 1  # nothing changed, nothing flushed


def test_x86_range_across_two_2m_pages_inside_a_1g_leaf() -> None:
    pt, _ = x86_guest()
    va = X86_DM + 5 * M2 - 2 * K4  # last two pages of one 2M, first two of the next
    res = set_memory(pt, "nx", va, 4)  # already NX: the direct map is NX
    assert not res.splits and pt.gather.flushes == 0
    res = set_memory(pt, "x", va, 4)
    assert dict(res.splits) == {2: 1, 1: 2} and len(res.changed) == 4
    assert pt.gather.flushes == 1
    assert all(not (raw_at(pt, va + i * K4)[1] >> 63) for i in range(4))
    assert raw_at(pt, va - K4)[1] >> 63 and raw_at(pt, va + 4 * K4)[1] >> 63


def test_x86_holes_skipped_in_direct_map_else_efault() -> None:
    pt, _ = x86_guest()
    hole = X86_DM + G1 + (8 << 20)  # just past the mapped range
    res = change_page_attr_set_clr(pt, hole - K4, 3, {}, {"present": False})
    assert res.holes == 2 and len(res.changed) == 1
    with pytest.raises(CpaError, match="zero pte"):
        change_page_attr_set_clr(pt, hole, 1, {}, {"present": False}, holes_ok=False)


def arm64_guest(level: int = 0) -> tuple[PageTable, TableBuilder, int]:
    fmt = Arm64(4096, 48, upper=True)
    b = TableBuilder(fmt, SparseMemory(1 << 34))  # a 16 GiB 'guest'
    dm = 0xFFFF_0000_0000_0000  # PAGE_OFFSET for VA_BITS=48
    b.map(dm, 0x4000_0000, 4 << 20, fmt.normalize(ARM64_PAGE_KERNEL), level=level)
    ov = OverlayMemory(b.mem, [SCRATCH])
    pool = PhysPool(ov, SCRATCH[0], SCRATCH[1] - SCRATCH[0])
    return PageTable(fmt, ov, root=b.root, alloc=NormalAllocator(pool)), b, dm


def test_arm64_invalid_clears_only_valid_and_default_sets_valid_write() -> None:
    pt, b, dm = arm64_guest()
    va = dm + 0x5000
    before = raw_at(pt, va)[1]
    assert before & 1
    res = set_direct_map_invalid_noflush(pt, va)
    assert not res.splits and raw_at(pt, va) == (0, before & ~1)  # PTE_VALID only
    assert pt.translate(va).fault is not None
    res = set_direct_map_default_noflush(pt, va)
    rdonly, write = 1 << 7, 1 << 51  # PTE_RDONLY, PTE_WRITE (DBM)
    assert raw_at(pt, va) == (0, (before | 1 | write) & ~rdonly)
    assert pt.alloc.pool.allocated == 0  # pageattr.c never allocates


def test_arm64_refuses_blocks_and_respects_can_set_direct_map() -> None:
    pt, b, dm = arm64_guest(level=1)
    before = b.mem.snapshot()
    with pytest.raises(CpaError, match="block"):
        set_direct_map_invalid_noflush(pt, dm + 0x5000)
    off = Arm64Config(rodata_full=False)
    assert not set_direct_map_invalid_noflush(pt, dm + 0x5000, arm64=off).changed
    assert pt.translate(dm + 0x5000).fault is None
    assert b.mem.snapshot() == before

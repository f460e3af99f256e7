"""x86 KPTI user PGD built from a model kernel PGD as pti.c does (4- and 5-level)."""

from __future__ import annotations

import pytest
from ptlab.alloc import AccountingAllocator, NormalAllocator, PhysPool
from ptlab.arch import x86_64
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.kpti_x86 import (
    PtiLayout,
    as_populated,
    pti_finalize,
    pti_init,
    pti_set_user_pgtbl,
)
from ptlab.memory.sparse import SparseMemory
from ptlab.testing import raw_tables

K4, M2 = 1 << 12, 1 << 21
P, RW, US, A, D, PS, G, NX = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 63
TEXT = 0xFFFF_FFFF_8100_0000  # _text
PK = x86_64.PAGE_KERNEL
RX = PK.with_(writable=False, dirty=False, exec=True)
RO = PK.with_(writable=False, dirty=False)
USER_VA = 0x40_0000


def model(levels: int) -> tuple[PageTable, PtiLayout, AccountingAllocator, int]:
    """Kernel image: text [_text, +4M) (the second 2M as ptes), rodata 2M, data 2M, all
    global; a 16 MiB direct map; one cpu_entry_area and one ESPFIX page; a user page."""
    fmt, mem = by_name(f"x86_64-{levels}level"), SparseMemory()
    kalloc = NormalAllocator(PhysPool(mem, 0x1000_0000, 4 << 20))
    ualloc = AccountingAllocator(NormalAllocator(PhysPool(mem, 0x2000_0000, 4 << 20)),
                                 owner="pti")
    k = PageTable(fmt, mem, alloc=kalloc)
    dm = x86_64.PAGE_OFFSET[levels]
    k.map(dm, 0, 16 << 20, PK)
    k.map(TEXT, 0x100_0000, M2, RX)
    k.map(TEXT + M2, 0x120_0000, M2, RX, page_sizes=[K4])
    k.map(TEXT + 2 * M2, 0x140_0000, M2, RO)
    k.map(TEXT + 3 * M2, 0x160_0000, M2, PK)
    k.map(x86_64.CPU_ENTRY_AREA_BASE + K4, 0x50_0000, K4, PK)
    k.map(x86_64.ESPFIX_BASE + 0x10000, 0x51_0000, K4, RO)
    uview = PageTable(fmt, mem, root=k.root, alloc=kalloc,
                      table_attrs=fmt.table_attrs().with_(user=True))
    uview.map(USER_VA, 0x60_0000, K4, PK.with_(user=True, global_=False, uexec=True))
    lay = PtiLayout(entry_text=(TEXT + M2 - 2 * K4, TEXT + M2 + 2 * K4), text=TEXT,
                    etext=TEXT + 2 * M2 - 0x800, end_rodata_aligned=TEXT + 3 * M2,
                    end=TEXT + 4 * M2 - 0x100, cpu_tss=[dm + 0x80_0000, dm + 0x80_1000])
    return k, lay, ualloc, dm


def raw(pt: PageTable, va: int, level: int) -> int:
    return next(s.raw for s in pt.translate(va).steps if s.level == level)


def tables(pt: PageTable) -> set[int]:
    return raw_tables(pt.fmt, pt.mem, pt.root)


@pytest.mark.parametrize("levels", [4, 5])
def test_user_pgd_maps_exactly_what_pti_clones(levels: int) -> None:
    k, lay, ualloc, dm = model(levels)
    user = pti_init(k, lay, ualloc)
    # entry text: the 2M leaf and the pte-table pmd, shared, G in both copies
    for va in (TEXT + M2 - K4, TEXT + M2 + K4):
        assert user.translate(va).pa == k.translate(va).pa
        assert raw(user, va, 1) == raw(k, va, 1) and raw(k, va, 1) & G
    assert raw(k, TEXT, 1) == 0x100_0000 | P | A | PS | G  # RX 2M leaf, G back on
    # set_memory_nonglobal on the rest of the image: rodata 2M and the ptes lose G
    assert raw(k, TEXT + 2 * M2, 1) == 0x140_0000 | P | A | PS | NX
    assert not raw(k, TEXT + M2 + K4, 0) & G
    # cpu_entry_area and ESPFIX: same entries through both roots; the per-CPU TSS pages
    for va in (x86_64.CPU_ENTRY_AREA_BASE + K4, x86_64.ESPFIX_BASE + 0x10000):
        assert user.translate(va).steps[-1].raw == k.translate(va).steps[-1].raw != 0
    for i, va in enumerate(lay.cpu_tss):
        assert raw(user, va, 0) == (0x80_0000 + i * K4) | P | RW | A | D | NX  # no G
    # PTI_CLONE_PMD works in whole pmds: all of the entry text's second 2M is visible
    assert user.translate(TEXT + 2 * M2 - K4).pa == 0x120_0000 + M2 - K4
    # nothing else: rodata, data, the direct map beside the TSS pages, the user page
    for va in (TEXT + 3 * M2, TEXT + 2 * M2, dm, dm + 0x80_2000, USER_VA):
        assert user.translate(va).fault is not None, hex(va)
    # every user-side table is charged to pti: root, then per path (p4d if 5-level), pud,
    # pmd for the image; pud, pmd, pte for the TSS pages
    assert ualloc.charged("pti") == len(tables(user) - tables(k)) == {4: 6, 5: 8}[levels]


def test_user_half_copied_and_kernel_copy_made_nx() -> None:
    k, lay, ualloc, _ = model(4)
    user = pti_init(k, lay, ualloc)
    before = raw(k, USER_VA, 3)
    assert before & US and not before & NX
    assert pti_set_user_pgtbl(k, user) == 1
    assert raw(user, USER_VA, 3) == before  # the user PGD gets the entry as it was
    assert raw(k, USER_VA, 3) == before | NX  # the kernel's copy: NX
    assert user.translate(USER_VA).pa == 0x60_0000
    assert k.translate(USER_VA).attrs.uexec is False


def test_as_populated_undoes_only_the_kernel_copys_nx() -> None:
    """From a real kernel PGD (NX already set by pti), as_populated + pti_set_user_pgtbl
    give the state the kernel made: user copy without NX, kernel copy with it."""
    k, lay, ualloc, _ = model(4)
    populated = raw(k, USER_VA, 3)
    user = pti_init(k, lay, ualloc)
    pti_set_user_pgtbl(k, user)
    kernel_after, user_after = raw(k, USER_VA, 3), raw(user, USER_VA, 3)
    assert as_populated(k) == 1 and raw(k, USER_VA, 3) == populated
    assert as_populated(k) == 0  # nothing left with NX
    fresh = pti_init(k, lay, ualloc)
    assert pti_set_user_pgtbl(k, fresh) == 1
    assert (raw(k, USER_VA, 3), raw(fresh, USER_VA, 3)) == (kernel_after, user_after)


def test_finalize_with_global_image_clones_text_and_rodata() -> None:
    k, lay, ualloc, _ = model(4)
    user = pti_init(k, lay, ualloc)
    pti_finalize(k, user, lay, image_global_ok=True)
    for va in (TEXT, TEXT + M2 + 5 * K4, TEXT + 2 * M2 + K4):  # text and rodata
        assert user.translate(va).pa == k.translate(va).pa
    assert user.translate(TEXT + 3 * M2).fault is not None  # data stays out
    assert raw(k, TEXT + M2 + 5 * K4, 0) & G  # set_memory_global up to _etext
    assert raw(k, TEXT + 2 * M2, 1) & G  # rodata: its pmd cloned, so global in both
    assert not raw(k, TEXT + 3 * M2, 1) & G  # data: past _etext, stays non-global
    pti_finalize(k, user, lay)  # idempotent: cloning again changes nothing
    assert user.translate(TEXT).pa == 0x100_0000

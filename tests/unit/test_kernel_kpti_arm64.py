"""arm64 KPTI trampoline table built as map_entry_trampoline does."""

from __future__ import annotations

import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.arm64 import Arm64
from ptlab.kernel.kpti_arm64 import PAGE_KERNEL_ROX, map_entry_trampoline
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Walker

K4 = 1 << 12
VALIAS = 0xFFFF_FBFF_FDFF_0000  # a fixmap slot
TEXT_PA = 0x4180_0000


def kernel() -> PageTable:
    fmt, mem = Arm64(4096, 48, upper=True), SparseMemory(1 << 36)
    return PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 0x1_0000_0000, 1 << 20)))


@pytest.mark.parametrize("size", [1, K4, 2 * K4 + 8, 3 * K4])
def test_tramp_maps_only_the_text_global_rox_page_by_page(size: int):
    k = kernel()
    tramp = map_entry_trampoline(k, TEXT_PA, size, VALIAS, k.alloc)
    assert tramp.root != k.root and k.table_count() == 1  # the kernel table is not touched
    pages = -(-size // K4)
    runs = Walker(k.fmt, k.mem, tramp.root).run_table()
    assert [(r.va, r.pa, r.size, r.page_size) for r in runs] == [(VALIAS, TEXT_PA, pages * K4, K4)]
    a = runs[0].attrs
    assert a.exec and not a.uexec and not a.writable and not a.user and a.global_
    assert a == k.fmt.normalize(PAGE_KERNEL_ROX.with_(global_=True))
    assert tramp.table_count() == 4  # pgd + pud + pmd + pte: no block mappings


def test_rodata_off_is_writable_exec():
    k = kernel()
    tramp = map_entry_trampoline(k, TEXT_PA, K4, VALIAS, k.alloc, rodata_enabled=False)
    a = tramp.translate(VALIAS).attrs
    assert a.writable and a.exec and a.global_


@pytest.mark.parametrize("pa,size", [(TEXT_PA + 8, K4), (TEXT_PA, 0), (TEXT_PA, 3 * K4 + 1)])
def test_bad_trampoline_is_one_clear_error(pa: int, size: int):
    k = kernel()
    with pytest.raises(ValueError, match="trampoline text"):
        map_entry_trampoline(k, pa, size, VALIAS, k.alloc)

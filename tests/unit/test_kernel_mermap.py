"""mermap / kmap_local windows: no allocation after prepare, local flushes, no global entries."""

from __future__ import annotations

import pytest
from ptlab.alloc import AccountingAllocator, AllocError, NormalAllocator, PhysPool
from ptlab.arch import arch_for
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.mermap import KM_MAX_IDX, KmapLocal, Mermap
from ptlab.memory.sparse import SparseMemory

K4 = 4096
# a window that straddles a 2M boundary: 2 CPUs x 4 slots = 8 pages, 4 on each side
BASES = {"x86_64-4level": 0xFFFF_C900_0020_0000 - 4 * K4,
         "arm64-4k-48": 0xFFFF_8000_0820_0000 - 4 * K4}


def kernel(name: str) -> tuple[PageTable, AccountingAllocator]:
    fmt = by_name(name)
    mem = SparseMemory()
    alloc = AccountingAllocator(NormalAllocator(PhysPool(mem, 0x1000_0000, 4 << 20)),
                                owner="init_mm")
    return PageTable(fmt, mem, alloc=alloc), alloc


def nonglobal(name: str):  # PAGE_KERNEL_NOGLOBAL
    return arch_for(by_name(name)).page_kernel.with_(global_=False)


def expected_tables(fmt, base: int, size: int) -> int:
    """Tables an empty root needs below it for [base, base+size): one per distinct
    region covered by one entry of the level above, for every level below the root."""
    lo = base & (fmt.va_span - 1)
    return sum(len({a >> fmt.shift(lvl + 1) for a in range(lo, lo + size, K4)})
               for lvl in range(fmt.levels - 1))


@pytest.mark.parametrize("name", sorted(BASES))
def test_mermap_prepared_once_never_allocates_one_flush_per_wrap(name: str) -> None:
    pt, alloc = kernel(name)
    base = BASES[name]
    mm = Mermap(pt, base, nr_cpus=2, prot=nonglobal(name), nr_slots=4)
    assert mm.prepared_tables == expected_tables(pt.fmt, base, 8 * K4) == 4
    charged, tables = alloc.charged("init_mm"), pt.table_count()
    gets = 23
    for i in range(gets):
        va = mm.get(0, 0x4000_0000 + i * K4)
        assert va == base + (i % 4) * K4
        assert pt.translate(va).pa == 0x4000_0000 + i * K4
        mm.put(0, va)
    assert mm.flushes(0) == mm.wraps[0] == (gets - 1) // 4  # one local flush per wrap
    assert mm.flushes(1) == 0  # the other CPU flushed nothing
    assert mm.noalloc.refused == 0  # nothing ever asked for a table
    assert alloc.charged("init_mm") == charged and pt.table_count() == tables
    # after the last wrap only slots 0..(gets-1)%4 are mapped again
    live = [pt.translate(base + s * K4).fault is None for s in range(4)]
    assert live == [s <= (gets - 1) % 4 for s in range(4)]


@pytest.mark.parametrize("name", sorted(BASES))
def test_mermap_entries_never_global_and_full_window_fails(name: str) -> None:
    pt, _ = kernel(name)
    mm = Mermap(pt, BASES[name], nr_cpus=2, prot=nonglobal(name))
    vas = [mm.get(1, 0x5000_0000 + i * K4) for i in range(4)]
    assert all(not pt.translate(v).steps[-1].entry.attrs.global_ for v in vas)
    assert mm.get(1, 0x6000_0000) is None  # every slot live: no wrap, caller falls back
    mm.put(1, vas[2])
    assert mm.get(1, 0x6000_0000) is None  # still live slots: still no wrap
    with pytest.raises(ValueError, match="CPU 2 outside"):
        mm.get(2, 0x6000_0000)
    with pytest.raises(ValueError, match="global"):
        Mermap(pt, BASES[name], 1, prot=nonglobal(name).with_(global_=True))


@pytest.mark.parametrize("name", sorted(BASES))
def test_no_alloc_view_really_refuses_tables(name: str) -> None:
    """The negative control: outside the prepared window the map path would need tables,
    and the no-allocation view refuses them, writing nothing."""
    pt, alloc = kernel(name)
    mm = Mermap(pt, BASES[name], nr_cpus=1, prot=nonglobal(name))
    far = BASES[name] + (1 << 30)
    with pytest.raises(AllocError):
        mm.cpus[0].map(far, 0x4000_0000, K4, nonglobal(name))
    assert mm.noalloc.refused == 1 and pt.translate(far).fault is not None


def test_kmap_local_stack_one_page_flush_per_unmap() -> None:
    name = "x86_64-4level"
    pt, alloc = kernel(name)
    km = KmapLocal(pt, 0xFFFF_FFFF_FF40_0000, nr_cpus=2, prot=nonglobal(name))
    charged = alloc.charged("init_mm")
    vas = [km.map(0, 0x7000_0000 + i * K4) for i in range(3)]
    assert vas == [0xFFFF_FFFF_FF40_0000 + i * K4 for i in range(3)]
    assert km.flushes(0) == 0  # not-present -> present needs none
    with pytest.raises(ValueError, match="top slot"):
        km.unmap(0, vas[0])
    for va in reversed(vas):
        km.unmap(0, va)
    g = km.cpus[0].gather
    assert g.flushes == 3 and g.pages_flushed == 3  # one page each
    assert km.flushes(1) == 0 and alloc.charged("init_mm") == charged
    for i in range(KM_MAX_IDX):
        km.map(1, 0x7000_0000 + i * K4)
    with pytest.raises(OverflowError):
        km.map(1, 0x7100_0000)
    assert km.noalloc.refused == 0

"""Regression tests for engine bugs found by an adversarial pass (issue 6, part 7): each
failed before its fix."""

from __future__ import annotations

import pytest
from ptlab.alloc import (
    AccountingAllocator,
    Allocator,
    AllocError,
    NoAllocAllocator,
    NormalAllocator,
    PhysPool,
)
from ptlab.engine import EngineError, PageTable
from ptlab.formats import Attrs
from ptlab.formats.arm64 import Arm64
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.tlb import Gather

K, M, G = 1 << 10, 1 << 20, 1 << 30
X86 = X86_64(4)
KATTRS = Attrs(writable=True, accessed=True, dirty=True)


def kva(fmt) -> int:
    return fmt.va_ranges()[-1][0] + G


class Wrapping(Allocator):
    """An allocator over a pool that does not say where its pages are (no ``pa_range``),
    optionally handing out ``extra`` pages more than asked."""

    def __init__(self, pool: PhysPool, page_size: int | None = None, extra: int = 0) -> None:
        self.pool, self.extra = pool, extra
        self.page_size = page_size or pool.page_size
        self.mem = pool.mem

    def reserve(self, n: int) -> list[int]:
        return self.pool.alloc(n + self.extra if n else 0)

    def free(self, pa: int) -> None:
        self.pool.free(pa)


def test_placeholders_never_stand_for_a_real_table_at_the_top_of_pa_space() -> None:
    """A pool at the top of the PA space hands out the addresses the transaction used for
    its placeholders; a map that both changes such a table and creates one must map
    every page (it used to report success and leave the old table's pages unmapped)."""
    mem = SparseMemory()
    top = 1 << X86.pa_bits
    pool = PhysPool(mem, top - 6 * 4 * K, 6 * 4 * K)
    pt = PageTable(X86, mem, alloc=NormalAllocator(pool))
    va = kva(X86)
    pt.map(va, 0, 4 * K, KATTRS)  # pud, pmd, pte
    pt.map(va + 2 * M, 0, 4 * K, KATTRS)  # a second pte table
    pt.map(va + 4 * M, 0, 4 * K, KATTRS)  # a third one, at the last page of PA space
    assert pt.translate(va + 4 * M).steps[-1].table_pa == top - 4 * K
    pt.unmap(va, 4 * K)  # one pool page free again
    pt.map(va + 4 * M + 4 * K, 0x10_0000, 2 * M, KATTRS)  # that table + a new one
    for off in range(4 * K, 2 * M + 4 * K, 4 * K):
        t = pt.translate(va + 4 * M + off)
        assert t.mapped and t.pa == 0x10_0000 + off - 4 * K, hex(off)
    assert pool.available == 0 and pt.table_count() == 6


@pytest.mark.parametrize("fmt, pool_at, page", [
    (Arm64(4096, 48), 1 << 50, 4 * K),  # pool above the format's 48-bit PAs
    (Arm64(16384, 47), 1 << 40, 4 * K),  # 4 KiB pages for 16 KiB tables
    (X86, 1 << 40, 16 * K),  # 16 KiB pages for 4 KiB tables
])
def test_allocator_format_mismatch_is_refused_up_front(fmt, pool_at, page) -> None:
    mem = SparseMemory()
    pool = PhysPool(mem, pool_at, 64 * page, page)
    with pytest.raises(EngineError, match="allocator"):
        PageTable(fmt, mem, alloc=NormalAllocator(pool))
    assert pool.allocated == 0
    ok = PhysPool(mem, 1 << 36, 64 * fmt.table_bytes, fmt.table_bytes)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(ok))
    with pytest.raises(EngineError, match="allocator"):
        pt.alloc = AccountingAllocator(NormalAllocator(pool), owner="vm")  # on assignment too
    other = PhysPool(SparseMemory(), 1 << 36, 64 * fmt.table_bytes, fmt.table_bytes)
    with pytest.raises(EngineError, match="another memory"):
        pt.alloc = NormalAllocator(other)
    pt.alloc = NoAllocAllocator()  # hands out nothing: fits every format
    assert pool.allocated == 0 and ok.allocated == 1


@pytest.mark.parametrize("fmt, pool_at, page", [
    (Arm64(4096, 48), 1 << 50, 4 * K),
    (Arm64(16384, 47), 1 << 40, 4 * K),
])
def test_pages_reserved_before_a_failing_commit_are_given_back(fmt, pool_at, page) -> None:
    """An allocator that hides where its pages are gets past the up-front check; the
    commit refuses its pages and gives every one back (3 pages leaked per call before)."""
    mem = SparseMemory()
    good = PhysPool(mem, 1 << 36, 64 * fmt.table_bytes, fmt.table_bytes)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(good), gather=Gather())
    bad = PhysPool(mem, pool_at, 64 * 16 * K, page)
    acct = AccountingAllocator(Wrapping(bad, page_size=fmt.table_bytes), owner="vm")
    pt.alloc = acct
    snap, refs = mem.snapshot(), dict(pt.registry.refs)
    for _ in range(3):
        with pytest.raises(EngineError, match="cannot hold"):
            pt.map(kva(fmt), 0, fmt.table_bytes, KATTRS)
        assert bad.allocated == 0 and acct.totals() == {}
    assert mem.snapshot() == snap and pt.registry.refs == refs and pt.gather.pending == []
    with pytest.raises(EngineError, match="cannot hold"):  # the root of a new table too
        PageTable(fmt, mem, alloc=Wrapping(bad, page_size=fmt.table_bytes))
    assert bad.allocated == 0


def test_surplus_pages_from_an_allocator_are_given_back() -> None:
    mem = SparseMemory()
    pool = PhysPool(mem, 1 << 36, 64 * 4 * K)
    pt = PageTable(X86, mem, alloc=NormalAllocator(pool))
    pt.alloc = Wrapping(pool, extra=2)
    with pytest.raises(AllocError, match="returned 5 pages, not 3"):
        pt.map(kva(X86), 0, 4 * K, KATTRS)
    assert pool.allocated == 1  # the root alone
    assert pt.translate(kva(X86)).fault is not None


def test_destroy_through_a_view_drops_only_the_view() -> None:
    """The README's no-allocation view of a kernel root: destroying it frees nothing."""
    mem = SparseMemory()
    pool = PhysPool(mem, 1 << 36, 64 * 4 * K)
    kernel = PageTable(X86, mem, alloc=NormalAllocator(pool))
    va = kva(X86)
    kernel.map(va, 0x20_0000, 8 * K, KATTRS)
    view = PageTable(X86, mem, root=kernel.root, alloc=NoAllocAllocator(), gather=Gather())
    view.protect(va, 4 * K, clear=["writable"])  # a view changes the root's tables...
    snap = mem.snapshot()
    view.destroy()  # ...but does not own them
    assert pool.allocated == 4 and mem.snapshot() == snap and kernel.table_count() == 4
    assert kernel.translate(va + 4 * K).pa == 0x20_0000 + 4 * K
    assert not kernel.translate(va).attrs.writable
    with pytest.raises(EngineError, match="destroyed"):
        view.map(va + 8 * K, 0, 4 * K, KATTRS)
    kernel.destroy()
    assert pool.allocated == 0


def test_destroyed_table_raises_engine_error_everywhere() -> None:
    pt = PageTable(X86, SparseMemory())
    va = kva(X86)
    pt.map(va, 0, 4 * K, KATTRS)
    pt.destroy()
    for op in (lambda: pt.translate(va), lambda: pt.runs(), lambda: pt.lookup(va),
               lambda: list(pt.leaves()), lambda: pt.table_count(), pt.destroy,
               lambda: pt.map(va, 0, 4 * K, KATTRS), lambda: pt.split(va, 1)):
        with pytest.raises(EngineError, match="destroyed"):
            op()


@pytest.mark.parametrize("change", [
    {"set": {"writable": "yes"}}, {"set": {"writable": 1}}, {"set": {"present": None}},
    {"set": {"cache": True}}, {"set": {"cache": 8}}, {"set": {"pkey": -1}},
    {"set": {"pkey": 2.0}}, {"set": {"shareability": 4}}, {"set": {"sw": 1 << 20}},
])
def test_attribute_values_must_have_the_field_type(change) -> None:
    pt = PageTable(X86, SparseMemory())
    va = kva(X86)
    pt.map(va, 0, 2 * M, KATTRS)
    pt.protect(va, 4 * K, set={"writable": True})  # memoised: must not admit 1 below
    snap = pt.mem.snapshot()
    with pytest.raises(EngineError, match="attribute|sw|does not fit"):
        pt.protect(va, 4 * K, **change)
    assert pt.mem.snapshot() == snap


def test_leaf_attrs_of_the_wrong_type_are_refused() -> None:
    pt = PageTable(X86, SparseMemory())
    va = kva(X86)
    for bad in (Attrs(writable="yes"), Attrs(cache=9), Attrs(pkey=True)):  # type: ignore[arg-type]
        with pytest.raises(EngineError):
            pt.map(va, 0, 4 * K, bad)
    assert pt.table_count() == 1

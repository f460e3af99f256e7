"""Engine operations: page-size choice, overlap refusal, split/collapse, protect, share,
clone, preallocate + no-allocation, apply, all-or-nothing, accounting, leaks, gather."""

from __future__ import annotations

import numpy as np
import pytest
from ptlab.alloc import (
    AccountingAllocator,
    AllocError,
    NoAllocAllocator,
    NormalAllocator,
    PhysPool,
    PoolAllocator,
)
from ptlab.engine import EngineError, MappingExists, NotMapped, PageTable
from ptlab.engine.leafenc import LeafEncoder
from ptlab.formats import Attrs, Entry, Kind
from ptlab.formats.arm64 import Arm64
from ptlab.formats.catalog import all_configs
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.testing import TableBuilder
from ptlab.tlb import Gather
from ptlab.walk import Walker, translate

K, M, G = 1 << 10, 1 << 20, 1 << 30
POOL = 1 << 40
X86 = X86_64(4)
ARM = Arm64(4096, 48)
KATTRS = Attrs(writable=True, accessed=True, dirty=True)


def fresh(fmt=X86, alloc=None, **kw):
    mem = SparseMemory()
    pool = PhysPool(mem, POOL, 1 << 30, fmt.table_bytes)
    pt = PageTable(fmt, mem, alloc=alloc(pool) if alloc else NormalAllocator(pool),
                   gather=Gather(), **kw)
    return pt, pool


def va0(fmt) -> int:
    return fmt.va_ranges()[-1][0] + G  # 1 GiB-aligned kernel-half VA


def levels(pt, va, size) -> list[int]:
    return [lvl for _, lvl, _ in pt.leaves(va, size)]


def runs(pt, va, size, **kw):
    return list(Walker(pt.fmt, pt.mem, pt.root, **kw).runs(va, va + size))


@pytest.fixture(params=[X86, ARM], ids=lambda f: f.name)
def fmt(request):
    return request.param


# --- map ---------------------------------------------------------------------------------------
def test_map_uses_largest_page_sizes(fmt) -> None:
    pt, _ = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0x4000_0000, G + 2 * M + 4 * K, KATTRS)
    assert levels(pt, va, 2 * G) == [2, 1, 0]
    t = translate(fmt, pt.mem, pt.root, va + G + 2 * M + 0x123)
    assert t.pa == 0x4000_0000 + G + 2 * M + 0x123 and t.level == 0
    # PA only 2 MiB aligned: no 1 GiB leaf possible
    pt2, _ = fresh(fmt)
    pt2.map(va, 0x20_0000, G, KATTRS)
    assert levels(pt2, va, G) == [1] * 512
    # page_sizes restricts the choice
    pt3, _ = fresh(fmt)
    pt3.map(va, 0, 4 * M, KATTRS, page_sizes=[4 * K])
    assert levels(pt3, va, 4 * M) == [0] * 1024


def test_map_refuses_overlap_and_names_va(fmt) -> None:
    pt, _ = fresh(fmt)
    pt.gather.record = True
    va = va0(fmt)
    pt.map(va + 8 * K, 0, 4 * K, KATTRS)
    snap = pt.mem.snapshot()
    with pytest.raises(MappingExists, match=f"{va + 8 * K:#x}"):
        pt.map(va, 0x10_0000, 2 * M, KATTRS)
    assert pt.mem.snapshot() == snap
    pt.map(va, 0x20_0000, 2 * M, KATTRS, replace=True)
    assert translate(fmt, pt.mem, pt.root, va + 8 * K).pa == 0x20_0000 + 8 * K
    # Filling empty entries needs no flush (set_pte on a none pte); replacing the present
    # 4K leaf does, for that page alone: the existing pte table is descended into and
    # only its one present entry changes.
    assert pt.gather.stats.flushes == 1 and pt.gather.log == [[(va + 8 * K, va + 12 * K)]]


def test_map_bad_input_is_one_clear_error() -> None:
    pt, _ = fresh()
    va = va0(X86)
    for args, match in [
        ((va + 1, 0, 4 * K, KATTRS), "aligned"),
        ((va, 0, 0, KATTRS), "positive"),
        ((0x0000_8000_0000_0000, 0, 4 * K, KATTRS), "VA range"),
        ((va, 3, 4 * K, KATTRS), "PA"),
        ((va, 0, 4 * K, "rw"), "Attrs"),
        ((va, 0, 4 * K, KATTRS.with_(contiguous=True)), "contiguous"),
    ]:
        with pytest.raises(EngineError, match=match):
            pt.map(*args)
    with pytest.raises(EngineError, match="page size"):
        pt.map(va, 0, 8 * K, KATTRS, page_sizes=[8 * K])
    with pytest.raises(EngineError, match="empty"):
        pt.map(va, 0, 8 * K, KATTRS, page_sizes=[])
    with pytest.raises(EngineError, match="split level"):
        pt.split(va, 0)
    assert pt.table_count() == 1
    pt.map(va, 0, 8 * K, KATTRS, page_sizes=iter([4 * K]))
    assert pt.translate(va + 4 * K).pa == 4 * K and len(pt.runs()) == 1
    pt.destroy()
    with pytest.raises(EngineError, match="destroyed"):
        pt.unmap(va, 4 * K)


# --- unmap / protect / split / collapse -------------------------------------------------------
def test_partial_unmap_of_huge_leaf_keeps_the_rest(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, G, KATTRS)
    assert levels(pt, va, G) == [2]
    pt.unmap(va + 2 * M + 4 * K, 4 * K)
    lv = levels(pt, va, G)
    assert lv.count(1) == 511 and lv.count(0) == 511
    hole = translate(fmt, pt.mem, pt.root, va + 2 * M + 4 * K)
    assert hole.fault == f"not present at {fmt.level_name(0)}"
    t = translate(fmt, pt.mem, pt.root, va + G - 1)
    assert t.pa == G - 1 and t.mapped
    assert sum(r.size for r in runs(pt, va, G)) == G - 4 * K
    pt.unmap(va, G)
    assert pool.allocated == 1 and pt.table_count() == 1  # emptied tables freed


def test_protect_splits_partial_leaf_only_when_needed(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, 2 * M, KATTRS)
    before = pool.allocated
    pt.alloc = NoAllocAllocator()
    pt.protect(va + 4 * K, 4 * K, set={"writable": True})  # no change: no split, no alloc
    assert levels(pt, va, 2 * M) == [1] and pool.allocated == before
    with pytest.raises(AllocError):
        pt.protect(va + 4 * K, 4 * K, clear=["writable"])
    pt.alloc = NormalAllocator(pool)
    pt.protect(va + 4 * K, 4 * K, clear=["writable"])
    rs = runs(pt, va, 2 * M)
    assert [(r.va - va, r.size, r.attrs.writable) for r in rs] == [
        (0, 4 * K, True), (4 * K, 4 * K, False), (8 * K, 2 * M - 8 * K, True)]
    with pytest.raises(EngineError, match="unknown attribute"):
        pt.protect(va, 4 * K, set={"writeable": True})
    with pytest.raises(NotMapped):
        pt.protect(va, 4 * M, clear=["writable"], strict=True)


def test_split_then_collapse_round_trip(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, G, KATTRS)
    pt.split(va, 2)
    assert levels(pt, va, G) == [1] * 512
    pt.split(va + 2 * M, 1)
    assert levels(pt, va, 4 * M) == [1] + [0] * 512
    n = pool.allocated
    assert pt.collapse(va, G) == 2  # the pte table, then the pmd table
    assert levels(pt, va, G) == [2] and pool.allocated == n - 2
    with pytest.raises(EngineError, match="no leaf at level 1"):
        pt.split(va, 1)


def test_collapse_needs_equal_attrs_and_contiguous_aligned_pa(fmt) -> None:
    pt, _ = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, 2 * M, KATTRS, page_sizes=[4 * K])
    pt.map(va + 2 * M, 0x40_0000 + 4 * K, 2 * M, KATTRS, page_sizes=[4 * K])  # misaligned PA
    pt.map(va + 4 * M, 0x80_0000, 2 * M, KATTRS, page_sizes=[4 * K])
    pt.protect(va + 4 * M + 8 * K, 4 * K, clear=["writable"])  # unequal attrs
    pt.map(va + 6 * M, 0, 2 * M - 4 * K, KATTRS, page_sizes=[4 * K])  # not full
    assert pt.collapse(va, 8 * M) == 1
    assert levels(pt, va, 2 * M) == [1]
    assert len(levels(pt, va + 2 * M, 6 * M)) == 3 * 512 - 1


# --- all-or-nothing / allocators ---------------------------------------------------------------
def test_failed_reservation_writes_nothing(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, G, KATTRS)
    snap, refs = pt.mem.snapshot(), dict(pt.registry.refs)
    pt.alloc = NoAllocAllocator()
    for op in (lambda: pt.map(va + 4 * G, 0, 4 * K, KATTRS),
               lambda: pt.unmap(va + 4 * K, 4 * K),  # needs two split tables
               lambda: pt.protect(va, 4 * K, clear=["writable"]),
               lambda: pt.split(va, 2)):
        with pytest.raises(AllocError):
            op()
        assert pt.mem.snapshot() == snap and pt.registry.refs == refs
        assert pt.gather.pending == [] and pool.allocated == 2
    # a pool with one page too few: same, and the pool keeps its pages
    pt.alloc = PoolAllocator(pool, 1)
    with pytest.raises(AllocError):
        pt.unmap(va + 4 * K, 4 * K)
    assert pt.alloc.available == 1 and pt.mem.snapshot() == snap
    pt.alloc.refill(1)
    pt.unmap(va + 4 * K, 4 * K)
    assert pt.alloc.available == 0


def test_accounting_charges_tables_to_owner() -> None:
    current = ["vm1"]
    mem = SparseMemory()
    pool = PhysPool(mem, POOL, 1 << 28)
    acct = AccountingAllocator(NormalAllocator(pool), owner_fn=lambda: current[0])
    pt = PageTable(X86, mem, alloc=acct)
    va = va0(X86)
    assert acct.charged("vm1") == 1  # the root
    pt.map(va, 0, 4 * K, KATTRS)  # pud, pmd, pte tables
    current[0] = "vm2"
    pt.map(va + (1 << 39), 0, 4 * K, KATTRS)  # next pgd entry: pud, pmd, pte
    assert acct.totals() == {"vm1": 4, "vm2": 3}
    pt.unmap(va, 4 * K)
    assert acct.totals() == {"vm1": 1, "vm2": 3}
    pt.destroy()
    assert acct.totals() == {} and pool.allocated == 0


def test_leak_check_back_to_baseline(fmt) -> None:
    pt, pool = fresh(fmt)
    base = pool.allocated
    va = va0(fmt)
    rng = np.random.default_rng(7)
    for _ in range(60):
        off = int(rng.integers(0, 512)) * 4 * K * int(rng.integers(1, 64))
        n = int(rng.integers(1, 600))
        try:
            pt.map(va + off, off, n * 4 * K, KATTRS)
        except MappingExists:
            pass
    assert pool.allocated > base
    pt.unmap(va, 4 * G)
    assert pool.allocated == base == pt.table_count()
    pt.destroy()
    assert pool.allocated == 0


# --- gather ---------------------------------------------------------------------------------------
def test_batch_of_scattered_unmaps_costs_one_flush() -> None:
    pt, pool = fresh()
    va = va0(X86)
    pt.map(va, 0, G, KATTRS, page_sizes=[4 * K])
    g = pt.gather
    f0 = g.stats.flushes
    with g.batch():
        for i in range(100):
            pt.unmap(va + i * 9 * M, 4 * K)  # scattered pages, each in its own pte table
        assert g.stats.flushes == f0 and len(g.pending) == 100
    # one flush (tlb_finish_mmu) of the 100 scattered pages, none merged, nothing else
    assert g.stats.flushes == f0 + 1 and g.stats.ranges_flushed == 100
    assert g.stats.pages_flushed == 100 and g.stats.tables_freed == 0
    for i in range(100, 110):
        pt.unmap(va + i * 9 * M, 4 * K)
    assert g.stats.flushes == f0 + 11  # one per operation outside a batch


def test_table_frees_wait_for_the_flush() -> None:
    pt, pool = fresh()
    va = va0(X86)
    pt.map(va, 0, 4 * K, KATTRS)
    assert pool.allocated == 4
    with pt.gather.noflush_mode():
        pt.unmap(va, 4 * K)
        assert pool.allocated == 4 and pt.gather.pending_tables == 3
        assert pt.table_count() == 1  # already unlinked
    assert pool.allocated == 4  # leaving no-flush mode does not flush by itself
    pt.gather.flush()
    assert pool.allocated == 1 and pt.gather.stats.tables_freed == 3


# --- share / clone / preallocate / apply ---------------------------------------------------------
def test_share_makes_later_changes_visible_in_both_roots(fmt) -> None:
    kernel, pool = fresh(fmt)
    asi = PageTable(fmt, kernel.mem, alloc=kernel.alloc, gather=kernel.gather)
    va = va0(fmt)
    top = fmt.top_level
    kernel.map(va, 0, 2 * M, KATTRS)
    span = fmt.entry_size(top)
    base = va - va % span
    asi.share(kernel, base, span, top)  # ASI: whole pgd entry
    assert translate(fmt, asi.mem, asi.root, va + 4 * K).pa == 4 * K
    kernel.map(va + 2 * G, 0x1000_0000, 4 * K, KATTRS)  # later change below the shared level
    assert translate(fmt, asi.mem, asi.root, va + 2 * G).pa == 0x1000_0000
    asi.unmap(va, 2 * M)  # and the other way round
    gone = translate(fmt, kernel.mem, kernel.root, va)  # its pmd table emptied and freed
    assert gone.fault == f"not present at {fmt.level_name(2)}"
    n = pool.allocated
    kernel.destroy()  # the shared sub-tables survive: asi still references them
    assert pool.allocated == n - 1
    assert translate(fmt, asi.mem, asi.root, va + 2 * G).pa == 0x1000_0000
    asi.destroy()
    assert pool.allocated == 0


def test_share_at_pmd_level_conflicts_copy_and_unshare(fmt) -> None:
    src, pool = fresh(fmt)
    dst = PageTable(fmt, src.mem, alloc=src.alloc, gather=src.gather)
    va = va0(fmt)
    src.map(va, 0, 2 * M, KATTRS, page_sizes=[4 * K])
    src.map(va + 2 * M, 0x20_0000, 2 * M, KATTRS)  # a 2M leaf: copied, not shared
    dst.map(va + 4 * M, 0, 4 * K, KATTRS)
    with pytest.raises(MappingExists, match=f"{va + 4 * M:#x}"):
        dst.share(src, va, 6 * M, 1)
    dst.share(src, va, 6 * M, 1, replace=True)  # third slot: empty in src -> new shared table
    src.map(va + 4 * M, 0x123000, 4 * K, KATTRS)
    assert translate(fmt, dst.mem, dst.root, va + 4 * M).pa == 0x123000
    src.unmap(va + 2 * M, 2 * M)  # copied slot: dst keeps its copy
    assert translate(fmt, dst.mem, dst.root, va + 2 * M).pa == 0x20_0000
    assert dst.unshare(va, 6 * M, 1) == 2
    assert translate(fmt, dst.mem, dst.root, va).fault == f"not present at {fmt.level_name(1)}"
    assert translate(fmt, src.mem, src.root, va).pa == 0
    dst.destroy()
    src.destroy()
    assert pool.allocated == 0


def test_clone_copies_leaves_without_aliasing(fmt) -> None:
    src, pool = fresh(fmt)
    dst = PageTable(fmt, src.mem, alloc=src.alloc)
    va = va0(fmt)
    src.map(va, 0, G, KATTRS)
    src.map(va + G, 0x4000_0000, 4 * M + 8 * K, KATTRS.with_(writable=False))
    n = dst.clone(src, va + G - 2 * M, 4 * M)  # part of the 1G leaf + one 2M leaf
    assert n == 2
    assert [(r.va, r.size, r.pa) for r in runs(dst, va, 2 * G)] == [
        (va + G - 2 * M, 2 * M, G - 2 * M), (va + G, 2 * M, 0x4000_0000)]
    assert not runs(dst, va + G, 2 * M)[0].attrs.writable
    src.unmap(va, 2 * G)
    assert len(runs(dst, va, 2 * G)) == 2


def test_preallocate_then_no_allocation_paths(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt) + 6 * M
    assert pt.preallocate(va, 4 * M, 0) == 2 + 2  # pud + pmd on the path, two pte tables
    snap_tables = pool.allocated
    pt.alloc = NoAllocAllocator()
    pt.map(va + 4 * K, 0x5000, 8 * K, KATTRS)
    pt.map(va + 2 * M, 0x40_0000, 2 * M, KATTRS)  # existing pte table: 4K pages, no alloc
    pt.protect(va, 4 * M, clear=["writable"])
    pt.unmap(va, 4 * M)  # pinned tables are not freed
    pt.map(va, 0, 4 * K, KATTRS)
    assert pool.allocated == snap_tables
    snap = pt.mem.snapshot()
    with pytest.raises(AllocError):
        pt.map(va + 4 * M, 0, 4 * K, KATTRS)  # outside the preallocated range
    assert pt.mem.snapshot() == snap
    assert pt.collapse(va, 2 * M) == 0  # pinned tables are never collapsed


def test_apply_visits_leaves_and_may_replace_them(fmt) -> None:
    pt, pool = fresh(fmt)
    va = va0(fmt)
    pt.map(va, 0, 2 * M + 8 * K, KATTRS)
    seen = []

    def fn(v: int, level: int, e: Entry) -> Entry | None:
        seen.append((v, level))
        if level == 0 and v == va + 2 * M:
            return Entry(Kind.LEAF, e.oa, e.attrs.with_(writable=False))
        if level == 0:
            return Entry(Kind.EMPTY)
        return None

    pool_alloc, pt.alloc = pt.alloc, NoAllocAllocator()
    assert pt.apply(va + 4 * K, 2 * M + 8 * K, fn) == 3
    assert seen == [(va, 1), (va + 2 * M, 0), (va + 2 * M + 4 * K, 0)]
    rs = runs(pt, va, 4 * M)
    assert [(r.va, r.size, r.attrs.writable) for r in rs] == [
        (va, 2 * M, True), (va + 2 * M, 4 * K, False)]
    with pytest.raises(EngineError, match="LEAF/EMPTY"):
        pt.apply(va, 4 * K, lambda v, lvl, e: Entry(Kind.TABLE, 0))
    # the normalised attrs are memoised per call; bad values are still refused each time
    with pytest.raises(EngineError, match="must be an int"):
        pt.apply(va + 2 * M, 4 * K, lambda v, lvl, e: Entry(Kind.LEAF, e.oa,
                                                          e.attrs.with_(sw=[1])))
    pt.alloc = pool_alloc
    pt.map(va + 4 * M, 0, 8 * K, KATTRS)
    gone = KATTRS.with_(present=False)  # x86: the PFN inverted (vectorised encoding)
    pt.apply(va + 4 * M, 8 * K, lambda v, lvl, e: Entry(Kind.LEAF, e.oa, gone))
    c = pt.fmt.normalize(gone)
    assert [int(pt.mem.read_table(pt.translate(v).steps[-1].entry_pa, 1)[0])
            for v in (va + 4 * M, va + 4 * M + 4 * K)] == [
        pt.fmt.encode(Entry(Kind.LEAF, oa, c), 0) for oa in (0, 4 * K)]
    snap = pt.mem.snapshot()
    with pytest.raises(EngineError, match="aligned"):  # a bad OA: refused, nothing written
        pt.apply(va + 4 * M, 8 * K, lambda v, lvl, e: Entry(Kind.LEAF, e.oa + (v & 4 * K) // 2,
                                                          KATTRS))
    assert pt.mem.snapshot() == snap
    ok, bad = KATTRS.with_(writable=False), KATTRS.with_(writable=0)  # equal; 0 no bool
    with pytest.raises(EngineError, match="must be a bool"):
        pt.apply(va + 4 * M, 8 * K, lambda v, lvl, e: Entry(Kind.LEAF, e.oa,
                                                          ok if v == va + 4 * M else bad))


# --- other formats, imported roots, vectorised encode -------------------------------------------
@pytest.mark.parametrize("fmt", [Arm64(16384, 47), Arm64(65536, 52)], ids=lambda f: f.name)
def test_big_granules(fmt) -> None:
    pt, pool = fresh(fmt)
    g, l1 = fmt.table_bytes, fmt.entry_size(1)
    va = fmt.va_ranges()[-1][0] + 4 * l1
    pt.map(va, 0, l1 + 3 * g, KATTRS)
    assert levels(pt, va, 2 * l1) == [1, 0, 0, 0]
    pt.unmap(va + g, g)
    assert [r.size for r in runs(pt, va, 2 * l1)] == [g, l1 - g + 3 * g - g]
    pt.unmap(va, 2 * l1)
    assert pool.allocated == 1


def test_imported_root_is_operated_on_without_freeing_foreign_tables() -> None:
    b = TableBuilder(X86)
    va = va0(X86)
    b.map(va, 0, 2 * M, KATTRS, level=0)
    pool = PhysPool(b.mem, POOL, 1 << 24)
    pt = PageTable(X86, b.mem, root=b.root, alloc=NormalAllocator(pool))
    pt.protect(va, 4 * K, clear=["writable"])
    assert not translate(X86, b.mem, b.root, va).attrs.writable
    pt.unmap(va, 2 * M)  # empties the builder's tables: unlinked, not freed to our pool
    assert pool.allocated == 0 and pt.table_count() == 1
    with pytest.raises(EngineError, match="root"):
        PageTable(X86, b.mem, root=b.root + 8)


@pytest.mark.parametrize("fmt", all_configs(), ids=lambda f: f.name)
def test_leaf_encoder_matches_scalar_codec(fmt) -> None:
    enc = LeafEncoder(fmt)
    rng = np.random.default_rng(1)
    for a in (KATTRS, Attrs(present=False, writable=True), Attrs(exec=True, cache=3)):
        a = fmt.normalize(a)
        for level in sorted(fmt.leaf_levels):
            sh = fmt.shift(level)
            oas = [0, ((1 << fmt.pa_bits) - 1) >> sh << sh] + [
                int(x) >> sh << sh for x in rng.integers(0, 1 << fmt.pa_bits, 20, dtype=np.uint64)]
            got = enc.encode(np.array(oas, dtype=np.uint64), a, level)
            assert [int(x) for x in got] == [fmt.leaf(o, a, level) for o in oas]


# --- contiguous hint (arm64) ----------------------------------------------------------------------
def test_contiguous_groups_written_and_unfolded() -> None:
    pt, _ = fresh(ARM)
    va = va0(ARM)
    assert pt.page_sizes()[64 * K] == (0, True) and pt.page_sizes()[32 * M] == (1, True)
    pt.map(va, 0, 1 * M, KATTRS, page_sizes=[4 * K, 64 * K])
    pt.map(va + 1 * M, 0x10_1000, 128 * K, KATTRS, page_sizes=[4 * K, 64 * K])  # PA misaligned
    rs = runs(pt, va, 2 * M)
    assert [(r.size, r.attrs.contiguous) for r in rs] == [(1 * M, True), (128 * K, False)]
    pt.unmap(va + 64 * K + 8 * K, 4 * K)  # the second group unfolds, the others stay
    rs = runs(pt, va, 1 * M)
    assert [(r.va - va, r.size, r.attrs.contiguous) for r in rs] == [
        (0, 64 * K, True), (64 * K, 8 * K, False), (76 * K, 52 * K, False),
        (128 * K, 1 * M - 128 * K, True)]
    pt.protect(va + 1 * M - 64 * K, 4 * K, clear=["writable"])  # unfold the last group
    assert [r.attrs.contiguous for r in runs(pt, va, 1 * M)] == [True, False, False, True, False,
                                                                  False]
    pt.map(va + 32 * M, 32 * M, 64 * M, KATTRS, page_sizes=[2 * M, 32 * M])
    assert {r.attrs.contiguous for r in runs(pt, va + 32 * M, 64 * M)} == {True}
    pt.split(va + 32 * M, 1)  # splitting one block unfolds its 32M group
    rs = runs(pt, va + 32 * M, 64 * M)
    assert [(r.size, r.level, r.attrs.contiguous) for r in rs] == [
        (2 * M, 0, False), (30 * M, 1, False), (32 * M, 1, True)]
    with pytest.raises(EngineError, match="no page size"):
        fresh(X86)[0].map(va0(X86), 0, 64 * K, KATTRS, page_sizes=[64 * K])


def test_default_allocator_is_shared_per_memory() -> None:
    mem = SparseMemory()
    a, b = PageTable(X86, mem), PageTable(X86, mem)
    assert a.root != b.root and a.alloc.pool is b.alloc.pool
    a.map(va0(X86), 0, 4 * K, KATTRS)
    b.map(va0(X86), 0, 4 * K, KATTRS)
    assert a.alloc.pool.allocated == 8
    small = SparseMemory(1 << 30)  # no room at 1 TiB: the top quarter of this memory
    c = PageTable(ARM, small)
    assert 3 << 28 <= c.root < 1 << 30


def test_set_table_attrs_restricts_everything_below(fmt) -> None:
    pt, _ = fresh(fmt, table_attrs=fmt.table_attrs().with_(user=True))
    va = va0(fmt)
    pt.map(va, 0, 4 * K, KATTRS.with_(user=True, uexec=True, exec=True))
    top = fmt.top_level
    assert pt.translate(va).attrs.uexec
    nx = fmt.table_attrs().with_(user=True, exec=False, uexec=False)
    pt.gather.record = True
    pt.set_table_attrs(va, top, nx)  # KPTI: NX on the kernel copy of a user pgd entry
    t = pt.translate(va)
    assert t.pa == 0 and not t.attrs.uexec and not t.attrs.exec
    # a restriction on an upper entry changes every translation below it: one flush of
    # the entry's whole span (the map before it filled empty entries: no flush)
    span = fmt.entry_size(top)
    assert pt.gather.stats.flushes == 1
    assert pt.gather.log == [[(va - va % span, va - va % span + span)]]
    pt.set_table_attrs(va, top, nx)  # no change: no flush
    assert pt.gather.stats.flushes == 1
    with pytest.raises(EngineError, match="no table entry"):
        pt.set_table_attrs(va + 4 * G, 1, nx)


# --- exact flushes ----------------------------------------------------------------------------
def test_each_operation_flushes_exactly_what_changed(fmt) -> None:
    """One flush per operation that changed a present translation or freed a table (the
    model's mmu_gather: ranges coalesced, table pages freed after it), none otherwise;
    the ranges are those the kernel must flush."""
    pt, pool = fresh(fmt)
    g = pt.gather
    g.record = True
    va = va0(fmt)
    pt.map(va, 0, G + 2 * M, KATTRS)  # new tables, empty entries filled: nothing to flush
    assert g.flushes == 0
    # set_memory_ro on one page inside a 2M leaf: split_large_page replaces the huge
    # mapping (the whole 2M must go from the TLB) and the page changes inside it; the
    # gather coalesces both into one flush of the huge page's span (x86 CPA flushes the
    # split with flush_tlb_all before cpa_flush of the page: the same translations).
    pt.protect(va + G + 8 * K, 4 * K, clear=["writable"])
    assert g.flushes == 1 and g.log[-1] == [(va + G, va + G + 2 * M)]
    pt.protect(va + G + 8 * K, 4 * K, clear=["writable"])  # already read-only: no change
    assert g.flushes == 1
    pt.unmap(va + G + 12 * K, 4 * K)  # one pte cleared: flush_tlb_kernel_range of it
    assert g.flushes == 2 and g.log[-1] == [(va + G + 12 * K, va + G + 16 * K)]
    # the rest of that 2M: the pte table and the pmd table above it (now empty) go; one
    # flush of the range, the two table pages freed after it (tlb_remove_table)
    pt.unmap(va + G, 2 * M)
    assert g.flushes == 3 and g.log[-1] == [(va + G, va + G + 2 * M)]
    assert g.stats.tables_freed == 2 and pool.allocated == 2
    pt.split(va, 2)  # a 1G leaf becomes 512 2M leaves: the whole 1G span
    assert g.flushes == 4 and g.log[-1] == [(va, va + G)] and pool.allocated == 3
    assert pt.collapse(va, G) == 1  # and back: the table freed, the span flushed once
    assert g.flushes == 5 and g.log[-1] == [(va, va + G)] and g.stats.tables_freed == 3
    assert pt.collapse(va, G) == 0 and g.flushes == 5  # nothing to collapse: no flush
    assert g.stats.ranges_flushed == 5


def test_contiguous_unfold_flushes_the_whole_group() -> None:
    """arm64 contpte_convert: changing one page of a CONT_PTE group rewrites the group
    without the hint and flushes the whole group range (__flush_tlb_range over it)."""
    pt, _ = fresh(ARM)
    g = pt.gather
    g.record = True
    va = va0(ARM)
    pt.map(va, 0, 2 * M, KATTRS, page_sizes=[4 * K, 64 * K])
    assert g.flushes == 0
    pt.unmap(va + 64 * K + 8 * K, 4 * K)
    assert g.flushes == 1 and g.log[-1] == [(va + 64 * K, va + 128 * K)]
    pt.protect(va + 64 * K, 4 * K, clear=["writable"])  # group already unfolded: one page
    assert g.flushes == 2 and g.log[-1] == [(va + 64 * K, va + 68 * K)]


# --- lookup and translate: one answer --------------------------------------------------------
@pytest.mark.parametrize("fmt", all_configs(), ids=lambda f: f.name)
def test_lookup_and_translate_agree_on_every_va(fmt) -> None:
    """Leaves, holes, non-present small and huge leaves: lookup(va) is translate(va)'s
    answer, and both match the leaves the engine lists (an independent descent)."""
    pt, _ = fresh(fmt)
    gr, l1 = fmt.table_bytes, fmt.entry_size(1)
    base = fmt.va_ranges()[-1][0]
    pt.map(base, 3 * l1, l1, KATTRS)  # one huge leaf
    pt.map(base + l1, 0x5 * gr, 8 * gr, KATTRS, page_sizes=[gr])  # small leaves
    pt.protect(base + l1 + 2 * gr, gr, clear=["present"])  # a non-present small leaf
    # [base + l1 + 8 granules, base + 2 l1): a hole
    pt.map(base + 2 * l1, 5 * l1, l1, KATTRS)
    pt.protect(base + 2 * l1, l1, clear=["present"])  # a non-present huge leaf
    listed = {va: (lvl, e) for va, lvl, e in pt.leaves(base, 3 * l1)}
    assert sorted(lvl for lvl, _ in listed.values()) == [0] * 8 + [1, 1]
    step = max(gr, l1 // 256)
    vas = sorted({*range(base, base + 3 * l1, step), *range(base + l1, base + l1 + 9 * gr, gr)})
    kinds = set()
    for va in vas:
        t, hit = pt.translate(va), pt.lookup(va)
        leaf = next(((lva, lvl, e) for lva, (lvl, e) in listed.items()
                     if lva <= va < lva + fmt.entry_size(lvl)), None)
        if leaf is None:
            kinds.add("hole")
            assert hit is None and t.fault is not None and t.fault.startswith("not present at")
            continue
        lva, lvl, e = leaf
        assert t.level == lvl and t.steps[-1].entry == e and t.pa == e.oa + va - lva
        if e.attrs.present:
            kinds.add(f"leaf{lvl}")
            assert t.fault is None and hit == (lvl, e)
        else:
            kinds.add(f"non-present{lvl}")
            assert t.fault == "not present" and hit is None
    assert kinds == {"hole", "leaf0", "leaf1", "non-present0", "non-present1"}

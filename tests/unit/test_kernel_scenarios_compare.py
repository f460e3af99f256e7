"""The real-guest harness's comparison machinery (ptharness.kernel_compare), on model
tables: the snapshot, the page-for-page run comparison, the raw-entry comparison, the
later-CPA classification."""

from __future__ import annotations

import pytest
from ptharness import kernel_compare as ks
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.arch import x86_64
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.secretmem import remove_per_page
from ptlab.memory.base import OutOfRange
from ptlab.memory.sparse import SparseMemory

K4, M2 = 1 << 12, 1 << 21
DM = x86_64.PAGE_OFFSET[4]
PK = x86_64.PAGE_KERNEL


def guest() -> PageTable:
    """A 'real' direct map: 8 MiB of 2M pages, then 2M of 4K pages, at PA 0."""
    fmt, mem = by_name("x86_64-4level"), SparseMemory(1 << 36)
    pt = PageTable(fmt, mem, alloc=NormalAllocator(PhysPool(mem, 0x4000_0000, 1 << 20)))
    pt.map(DM, 0, 8 << 20, PK, page_sizes=[M2])
    pt.map(DM + (8 << 20), 8 << 20, M2, PK, page_sizes=[K4])
    return pt


def runs(pt: PageTable, mem=None) -> list:
    return ks.walk_runs(pt.fmt, mem or pt.mem, pt.root, DM, DM + (10 << 20))


def test_snapshot_is_frozen_and_private():
    real = guest()
    snap = ks.TableSnapshot(real.mem)
    before = runs(real, snap)
    snap.freeze()
    remove_per_page(real, [DM + (9 << 20)])  # the "guest" changes after the snapshot
    assert runs(real, snap) == before != runs(real)
    with pytest.raises(OutOfRange, match="not in the table snapshot"):
        snap.read(0x7000_0000, 8)


def test_identical_tables_agree_page_for_page():
    real = guest()
    cmp = ks.compare_runs("same", runs(real), runs(real))
    assert (cmp.agree, cmp.differ, cmp.equal) == ((10 << 20) // K4, 0, True)


def test_model_prediction_and_its_misses_are_counted():
    real = guest()
    snap = ks.TableSnapshot(real.mem)
    runs(real, snap)
    snap.freeze()
    va = DM + (3 << 20) + 5 * K4  # inside a 2M page: the kernel splits it
    remove_per_page(real, [va])
    right = ks.model_table(real.fmt, snap, real.root)
    remove_per_page(right, [va])
    cmp = ks.compare_runs("right", runs(right), runs(real))
    ks.compare_entries(cmp, real.fmt, right.mem, real.root, real.mem, real.root, [va])
    assert cmp.equal and cmp.pages == (10 << 20) // K4 and cmp.entries == 512
    wrong = ks.model_table(real.fmt, snap, real.root)  # predicts nothing: the split 2M
    cmp = ks.compare_runs("wrong", runs(wrong), runs(real))  # page differs (page size)
    assert cmp.differ == 512 and not cmp.equal
    assert (cmp.differences[0].va, cmp.differences[-1].end) == (DM + (2 << 20), DM + (4 << 20))
    assert any(d.real is not None and not d.real[2].present for d in cmp.differences)
    assert "512 differ" in cmp.summary().splitlines()[0]


def test_entries_compare_raw_bits_but_not_accessed_dirty():
    real = guest()
    va = DM + (8 << 20) + 7 * K4
    model = ks.model_table(real.fmt, real.mem, real.root)
    pte = real.translate(va).steps[-1].entry_pa
    raw = real.mem.read_u64(pte)
    model.mem.write_u64(pte, raw ^ (1 << 5) ^ (1 << 6))  # accessed, dirty flipped
    assert ks.compare_entries(ks.Comparison("ad"), real.fmt, model.mem, real.root, real.mem,
                              real.root, [va]).equal
    model.mem.write_u64(pte, raw & ~1)  # not present, same PFN bits: not the kernel's encoding
    cmp = ks.compare_entries(ks.Comparison("np"), real.fmt, model.mem, real.root, real.mem,
                             real.root, [va])
    assert len(cmp.entry_differences) == 1 and f"{va:#x}" in cmp.entry_differences[0]


def test_later_cpa_change_is_only_permissions_at_the_same_pa():
    ro = PK.with_(writable=False)
    d = ks.Difference(DM, DM + M2, (0, M2, PK), (0, K4, ro))
    assert ks.later_cpa_change(d)
    assert not ks.later_cpa_change(ks.Difference(DM, DM + K4, (0, K4, PK), (K4, K4, PK)))
    assert not ks.later_cpa_change(ks.Difference(DM, DM + K4, (0, K4, PK), None))
    assert not ks.later_cpa_change(
        ks.Difference(DM, DM + K4, (0, K4, PK), (0, K4, PK.with_(present=False))))
    assert not ks.later_cpa_change(ks.Difference(DM, DM + M2, (0, K4, PK), (0, M2, ro)))


def test_compare_runs_equals_a_page_by_page_reference():
    """The one-sweep comparison counts what a page-by-page reference counts, on random
    disjoint run lists with holes, shared edges and accessed/dirty-only differences."""
    import random

    from ptlab.formats.base import Attrs
    from ptlab.walk import Run

    rng = random.Random(7)
    kinds = [Attrs(present=True, writable=w, accessed=a, dirty=d)
             for w in (False, True) for a in (False, True) for d in (False, True)]

    def random_runs() -> list[Run]:
        out, va = [], 0
        while va < 400 * K4:
            va += K4 * rng.choice((0, 0, 1, 3))
            n = rng.randrange(1, 20)
            out.append(Run(va=va, size=n * K4, pa=K4 * rng.randrange(4), page_size=K4,
                           level=0, attrs=rng.choice(kinds), count=n))
            va += n * K4
        return out

    def page_key(rs: list[Run], va: int):
        for r in rs:
            if r.va <= va < r.va + r.size:
                return r.pa + va - r.va, r.page_size, r.attrs.writable
        return None

    for _ in range(20):
        model, real = random_runs(), random_runs()
        cmp = ks.compare_runs("random", model, real)
        keys = [(page_key(model, va), page_key(real, va)) for va in range(0, 420 * K4, K4)]
        both = [(m, r) for m, r in keys if (m, r) != (None, None)]
        assert cmp.agree == sum(m == r for m, r in both)
        assert cmp.differ == sum(m != r for m, r in both)
        assert sum((d.end - d.va) // K4 for d in cmp.differences) == cmp.differ

"""Walker: translate traces and leaf runs on hand-built x86-64 and arm64 tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ptlab.formats.arm64 import Arm64
from ptlab.formats.base import Attrs, Kind
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder, linear_map_model
from ptlab.walk import HOLE_ATTRS, Walker, translate, walk_runs
from ptlab.walk.walker import continues

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
X86_RX = X86_PAGE_KERNEL.with_(writable=False, exec=True, uexec=True)
X86_USER = Attrs(present=True, writable=True, user=True, exec=False, uexec=False,
                 accessed=True, dirty=True)
ARM_RO = ARM64_PAGE_KERNEL.with_(writable=False, dbm=False)

X86_CONFIGS = [X86_64(4), X86_64(5)]
ARM_CONFIGS = [Arm64(4096, 48), Arm64(16384, 47), Arm64(65536, 48), Arm64(4096, 39),
               Arm64(4096, 48, upper=False)]


def kernel_base(fmt) -> int:
    if fmt.arch == "x86_64":
        return (1 << 64) - (1 << (fmt.va_bits - 1)) + (1 << (fmt.va_bits - 3))
    return (1 << 64) - fmt.va_span if fmt.upper else 0x4000_0000


def runs_of(b: TableBuilder, **kw):
    runs, anomalies = walk_runs(b.fmt, b.mem, b.root, **kw)
    assert anomalies == []
    return runs


# --- translate -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", X86_CONFIGS, ids=lambda f: f.name)
def test_x86_translate_trace_each_page_size(fmt):
    b = TableBuilder(fmt)
    base = kernel_base(fmt)
    b.map(base, 0x20_0000, 4 * K4, X86_PAGE_KERNEL, level=0)
    b.map(base + G1, 0x4000_0000, 2 * M2, X86_RX, level=1)
    b.map(base + 4 * G1, 0x1_0000_0000, G1, X86_PAGE_KERNEL, level=2)
    for va, pa, size, level, attrs in [
        (base + 0x1234, 0x20_1234, K4, 0, X86_PAGE_KERNEL),
        (base + G1 + M2 + 5, 0x4000_0000 + M2 + 5, M2, 1, X86_RX),
        (base + 4 * G1 + 0x12345678, 0x1_1234_5678, G1, 2, X86_PAGE_KERNEL),
    ]:
        t = translate(fmt, b.mem, b.root, va)
        assert t.fault is None and t.mapped
        assert (t.pa, t.page_size, t.level, t.attrs) == (pa, size, level, attrs)
        assert [s.level for s in t.steps] == list(range(fmt.top_level, level - 1, -1))
        assert t.steps[0].table_pa == b.root
        for s in t.steps:
            assert s.index == fmt.index(va & (fmt.va_span - 1), s.level)
            assert s.entry_pa == s.table_pa + 8 * s.index
            assert b.mem.read_u64(s.entry_pa) == s.raw
        assert t.steps[-1].entry.kind is Kind.LEAF


@pytest.mark.parametrize("fmt", X86_CONFIGS, ids=lambda f: f.name)
def test_x86_translate_faults(fmt):
    b = TableBuilder(fmt)
    base = kernel_base(fmt)
    b.map(base, 0x20_0000, K4, X86_PAGE_KERNEL)
    t = translate(fmt, b.mem, b.root, base + M2)  # same pmd table, empty pmd entry
    assert t.fault == "not present at pmd" and t.pa is None
    assert translate(fmt, b.mem, b.root, base + K4).fault == "not present at pte"
    assert translate(fmt, b.mem, b.root, 0x1000).fault == "not present at pgd"
    noncanon = 1 << (fmt.va_bits - 1)
    assert translate(fmt, b.mem, b.root, noncanon).fault == "non-canonical"
    with pytest.raises(ValueError):
        translate(fmt, b.mem, b.root, 1 << 64)


@pytest.mark.parametrize("fmt", ARM_CONFIGS, ids=lambda f: f.name)
def test_arm64_translate_and_runs(fmt):
    b = TableBuilder(fmt)
    base = kernel_base(fmt)
    g = fmt.page_sizes()[0]
    blk = fmt.entry_size(1)
    b.map(base, 0x4000_0000, 8 * g, ARM64_PAGE_KERNEL, level=0)
    b.map(base + 8 * g, 0x4000_0000 + 8 * g, 8 * g, ARM_RO, level=0)
    b.map(base + 4 * blk, 0x8000_0000, blk, ARM64_PAGE_KERNEL, level=1)
    t = translate(fmt, b.mem, b.root, base + 9 * g + 7)
    assert (t.pa, t.page_size, t.level, t.attrs) == (0x4000_0000 + 9 * g + 7, g, 0, ARM_RO)
    assert len(t.steps) == fmt.levels
    t = translate(fmt, b.mem, b.root, base + 4 * blk + 3 * g)
    assert (t.pa, t.page_size, t.level) == (0x8000_0000 + 3 * g, blk, 1)
    runs = runs_of(b)
    assert [(r.va, r.size, r.pa, r.page_size, r.attrs, r.count) for r in runs] == [
        (base, 8 * g, 0x4000_0000, g, ARM64_PAGE_KERNEL, 8),
        (base + 8 * g, 8 * g, 0x4000_0000 + 8 * g, g, ARM_RO, 8),
        (base + 4 * blk, blk, 0x8000_0000, blk, ARM64_PAGE_KERNEL, 1),
    ]
    other = 0x1000 if fmt.upper else (1 << 64) - 0x1000
    assert translate(fmt, b.mem, b.root, other).fault == "outside this root's VA range"


# --- runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", X86_CONFIGS, ids=lambda f: f.name)
def test_runs_coalesce_and_break(fmt):
    b = TableBuilder(fmt)
    base = kernel_base(fmt)
    # 600 4K pages straddling two pte tables, contiguous in PA: one run
    b.map(base, 0x100_0000, 600 * K4, X86_PAGE_KERNEL)
    # attr change inside a table
    b.map(base + 600 * K4, 0x100_0000 + 600 * K4, 4 * K4, X86_RX)
    # PA discontinuity with equal attrs
    b.map(base + 604 * K4, 0x900_0000, 4 * K4, X86_RX)
    # page size change: 2M leaves continuing VA and PA of 4K pages with equal attrs
    b.map(base + 2 * M2 - 8 * K4, 0x4000_0000 - 8 * K4, 8 * K4, X86_PAGE_KERNEL)
    b.map(base + 2 * M2, 0x4000_0000, 2 * M2, X86_PAGE_KERNEL, level=1)
    runs = runs_of(b)
    got = [(r.va - base, r.size, r.pa, r.level, r.count) for r in runs]
    assert got == [
        (0, 600 * K4, 0x100_0000, 0, 600),
        (600 * K4, 4 * K4, 0x100_0000 + 600 * K4, 0, 4),
        (604 * K4, 4 * K4, 0x900_0000, 0, 4),
        (2 * M2 - 8 * K4, 8 * K4, 0x4000_0000 - 8 * K4, 0, 8),
        (2 * M2, 2 * M2, 0x4000_0000, 1, 2),
    ]
    assert all(r.end == r.va + r.size and r.kind is Kind.LEAF for r in runs)


def test_runs_upper_and_lower_half_sign_extension():
    fmt = X86_64(4)
    b = TableBuilder(fmt)
    b.map(0x40_0000, 0x200_0000, 3 * K4, X86_USER)
    b.map(0x7FFF_FFFF_F000, 0x300_0000, K4, X86_USER)  # last user page
    b.map(0xFFFF_8000_0000_0000, 0x400_0000, K4, X86_PAGE_KERNEL)  # first kernel page
    b.map(0xFFFF_FFFF_FFFF_F000, 0x500_0000, K4, X86_PAGE_KERNEL)  # last page
    runs = runs_of(b)
    assert [(r.va, r.pa) for r in runs] == [
        (0x40_0000, 0x200_0000), (0x7FFF_FFFF_F000, 0x300_0000),
        (0xFFFF_8000_0000_0000, 0x400_0000), (0xFFFF_FFFF_FFFF_F000, 0x500_0000),
    ]
    # the two halves never coalesce, even with contiguous PA and equal attrs
    b2 = TableBuilder(fmt)
    b2.map(0x7FFF_FFFF_F000, 0x300_0000, K4, X86_PAGE_KERNEL)
    b2.map(0xFFFF_8000_0000_0000, 0x300_1000, K4, X86_PAGE_KERNEL)
    assert len(runs_of(b2)) == 2
    # clipping to [start, end)
    clipped = list(Walker(fmt, b.mem, b.root).runs(0x40_1800, 0x40_2800))
    assert [(r.va, r.size, r.pa, r.count) for r in clipped] == [(0x40_1800, 0x1000, 0x200_1800, 2)]
    assert list(Walker(fmt, b.mem, b.root).runs(0x8000_0000_0000, 0xFFFF_8000_0000_0000)) == []
    with pytest.raises(ValueError):
        Walker(fmt, b.mem, b.root).runs(5, 5)


def test_effective_attrs_from_table_path_break_runs():
    fmt = X86_64(4)
    base = kernel_base(fmt)
    b = TableBuilder(fmt)
    b.map(base, 0x100_0000, 1024 * K4, X86_PAGE_KERNEL)  # two pte tables, one leaf raw pattern
    # second pte table's pmd entry denies write: leaves below are effectively read-only
    b.set_table_attrs(base + M2, 1, fmt.table_attrs().with_(writable=False))
    runs = runs_of(b)
    assert [(r.va - base, r.count, r.attrs.writable) for r in runs] == [(0, 512, True),
                                                                       (M2, 512, False)]
    t = translate(fmt, b.mem, b.root, base + M2 + 5)
    assert t.attrs.writable is False and t.steps[-1].entry.attrs.writable is True


def test_arm64_table_attrs_apply_below():
    fmt = Arm64(4096, 48)
    base = kernel_base(fmt)
    b = TableBuilder(fmt, table_attrs={1: fmt.table_attrs().with_(exec=False)})
    b.map(base, 0x4000_0000, 4 * K4, ARM64_PAGE_KERNEL.with_(exec=True))
    (run,) = runs_of(b)
    assert run.attrs.exec is False and run.attrs.writable is True


def test_ignore_ad():
    fmt = X86_64(4)
    base = kernel_base(fmt)
    b = TableBuilder(fmt)
    b.map(base, 0x100_0000, 4 * K4, X86_PAGE_KERNEL)
    b.map(base + 4 * K4, 0x100_0000 + 4 * K4, 4 * K4, X86_PAGE_KERNEL.with_(accessed=False,
                                                                          dirty=False))
    assert len(runs_of(b)) == 2
    (run,) = runs_of(b, ignore_ad=True)
    assert run.count == 8 and run.attrs == X86_PAGE_KERNEL


def test_nonpresent_l1tf_leaf():
    fmt = X86_64(4)
    base = kernel_base(fmt)
    b = TableBuilder(fmt)
    b.map(base, 0x100_0000, 3 * K4, X86_PAGE_KERNEL)
    gone = X86_PAGE_KERNEL.with_(present=False, writable=False)  # set_direct_map_invalid
    b.set_raw(base + K4, 0, fmt.leaf(0x100_1000, gone, 0))
    assert b.mem.read_u64(b.entry_pa(base + K4, 0)) & 0x100_1000 == 0  # PFN stored inverted
    assert [(r.va - base, r.count) for r in runs_of(b)] == [(0, 1), (2 * K4, 1)]
    runs = runs_of(b, include_nonpresent=True)
    assert [(r.va - base, r.pa, r.attrs.present) for r in runs] == [
        (0, 0x100_0000, True), (K4, 0x100_1000, False), (2 * K4, 0x100_2000, True)]
    t = translate(fmt, b.mem, b.root, base + K4 + 8)
    assert t.fault == "not present" and t.pa == 0x100_1008 and t.attrs.present is False


@pytest.mark.parametrize("fmt", X86_CONFIGS + ARM_CONFIGS, ids=lambda f: f.name)
def test_include_holes_cover_every_range(fmt):
    b = TableBuilder(fmt)
    base = kernel_base(fmt)
    g = fmt.page_sizes()[0]
    b.map(base + 3 * g, 0x4000_0000, 5 * g, fmt.normalize(X86_PAGE_KERNEL if fmt.arch ==
                                                         "x86_64" else ARM64_PAGE_KERNEL))
    runs = runs_of(b, include_holes=True)
    for rs, re_ in fmt.va_ranges():
        inside = [r for r in runs if rs <= r.va < re_]
        assert inside[0].va == rs and inside[-1].end == re_
        assert all(a.end == c.va for a, c in zip(inside, inside[1:], strict=False))
    holes = [r for r in runs if r.kind is Kind.EMPTY]
    leaves = [r for r in runs if r.kind is Kind.LEAF]
    assert [(r.va, r.count) for r in leaves] == [(base + 3 * g, 5)]
    assert all(h.attrs == HOLE_ATTRS and h.size == h.count * h.page_size for h in holes)
    before = [h for h in holes if h.end == base + 3 * g]
    assert before and before[0].level == 0 and before[0].count == 3


def test_linear_map_model_runs():
    b = linear_map_model(pages=5000, blocks=3)
    runs = runs_of(b)
    assert [(r.count, r.page_size) for r in runs] == [(5000, K4), (3, M2)]
    assert runs[0].va == (1 << 64) - (1 << 48) and runs[0].pa == 0x4000_0000


def test_walker_memory_outside_and_reset():
    fmt = X86_64(4)
    b = TableBuilder(fmt, SparseMemory(1 << 30))
    b.map(0x1000, 0x2000, K4, X86_USER)
    b.set_raw(0x4000_0000, 2, fmt.table(1 << 40, 2))  # pud entry -> table beyond memory
    w = Walker(fmt, b.mem, b.root)
    assert [r.va for r in w.runs()] == [0x1000]
    assert len(w.anomalies) == 1 and "outside memory" in w.anomalies[0].reason
    assert w.anomalies[0].va == 0x4000_0000 and w.anomalies[0].level == 2
    list(w.runs(0, 0x2000))
    assert w.anomalies == []
    t = translate(fmt, b.mem, b.root, 0x4000_0000)
    assert t.fault == "table outside memory at pmd"


def test_own_attrs_split_where_effective_hides_a_difference():
    fmt = X86_64(4)
    base = kernel_base(fmt)
    b = TableBuilder(fmt)
    b.map(base, 0x100_0000, 4 * K4, X86_PAGE_KERNEL)
    b.map(base + 4 * K4, 0x100_4000, 4 * K4, X86_PAGE_KERNEL.with_(writable=False))
    b.set_table_attrs(base, 1, fmt.table_attrs().with_(writable=False))
    (run,) = runs_of(b)
    assert run.count == 8 and run.attrs.writable is False and run.own is None
    runs = runs_of(b, own_attrs=True)
    assert [(r.count, r.attrs.writable, r.own.writable) for r in runs] == [
        (4, False, True), (4, False, False)]


def test_run_rule_is_one_predicate_on_scalars_and_arrays():
    """continues() is the one run rule: applied to every combination of scalars it gives the
    expected verdicts, and applied to the same combinations as numpy arrays (the vectorised
    paths) exactly the scalar answers."""
    kinds = [int(Kind.EMPTY), int(Kind.TABLE), int(Kind.LEAF)]
    combos = list(itertools.product(kinds, [0, 1], kinds, [0, 1], [False, True], [False, True]))
    scalar = [bool(continues(*c)) for c in combos]
    cols = [np.array(col) for col in zip(*combos, strict=True)]
    assert continues(*cols).tolist() == scalar
    for (pk, pkey, k, key, adj, contig), got in zip(combos, scalar, strict=True):
        want = adj and pk == k and (k == Kind.EMPTY or (pkey == key
                                                      and (k == Kind.TABLE or contig)))
        assert got == want, (pk, pkey, k, key, adj, contig)
    # the open run (Kind members, None keys for holes) against the next segment
    assert continues(Kind.EMPTY, None, Kind.EMPTY, None, True, False)
    assert not continues(Kind.LEAF, 3, Kind.EMPTY, None, True, True)
    assert not continues(Kind.LEAF, 3, Kind.LEAF, 3, False, True)

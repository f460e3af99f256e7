"""Walker robustness: garbage tables (random u64s, self/ancestor pointers, huge OAs) never
raise or hang, stay within the table budget, report anomalies, and agree with translate()."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ptlab.dump import format_items, format_runs, note_runs, parse
from ptlab.formats.arm64 import Arm64
from ptlab.formats.base import Kind
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.testing import X86_PAGE_KERNEL, TableBuilder
from ptlab.walk import Walker, level_name, translate

FORMATS = [X86_64(4), X86_64(5), Arm64(4096, 48), Arm64(16384, 47), Arm64(65536, 42),
           Arm64(4096, 39, upper=False)]
MEM_SIZE = 1 << 24
NTABLES = 6
TABLE_BITS = 0x3  # x86 P|RW; arm64 valid|table


def table_pa(fmt, j: int) -> int:
    return 0x10_0000 + j * fmt.table_bytes


entry_value = st.one_of(
    st.integers(0, (1 << 64) - 1),  # random garbage
    st.tuples(st.just("tbl"), st.integers(0, NTABLES - 1), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("far"), st.integers(24, 51), st.integers(0, (1 << 64) - 1)),
)


def raw_of(fmt, v) -> int:
    if isinstance(v, int):
        return v
    kind, x, noise = v
    flags = noise & ((0xFFF & ~0x80) | (0xF << 59)) | TABLE_BITS  # no PS: a table entry
    if kind == "tbl":
        return table_pa(fmt, x) | flags
    return ((1 << x) & ~0xFFF) | (noise & (1 << 40) - 1 & ~0xFFF) | flags


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS),
       tables=st.lists(st.lists(st.tuples(st.integers(0, 1 << 13), entry_value), max_size=24),
                       min_size=NTABLES, max_size=NTABLES),
       fill=st.one_of(st.none(), st.tuples(st.integers(0, NTABLES - 1), entry_value)),
       holes=st.booleans(), nonpresent=st.booleans(), ad=st.booleans())
def test_garbage_never_raises_or_hangs(fmt, tables, fill, holes, nonpresent, ad):
    mem = SparseMemory(MEM_SIZE)
    for j, entries in enumerate(tables):
        n = fmt.entries(fmt.top_level) if j == 0 else fmt.entries(0)
        for idx, v in entries:
            mem.write_u64(table_pa(fmt, j) + (idx % n) * 8, raw_of(fmt, v))
    if fill is not None:  # a whole table of one value: many pointers to the same table
        j, v = fill
        for idx in range(fmt.entries(0)):
            mem.write_u64(table_pa(fmt, j) + idx * 8, raw_of(fmt, v))
    root = table_pa(fmt, 0)
    w = Walker(fmt, mem, root, include_holes=holes, include_nonpresent=nonpresent,
               ignore_ad=ad, max_tables=64)
    t0 = time.perf_counter()
    runs = list(w.runs())
    assert time.perf_counter() - t0 < 20
    assert w.tables_visited <= 64
    ranges = fmt.va_ranges()
    for a, b in zip(runs, runs[1:], strict=False):
        assert a.end <= b.va
    for r in runs:
        assert r.size > 0 and any(s <= r.va and r.end <= e for s, e in ranges)
        assert r.size == r.count * r.page_size
    for a in w.anomalies:
        assert isinstance(a.reason, str) and a.reason
    if holes and nonpresent:  # the ptdump text of garbage renders and parses back
        text = format_items(note_runs(runs, fmt), fmt.arch)
        lines = parse(text, fmt.arch)
        assert parse(format_runs(lines, fmt.arch), fmt.arch) == lines
    # every leaf run agrees with translate() at its first and last byte
    for r in [r for r in runs if r.kind is Kind.LEAF][:12]:
        for off in (0, r.size - 1):
            t = translate(fmt, mem, root, r.va + off)
            assert t.pa == r.pa + off and t.level == r.level
            assert t.attrs.present == r.attrs.present
            if not ad:
                assert t.attrs == r.attrs
            assert t.fault == (None if r.attrs.present else "not present")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_self_and_ancestor_pointers_are_cycles(fmt):
    b = TableBuilder(fmt, SparseMemory(MEM_SIZE), base=0x10_0000)
    top = fmt.top_level
    va = fmt.va_ranges()[-1][0]
    g = fmt.entry_size(0)
    b.map(va, 0x40_0000, g, fmt.normalize(X86_PAGE_KERNEL))  # creates the path root -> pte
    pmd_entry = b.entry_pa(va, 1)
    pmd_table = pmd_entry - fmt.index(va & (fmt.va_span - 1), 1) * 8
    # next pmd entry points at the pmd table itself, the one after at the root (ancestor)
    b.mem.write_u64(pmd_entry + 8, pmd_table | TABLE_BITS)
    b.mem.write_u64(pmd_entry + 16, b.root | TABLE_BITS)
    # the root's last entry points at the root
    b.mem.write_u64(b.root + (fmt.entries(top) - 1) * 8, b.root | TABLE_BITS)
    w = Walker(fmt, b.mem, b.root)
    runs = list(w.runs())
    assert [(r.va, r.count) for r in runs if r.attrs.present] == [(va, 1)]
    cycles = [a for a in w.anomalies if "cycle" in a.reason]
    assert len(cycles) == 3
    assert {a.entry_pa for a in cycles} == {pmd_entry + 8, pmd_entry + 16,
                                            b.root + (fmt.entries(top) - 1) * 8}
    want = f"cycle at {level_name(fmt, 1)}"
    assert translate(fmt, b.mem, b.root, va + fmt.entry_size(1)).fault == want


def test_huge_fanout_is_bounded_by_table_budget():
    fmt = X86_64(4)
    mem = SparseMemory(MEM_SIZE)
    a, b, c, d = (0x10_0000 + i * 0x1000 for i in range(4))
    for idx in range(512):  # every entry of a -> b, of b -> c, of c -> d: 512**3 paths
        mem.write_u64(a + idx * 8, b | 3)
        mem.write_u64(b + idx * 8, c | 3)
        mem.write_u64(c + idx * 8, d | 3)
    mem.write_u64(d, 0x5000 | 3)  # one 4K leaf in d
    w = Walker(fmt, mem, a, max_tables=3000)
    t0 = time.perf_counter()
    runs = list(w.runs())
    assert time.perf_counter() - t0 < 10
    assert w.tables_visited == 3000
    assert any("budget" in x.reason for x in w.anomalies)
    assert runs and all(r.pa == 0x5000 and r.count == 1 for r in runs)


def test_table_outside_small_memory_and_huge_oa():
    fmt = Arm64(4096, 48)
    mem = SparseMemory(1 << 22)
    root = 0x1000
    mem.write_u64(root, (1 << 47) | 3)  # table at 128 TiB: outside
    mem.write_u64(root + 8, 0x2000 | 3)
    mem.write_u64(0x2000, ((1 << 47) - (1 << 30)) | 0x1 | (1 << 10))  # 1G block, huge OA
    w = Walker(fmt, mem, root, check_oa=True)
    runs = list(w.runs())
    assert [r.page_size for r in runs] == [1 << 30]
    reasons = [a.reason for a in w.anomalies]
    assert any("outside memory" in r and "table" in r for r in reasons)
    assert any("leaf output range" in r for r in reasons)


@pytest.mark.parametrize("fmt", [X86_64(4), Arm64(4096, 48)], ids=lambda f: f.name)
def test_reserved_bits_inside_a_run_are_reported_once(fmt):
    b = TableBuilder(fmt, SparseMemory(MEM_SIZE), base=0x10_0000)
    va = fmt.va_ranges()[-1][0] + (1 << 40)
    m2 = fmt.entry_size(1)
    attrs = fmt.normalize(X86_PAGE_KERNEL)
    b.map(va, 0x20_0000, 8 * m2, attrs, level=1)
    epa = b.entry_pa(va + 3 * m2, 1)
    b.mem.write_u64(epa, b.mem.read_u64(epa) | (1 << 13))  # RES0 / reserved in a 2M leaf
    w = Walker(fmt, b.mem, b.root)
    runs = list(w.runs())
    assert [(r.va, r.count) for r in runs] == [(va, 8)]  # decodes the same: one run
    assert [a.entry_pa for a in w.anomalies] == [epa]
    # a table entry with ignored/RES0 bits among clean siblings
    b.map(va + 16 * m2, 0x400_0000, 2 * m2, attrs, level=0)
    tpa = b.entry_pa(va + 17 * m2, 1)
    bit = (1 << 59) if fmt.arch == "x86_64" else (1 << 50)  # x86 pkey bits, arm64 RES0
    b.mem.write_u64(tpa, b.mem.read_u64(tpa) | bit)
    w = Walker(fmt, b.mem, b.root)
    runs = list(w.runs())
    assert sum(r.count for r in runs) == 8 + 2 * fmt.entries(0)
    assert sorted(a.entry_pa for a in w.anomalies) == sorted([epa, tpa])

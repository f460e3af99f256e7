"""Property tests on random well-formed tables: runs are exact and maximal against a flat
page oracle built from translate(), and the semantic diff covers exactly the pages that
differ."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ptlab import walk
from ptlab.dump import diff
from ptlab.formats.arm64 import Arm64
from ptlab.formats.base import Kind
from ptlab.formats.x86 import X86_64
from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder
from ptlab.walk import translate, walk_runs
from ptlab.walk import walker as walker_module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


FORMATS = [X86_64(4), X86_64(5), Arm64(4096, 48), Arm64(16384, 47), Arm64(4096, 39)]
SLOTS = 48  # pages of the granule in the window under test


def window(fmt, level: int = 1) -> int:
    """Start of a window that straddles a boundary of ``level`` entries (level 1: two pte
    tables of one pmd table; level 2: two pte tables in two pmd tables)."""
    start = fmt.va_ranges()[-1][0]
    return start + fmt.entry_size(level) - (SLOTS // 2) * fmt.page_sizes()[0]


attr_choice = st.sampled_from(["rw", "ro", "rox", "rw_old"])
mapping = st.lists(st.tuples(st.integers(0, SLOTS - 1), st.integers(1, 8), attr_choice,
                             st.integers(0, 3)), max_size=10)
long_mapping = st.lists(st.tuples(st.integers(0, SLOTS - 1), st.integers(1, SLOTS), attr_choice,
                                  st.integers(0, 1)), max_size=6)


def attrs_of(fmt, name: str):
    base = X86_PAGE_KERNEL if fmt.arch == "x86_64" else ARM64_PAGE_KERNEL
    a = {"rw": base, "ro": base.with_(writable=False, dbm=False),
         "rox": base.with_(writable=False, exec=True, uexec=fmt.arch == "x86_64", dbm=False),
         "rw_old": base.with_(accessed=False, dirty=False)}[name]
    return fmt.normalize(a)


def build(fmt, maps, level: int = 1) -> TableBuilder:
    b = TableBuilder(fmt)
    g = fmt.page_sizes()[0]
    start = window(fmt, level)
    for slot, n, name, pa_jump in maps:
        n = min(n, SLOTS - slot)
        for i in range(n):  # later mappings overwrite earlier ones page by page
            va = start + (slot + i) * g
            pa = 0x4000_0000 + (slot + i) * g + pa_jump * 0x100_0000
            b.set_raw(va, 0, fmt.leaf(pa, attrs_of(fmt, name), 0))
    return b


def oracle(fmt, b) -> dict[int, tuple]:
    g = fmt.page_sizes()[0]
    out = {}
    for i in range(SLOTS):
        va = window(fmt) + i * g
        t = translate(fmt, b.mem, b.root, va)
        if t.fault is None:
            out[va] = (t.pa, t.attrs)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), maps=mapping, ad=st.booleans())
def test_runs_are_exact_and_maximal(fmt, maps, ad):
    b = build(fmt, maps)
    g = fmt.page_sizes()[0]
    runs, anomalies = walk_runs(fmt, b.mem, b.root, ignore_ad=ad)
    assert anomalies == []
    pages = oracle(fmt, b)
    covered = {}
    for r in runs:
        assert r.page_size == g and r.size == r.count * g
        for k in range(r.count):
            covered[r.va + k * g] = (r.pa + k * g, r.attrs)
    if ad:
        def strip(v):
            return (v[0], v[1].with_(accessed=False, dirty=False))
        assert {k: strip(v) for k, v in covered.items()} == {k: strip(v) for k, v in pages.items()}
    else:
        assert covered == pages
    for a, c in zip(runs, runs[1:], strict=False):  # maximal: neighbours could not merge
        same = (a.attrs.with_(accessed=False, dirty=False) == c.attrs.with_(accessed=False,
                dirty=False)) if ad else a.attrs == c.attrs
        assert not (a.end == c.va and a.pa + a.size == c.pa and same)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), old=mapping, new=mapping)
def test_diff_covers_exactly_the_differing_pages(fmt, old, new):
    a, b = build(fmt, old), build(fmt, new)
    ra, _ = walk_runs(fmt, a.mem, a.root)
    rb, _ = walk_runs(fmt, b.mem, b.root)
    pa, pb = oracle(fmt, a), oracle(fmt, b)
    g = fmt.page_sizes()[0]
    changed = {}
    for ch in diff(ra, rb):
        assert ch.size > 0 and ch.size % g == 0
        for va in range(ch.va, ch.end, g):
            changed[va] = ch.kind
    differing = {va for va in pa.keys() | pb.keys() if pa.get(va) != pb.get(va)}
    assert set(changed) == differing
    for va, kind in changed.items():
        assert kind == ("added" if va not in pa else "removed" if va not in pb else "changed")
    changes = diff(ra, rb)
    for x, y in zip(changes, changes[1:], strict=False):
        assert x.end <= y.va


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), maps=long_mapping, holes=st.lists(st.integers(0, SLOTS - 1)),
       nonpresent=st.lists(st.integers(0, SLOTS - 1)),
       kw=st.sampled_from([{}, {"ignore_ad": True}, {"include_nonpresent": True},
                           {"own_attrs": True}, {"include_holes": True},
                           {"include_holes": True, "include_nonpresent": True}]),
       clip=st.integers(0, SLOTS // 2), level=st.sampled_from([1, 2]), split=st.booleans())
def test_vectorised_emission_equals_the_per_run_loop(monkeypatch_module, fmt, maps, holes,
                                                     nonpresent, kw, clip, level, split):
    """Long table-free stretches of runs are emitted with numpy; the result must be exactly
    what the per-run loop gives (same runs, same anomalies), clipped or not."""
    b = build(fmt, maps, level)
    g = fmt.page_sizes()[0]
    start = window(fmt, level)
    for slot in holes:
        b.set_raw(start + slot * g, 0, 0)
    for slot in nonpresent:  # a non-present leaf with a PFN (secretmem's kind of entry)
        raw = fmt.leaf(0x7000_0000 + slot * g, attrs_of(fmt, "rw").with_(present=False), 0)
        b.set_raw(start + slot * g, 0, raw)
    if split:  # the second pte table's parent entry gets a bit that only its key sees (x86
        # A, an ignored bit on arm64): the two pte tables are walked as separate batches and
        # a run must carry across them
        for step in translate(fmt, b.mem, b.root, start + SLOTS * g - g).steps:
            if step.level == 1 and step.entry.kind is Kind.TABLE:
                bit = 0x20 if fmt.arch == "x86_64" else 1 << 55
                b.mem.write_u64(step.entry_pa, step.raw ^ bit)
    lo, hi = start + clip * g, start + SLOTS * g
    results = []
    for block_min in (2, 10**9):
        monkeypatch_module.setattr(walker_module, "_BLOCK_MIN", block_min)
        for rng in ((None, None), (lo, hi)):
            w = walk.Walker(fmt, b.mem, b.root, **kw)
            results.append((list(w.runs(*rng)), w.anomalies))
    assert results[0] == results[2] and results[1] == results[3]


table_content = st.lists(st.tuples(st.integers(0, 511), st.integers(1, 512), attr_choice,
                                   st.integers(0, 1)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS[:2] + FORMATS[2:3]),
       contents=st.lists(table_content, min_size=1, max_size=3),
       pattern=st.lists(st.integers(0, 2), min_size=4, max_size=40),
       garbage=st.booleans(), nonpresent=st.booleans(),
       kw=st.sampled_from([{}, {"ignore_ad": True}, {"include_holes": True}]))
def test_repeated_tables_walk_like_distinct_ones(monkeypatch_module, fmt, contents, pattern,
                                                 garbage, nonpresent, kw):
    """A batch of a few pte tables repeated many times (x86's ESPFIX area) is analysed once
    per distinct table; the runs and anomalies must be those of the direct analysis."""
    b = TableBuilder(fmt)
    g, span = fmt.page_sizes()[0], fmt.entry_size(1)
    n = fmt.entries(0)
    va0 = fmt.va_ranges()[-1][0]
    templates = []
    for t, maps in enumerate(contents):  # template tables at the first pmd slots
        for slot, count, name, jump in maps:
            slot = slot % n
            b.map(va0 + t * span + slot * g, 0x4000_0000 + t * span + slot * g + jump * span,
                  min(count, n - slot) * g, attrs_of(fmt, name))
        if nonpresent:
            raw = fmt.leaf(0x7000_0000, attrs_of(fmt, "rw").with_(present=False), 0)
            b.set_raw(va0 + t * span + (n - 1) * g, 0, raw)
        if garbage and t == 0:  # a non-zero empty entry: an anomaly at every copy
            b.mem.write_u64(b.entry_pa(va0 + 3 * g, 0), 0x2)
        templates.append(b.mem.read_u64(b.entry_pa(va0 + t * span, 1)))
    for j, which in enumerate(pattern):  # the copies, in the next pmd table
        b.mem.write_u64(b.entry_pa(va0 + fmt.entry_size(2) + j * span, 1),
                        templates[which % len(templates)])
    results = []
    for copies in (True, False):
        if not copies:
            monkeypatch_module.setattr(walk.Walker, "_runs_of_copies", lambda *a: None)
        w = walk.Walker(fmt, b.mem, b.root, **kw)
        results.append((list(w.runs()), w.anomalies))
    monkeypatch_module.undo()
    assert results[0] == results[1]

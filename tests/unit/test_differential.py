"""Differential test of the engine against a flat oracle, for every format configuration.

Two roots A and B share one memory. Random sequences of map (incl. arm64 contiguous-hint
sizes) / unmap / protect (incl. making leaves non-present) / split / collapse / share and
unshare (level-1 sub-tables of one root linked into the other) / clone / preallocate are
applied to the engine and to a flat oracle (per page of a VA window: attributes and PA - VA,
pages of aliased slots kept equal in both roots' oracles). After every
step the walker's runs over the window must equal the oracle, the walker must report no
anomaly, and the pages the pool has handed out must be exactly the tables reachable from
the two roots (no leak, no table freed while still linked). Some operations run with a
no-allocation allocator: they either need no table (and succeed) or fail leaving every byte
of memory, the registry and the gather untouched; operations expected to fail (overlap) are
checked the same way. At the end both roots are destroyed and the pool must be empty.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from ptlab.alloc import AllocError, NoAllocAllocator, NormalAllocator, PhysPool
from ptlab.engine import EngineError, MappingExists, PageTable
from ptlab.formats import Attrs, Kind
from ptlab.formats.catalog import all_configs
from ptlab.memory import SparseMemory
from ptlab.tlb import Gather
from ptlab.walk import Walker

CONFIGS = all_configs()
STEPS = 50  # operations per example
EXAMPLES = 21  # examples per configuration (>= 1,000 operations)
# Shrinking a 50-step failure can take minutes: off unless PTLAB_SHRINK=1.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("PTLAB_SHRINK") == "1" else [])
POOL_BASE = 1 << 40
DATA_BASE = 1 << 34  # PAs mapped (never touched)

MAP, UNMAP, PROTECT, SPLIT, COLLAPSE, SHARE, CLONE, PREALLOC = range(8)

OP = st.tuples(
    st.sampled_from([MAP] * 6 + [UNMAP] * 5 + [PROTECT] * 4 + [SPLIT] * 3 + [COLLAPSE] * 2
                    + [SHARE, CLONE, PREALLOC]),
    st.integers(0, 1),  # root: A or B
    st.integers(0, 2),  # unit: granule / level-1 block / level-2 block (if in the window)
    st.integers(0, 1 << 12),  # start in units
    st.sampled_from([0, 0, 0, 1, 3]),  # start offset in granules
    st.integers(1, 3),  # size in units
    st.sampled_from([0, 0, 0, -1, 2]),  # size offset in granules
    st.integers(0, 7),  # PA in units
    st.sampled_from([0, 0, 0, 1]),  # PA offset in granules
    st.integers(0, 7),  # attribute / change choice
    st.integers(0, 3),  # flags: bit 0 replace / small pages, bit 1 no-allocation
)


# Always run first: contiguous groups (arm64) mapped, partly unmapped and protected, then
# shared into B and changed through B, collapsed, split, overlapped.
EXPLICIT = [
    (MAP, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1),
    (UNMAP, 0, 0, 5, 0, 1, 0, 0, 0, 0, 0),
    (PROTECT, 0, 0, 40, 0, 2, 0, 0, 0, 1, 0),
    (SHARE, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1),
    (UNMAP, 1, 0, 100, 0, 1, 0, 0, 0, 0, 2),
    (MAP, 1, 0, 100, 0, 1, 0, 100, 0, 0, 2),
    (COLLAPSE, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0),
    (MAP, 0, 2, 1, 0, 1, 0, 1, 0, 2, 0),
    (SPLIT, 0, 1, 0, 0, 1, 0, 3, 0, 1, 0),
    (MAP, 1, 1, 1, 3, 1, 2, 2, 1, 3, 1),
    (PROTECT, 0, 2, 0, 1, 1, -1, 0, 0, 6, 0),
    (PREALLOC, 1, 1, 2, 0, 1, 0, 0, 0, 0, 0),
    (MAP, 1, 0, 2 * 512, 0, 3, 0, 0, 0, 0, 2),  # no allocation needed: preallocated
    (CLONE, 1, 1, 1, 0, 2, 0, 0, 0, 0, 0),
    (SHARE, 1, 1, 0, 0, 1, 0, 0, 0, 7, 0),  # unshare
]


# Collapse at both leaf levels: small pages (arm64: contiguous groups) over whole level-1
# blocks, one block broken by a protect, a pinned (preallocated) slot, and a level-2 leaf
# split twice, then collapsed bottom-up (tables merged per step: checked exactly).
EXPLICIT_COLLAPSE = [
    (MAP, 0, 1, 0, 0, 2, 0, 2, 0, 1, 1),
    (MAP, 0, 1, 2, 0, 1, 0, 4, 0, 3, 1),
    (PROTECT, 0, 0, 2 * 512 + 7, 0, 1, 0, 0, 0, 0, 0),
    (COLLAPSE, 0, 1, 0, 0, 3, 0, 0, 0, 0, 0),
    (PREALLOC, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0),
    (MAP, 1, 1, 0, 0, 1, 0, 2, 0, 3, 1),
    (COLLAPSE, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0),
    (UNMAP, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0),
    (MAP, 0, 2, 0, 0, 1, 0, 1, 0, 0, 0),
    (SPLIT, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0),
    (SPLIT, 0, 2, 0, 0, 1, 0, 1, 0, 0, 0),
    (COLLAPSE, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0),
]


def _palette(fmt) -> list[Attrs]:
    base = Attrs(present=True, accessed=True, dirty=True)
    raw = [
        base.with_(writable=True),
        base.with_(writable=False, exec=True, uexec=True),
        base.with_(writable=True, global_=True),
        base.with_(cache=1),
        base.with_(user=True, writable=True),
        base.with_(dirty=False),
        base.with_(writable=True, cache=2, global_=True),
        base.with_(user=True, uexec=True),
    ]
    return [fmt.normalize(a) for a in raw]


CHANGES = [
    ({"writable": True}, None),
    (None, ["writable"]),
    ({"exec": True, "uexec": True}, None),
    (None, ["exec", "uexec"]),
    ({"cache": 1}, None),
    ({"global_": True}, ["dirty"]),
    (None, ["present"]),  # set_direct_map_invalid: non-present leaf (L1TF-inverted on x86)
    ({"present": True}, None),
]


class World:
    def __init__(self, fmt) -> None:
        self.fmt = fmt
        g = fmt.table_bytes
        self.g = g
        self.mem = SparseMemory()
        self.pool = PhysPool(self.mem, POOL_BASE, 1 << 32, g)
        self.alloc = NormalAllocator(self.pool)
        tattrs = fmt.table_attrs().with_(user=True) if fmt.arch == "x86_64" else None
        self.pts = [
            PageTable(fmt, self.mem, alloc=self.alloc, gather=Gather(), table_attrs=tattrs)
            for _ in range(2)
        ]
        sizes = fmt.page_sizes()
        l1, l2 = sizes[1], sizes.get(2)
        self.l1 = l1
        lo_range = fmt.va_ranges()[-1][0]  # kernel half / TTBR1 / the only range
        if l2 is not None and l2 <= 1 << 30:
            self.units = [g, l1, l2]
            self.wbase = lo_range + l2
            self.wsize = l2 + 2 * l1
        else:
            self.units = [g, l1, l1]
            self.wbase = lo_range + 4 * l1
            self.wsize = 4 * l1
        self.npages = self.wsize // g
        # Oracle per root and page: attribute id (-1: unmapped) and PA - VA (mod 2**64).
        self.aid = [np.full(self.npages, -1, np.int32) for _ in range(2)]
        self.delta = [np.zeros(self.npages, np.uint64) for _ in range(2)]
        self._aid = np.empty(self.npages, np.int32)
        self._delta = np.empty(self.npages, np.uint64)
        self.attrs: list[Attrs] = []
        self.ids: dict[Attrs, int] = {}
        self.shared: set[int] = set()  # level-1 slot numbers aliased between A and B
        self.busy: list[set[int]] = [set(), set()]  # slots holding a preallocated pte table
        self.palette = _palette(fmt)
        self.ops = 0
        self.last_split = self.wbase
        self.cont_seen = 0

    # --- oracle -----------------------------------------------------------------------
    def aid_of(self, a: Attrs) -> int:
        i = self.ids.get(a)
        if i is None:
            i = self.ids[a] = len(self.attrs)
            self.attrs.append(a)
        return i

    def pages(self, va: int, size: int) -> slice:
        return slice((va - self.wbase) // self.g, (va + size - self.wbase) // self.g)

    def sync_shared(self, r: int) -> None:
        per = self.l1 // self.g
        for slot in self.shared:
            sl = slice(slot * per, (slot + 1) * per)
            for arr in (self.aid, self.delta):
                arr[1 - r][sl] = arr[r][sl]

    def mapped(self, r: int, sl: slice) -> np.ndarray:
        return self.aid[r][sl] >= 0

    def set_pages(self, r: int, sl: slice, aid: int, delta: int = 0) -> None:
        self.aid[r][sl] = aid
        self.delta[r][sl] = delta % (1 << 64)

    # --- checks -----------------------------------------------------------------------
    def check_root(self, r: int) -> None:
        pt = self.pts[r]
        w = Walker(self.fmt, self.mem, pt.root, include_nonpresent=True)
        runs = list(w.runs(self.wbase, self.wbase + self.wsize))
        assert w.anomalies == []
        aid, delta = self._aid, self._delta
        aid.fill(-1)
        delta.fill(0)
        for run in runs:
            sl = self.pages(run.va, run.size)
            if run.attrs.contiguous:  # whole, aligned contiguous-hint groups only
                group = run.page_size * self.fmt.contig_count(run.level)
                assert run.va % group == 0 and run.size % group == 0 and run.pa % group == 0, run
                self.cont_seen += 1
            aid[sl] = self.aid_of(self.fmt.normalize(run.attrs.with_(contiguous=False)))
            delta[sl] = (run.pa - run.va) % (1 << 64)
        if not (np.array_equal(aid, self.aid[r]) and np.array_equal(delta, self.delta[r])):
            bad = int(np.flatnonzero((aid != self.aid[r]) | (delta != self.delta[r]))[0])
            va = self.wbase + bad * self.g

            def show(i: int, d: int) -> str:
                return "unmapped" if i < 0 else f"pa {(va + d) % (1 << 64):#x} {self.attrs[i]}"

            raise AssertionError(f"root {r} page {va:#x}: walker {show(aid[bad], int(delta[bad]))}"
                                 f" != oracle {show(self.aid[r][bad], int(self.delta[r][bad]))}")

    def reachable(self) -> set[int]:
        fmt, mem, seen = self.fmt, self.mem, set()

        def walk(tpa: int, level: int) -> None:
            seen.add(tpa)
            if level == 0:
                return
            t = mem.read_table(tpa, fmt.entries(level))
            nz = np.flatnonzero(fmt.kinds(t, level) == Kind.TABLE)
            for oa in fmt.oas(t[nz], level):
                if int(oa) not in seen:
                    walk(int(oa), level - 1)

        for pt in self.pts:
            walk(pt.root, fmt.top_level)
        return seen

    def check_tables(self) -> None:
        for pt in self.pts:
            pt.gather.flush()
        used = {self.pool.base + p * self.g for p in self.pool._used}
        assert self.reachable() == used

    def state(self) -> tuple:
        reg = self.pts[0].registry
        return (self.mem.snapshot(), dict(reg.refs), set(reg.pinned),
                [pt.gather.pending for pt in self.pts], self.pool.allocated)

    # --- one step -----------------------------------------------------------------------
    def step(self, op: tuple) -> None:
        kind, r, unit, su, so, zu, zo, pu, po, choice, flags = op
        g, U = self.g, self.units[unit]
        nunits = self.wsize // U
        start = self.wbase + (su % nunits) * U + so * g
        size = zu * U + zo * g
        end = min(start + max(size, g), self.wbase + self.wsize)
        start = min(start, end - g)
        size = end - start
        pt, other = self.pts[r], self.pts[1 - r]
        noalloc = bool(flags & 2)
        touched_shared = False
        if self.shared:
            s0, s1 = (start - self.wbase) // self.l1, (end - 1 - self.wbase) // self.l1
            touched_shared = any(s in self.shared for s in range(s0, s1 + 1))
        before = self.state() if noalloc else None
        saved = pt.alloc
        if noalloc:
            pt.alloc = NoAllocAllocator(g)
        try:
            self._do(kind, r, pt, other, start, size, U, pu, po, choice, flags)
        except AllocError:
            assert noalloc, "AllocError with a normal allocator"
            assert self.state() == before, "failed no-alloc operation changed memory"
        finally:
            pt.alloc = saved
        self.ops += 1
        self.check_root(r)
        if touched_shared or kind == SHARE:
            self.check_root(1 - r)
        self.check_tables()

    def _do(self, kind, r, pt, other, start, size, U, pu, po, choice, flags) -> bool:
        g, sl = self.g, self.pages(start, size)
        end = start + size
        if kind == MAP:
            a = self.palette[choice]
            if U == self.units[2]:  # keep VA and PA congruent: huge pages inside, small at edges
                pa = DATA_BASE + pu * U + (start - self.wbase) % U
            else:
                pa = DATA_BASE + pu * U + po * g
            replace = bool(flags & 1) and choice % 2 == 0
            sizes = None
            if flags & 1 and choice % 2 and U <= self.l1:
                cc = self.fmt.contig_count(0)
                sizes = [g, g * cc] if choice % 4 == 1 and cc > 1 else [g]
            if self.mapped(r, sl).any() and not replace:
                return self._expect_fail(MappingExists, pt.map, start, pa, size, a, sizes)
            pt.map(start, pa, size, a, page_sizes=sizes, replace=replace)
            self.set_pages(r, sl, self.aid_of(a), pa - start)
            self.sync_shared(r)
        elif kind == UNMAP:
            pt.unmap(start, size)
            self.set_pages(r, sl, -1)
            self.sync_shared(r)
        elif kind == PROTECT:
            set_, clear = CHANGES[choice]
            pt.protect(start, size, set=set_, clear=clear)
            ids = self.aid[r][sl]
            m = ids >= 0
            for old in np.unique(ids[m]):
                a = self.attrs[int(old)]
                new = a.with_(**(set_ or {}), **{f: False for f in clear or ()})
                ids[m & (ids == old)] = self.aid_of(self.fmt.normalize(new))
            self.sync_shared(r)
        elif kind == SPLIT:
            runs = Walker(self.fmt, self.mem, pt.root, include_nonpresent=True).runs(
                self.wbase, self.wbase + self.wsize)
            huge = [run.va for run in runs if run.level >= 1]
            if huge:  # aim at a huge leaf
                start = max(huge[pu * 977 % len(huge)], self.wbase)
            hit = pt.translate(start).level  # the leaf, present or not (lookup: present)
            if hit is not None and hit >= 1:
                pt.split(start, hit)
                assert pt.translate(start).level == hit - 1
                self.last_split = start
            else:
                level = 1 if hit is None else hit + 1
                if level <= pt.top:
                    return self._expect_fail(EngineError, pt.split, start, level)
        elif kind == COLLAPSE:
            if choice % 2:
                start = self.last_split
            lo = start - (start - self.wbase) % U
            hi = min(lo + max(size, U) // U * U, self.wbase + self.wsize)
            want = self.expected_collapse(r, lo, hi)
            assert pt.collapse(lo, hi - lo) == want
        elif kind == SHARE:
            return self._share(r, pt, other, start, flags, choice)
        elif kind == CLONE:
            src = self.mapped(1 - r, sl)
            if (src & self.mapped(r, sl)).any():
                return self._expect_fail(MappingExists, pt.clone, other, start, size)
            pt.clone(other, start, size)
            for arr in (self.aid, self.delta):
                arr[r][sl][src] = arr[1 - r][sl][src]
            self.sync_shared(r)
        elif kind == PREALLOC:  # at most two pte tables: keep the walks small
            size = min(size, 2 * self.l1 - (start - self.wbase) % self.l1)
            end = start + size
            pt.preallocate(start, size, 0)
            first, last = (start - self.wbase) // self.l1, (end - 1 - self.wbase) // self.l1
            for slot in range(first, last + 1):
                self.busy[r].add(slot)  # a pinned, possibly empty, pte table is now there
                if slot in self.shared:
                    self.busy[1 - r].add(slot)
        return False

    def expected_collapse(self, r: int, lo: int, hi: int) -> int:
        """Tables ``collapse(lo, hi - lo)`` on root ``r`` must merge, worked out without the
        engine: from the leaves the walker sees (page level, own attributes incl. the
        contiguous hint, PA; checked against the oracle after the previous step) and the
        test's own record of shared and preallocated (pinned) level-1 slots. Bottom-up, an
        aligned block inside [lo, hi) whose size is a leaf size merges when all its pages are
        leaves one level down with one set of attributes, one PA offset and an aligned PA."""
        fmt, g = self.fmt, self.g
        n = (hi - lo) // g
        lvl = np.full(n, -1, np.int64)
        key = np.full(n, -1, np.int64)
        delta = np.zeros(n, np.uint64)
        keys: dict[Attrs, int] = {}
        w = Walker(fmt, self.mem, self.pts[r].root, include_nonpresent=True, own_attrs=True)
        for run in w.runs(lo, hi):
            sl = slice((run.va - lo) // g, (run.end - lo) // g)
            lvl[sl] = run.level
            key[sl] = keys.setdefault(run.own, len(keys))
            delta[sl] = (run.pa - run.va) % (1 << 64)
        attrs_of = {i: a for a, i in keys.items()}
        merged = 0
        for level in range(1, fmt.top_level + 1):
            if level not in fmt.leaf_levels:
                continue
            esz = fmt.entry_size(level)
            for b in range(-(-lo // esz) * esz, hi - esz + 1, esz):
                sl = slice((b - lo) // g, (b + esz - lo) // g)
                k, d = int(key[sl.start]), int(delta[sl.start])
                if not ((lvl[sl] == level - 1).all() and (key[sl] == k).all()
                        and (delta[sl] == d).all() and (b + d) % (1 << 64) % esz == 0):
                    continue
                if level == 1:
                    slot = (b - self.wbase) // self.l1
                    if slot in self.shared or slot in self.busy[r]:
                        continue  # a table linked from both roots, or pinned
                merged += 1
                lvl[sl] = level
                plain = attrs_of[k].with_(contiguous=False)
                key[sl] = keys.setdefault(plain, len(keys))
                attrs_of[key[sl.start]] = plain
        return merged

    def _share(self, r: int, pt, other, start: int, flags: int, choice: int) -> bool:
        l1, per = self.l1, self.l1 // self.g
        slot = (start - self.wbase) // l1
        nslots = 1 + (flags & 1) if slot + 1 < self.wsize // l1 else 1
        replace = bool(flags & 1)
        slots = range(slot, slot + nslots)
        va = self.wbase + slot * l1
        if choice == 7:  # unshare: r loses the aliased slots, the other root keeps them
            gone = [s for s in slots if s in self.shared]
            assert pt.unshare(va, nslots * l1, 1) == len(gone)
            for s in gone:
                self.set_pages(r, slice(s * per, (s + 1) * per), -1)
                self.shared.discard(s)
                self.busy[r].discard(s)
            return False
        conflict = any(s not in self.shared and (
            s in self.busy[r] or self.mapped(r, slice(s * per, (s + 1) * per)).any())
            for s in slots)
        if conflict and not replace:
            return self._expect_fail(MappingExists, pt.share, other, va, nslots * l1, 1)
        copy = {}
        for s in slots:
            hit = other.translate(self.wbase + s * l1).level  # present or not
            copy[s] = hit is not None and hit >= 1
        pt.share(other, va, nslots * l1, 1, replace=replace)
        for s in slots:
            sl = slice(s * per, (s + 1) * per)
            for arr in (self.aid, self.delta):
                arr[r][sl] = arr[1 - r][sl]
            self.busy[r].discard(s)
            if not copy[s]:
                self.shared.add(s)
                if s in self.busy[1 - r]:
                    self.busy[r].add(s)
        return False

    def _expect_fail(self, exc, fn, *args) -> bool:
        before = self.state()
        with pytest.raises(exc):
            fn(*args)
        assert self.state() == before, f"failed {fn.__name__} changed memory"
        return True

    def teardown(self) -> None:
        for pt in self.pts:
            pt.destroy()
        assert self.pool.allocated == 0, "tables leaked"
        assert not self.pts[0].registry.refs or all(
            pa < POOL_BASE or pa >= POOL_BASE + (1 << 32)
            for pa in self.pts[0].registry.refs
        )


@pytest.mark.parametrize("fmt", CONFIGS, ids=[f.name for f in CONFIGS])
def test_engine_matches_oracle(fmt) -> None:
    done: list[int] = []

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=PHASES)
    @given(st.lists(OP, min_size=STEPS, max_size=STEPS))
    @example(EXPLICIT)
    @example(EXPLICIT_COLLAPSE)
    def run(ops: list[tuple]) -> None:
        world = World(fmt)
        for op in ops:
            world.step(op)
        world.teardown()
        done.append(world.ops)
        conts.append(world.cont_seen)

    conts: list[int] = []
    run()
    assert sum(done) >= 1000
    assert sum(conts) > 0 or fmt.contig_count(0) == 1  # contiguous groups were exercised

"""Leaf-run iteration over one root: :class:`Walker`, what ptdump prints (mm/ptdump.c,
arch/x86/mm/dump_pagetables.c).

It reads whole tables, classifies them with the format's vectorised helpers (kinds, attr keys;
leaf contiguity from the raw entries, checked with ``oas`` at run ends) and decodes only the
first entry of each run, once per distinct attr key. Consecutive table entries of one table with
equal attributes are walked as one batch: their child tables are concatenated into one
VA-contiguous array (up to 512 tables), so a linear map of 512 pte tables is scanned in one
numpy pass and an open run carries across table boundaries. A batch of a few distinct tables
repeated many times (x86's ESPFIX area) is analysed once per distinct table, and long
stretches of leaf runs are emitted as numpy columns (:class:`RunBlock`).

Garbage never hangs or crashes the walk: a table entry pointing to a table already on its walk
path (itself, an ancestor, a sibling of its parent) is a cycle; a table outside memory, a read
error, a malformed entry (``Format.anomalies``) and an exhausted table budget are recorded as
:class:`Anomaly` values and the walk goes on.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np

from ..formats.base import Attrs, Entry, Format, Kind, combine
from ..memory.base import MemoryError_, PhysMemory
from .runs import HOLE_ATTRS, Anomaly, Run, RunBlock, RunRow, RunTable
from .trace import U64 as _U64
from .trace import check_int as _check_int
from .trace import low_va as _low

__all__ = ["DEFAULT_MAX_TABLES", "Walker", "walk_runs"]

DEFAULT_MAX_TABLES = 1 << 18  # 1 GiB of 4K tables: far more than any real kernel holds
_CHUNK = 512  # tables scanned in one numpy pass (bounds the temporary array: 2 MiB of 4K tables)
_BLOCK_MIN = 16  # table-free stretches of at least this many runs are emitted vectorised
_EMPTY, _TABLE, _LEAF = int(Kind.EMPTY), int(Kind.TABLE), int(Kind.LEAF)


class Walker:
    """Leaf-run iteration over one root (see :mod:`ptlab.walk.walker`).

    ``ignore_ad`` coalesces leaves differing only in accessed/dirty (``Format.ad_mask``); the
    run then reports its first leaf's attrs. ``include_nonpresent`` yields non-present leaves
    (``attrs.present`` False, e.g. an L1TF-inverted secretmem pte) as runs too.
    ``include_holes`` also yields runs for empty entries (kind EMPTY, at the level where the
    walk found them) and for entries it could not follow, so that runs cover the VA range with
    no gaps, as ptdump's note_page sees it. ``check_oa`` reports leaves whose output range
    memory does not hold (off by default: device memory is mapped legitimately).
    ``max_tables`` bounds the number of tables read (last line of defence against garbage).
    """

    def __init__(
        self,
        fmt: Format,
        mem: PhysMemory,
        root: int,
        *,
        ignore_ad: bool = False,
        include_nonpresent: bool = False,
        include_holes: bool = False,
        check_oa: bool = False,
        own_attrs: bool = False,
        max_tables: int = DEFAULT_MAX_TABLES,
    ) -> None:
        self.fmt, self.mem = fmt, mem
        self.root = _check_int("root", root, 0, _U64)
        self.ignore_ad = ignore_ad
        self.include_nonpresent = include_nonpresent
        self.include_holes = include_holes
        self.check_oa = check_oa
        self.own_attrs = own_attrs
        self.max_tables = _check_int("max_tables", max_tables, 1, 1 << 40)
        self.anomalies: list[Anomaly] = []
        self.tables_visited = 0
        self._ad = np.uint64(fmt.ad_mask() if ignore_ad else 0)
        self._out: list[RunRow | RunBlock] = []
        # [va, pa, size, page_size, level, attrs, count, kind, key, own]
        self._open: list | None = None
        self._offset = 0  # canonical VA - low VA in the current range
        self._budget_noted = False
        self._clean_keys: dict[int, set[int]] = {}  # level -> attr keys without anomalies
        self._interned: dict[object, int] = {}  # run comparison key -> small int

    # --- public -------------------------------------------------------------------------------
    def runs(self, start: int | None = None, end: int | None = None) -> Iterator[Run]:
        """Runs in [start, end) (default: every range of ``fmt.va_ranges()``), in VA order.

        The walk happens when runs() is called (the iterator is over a finished table), so
        ``anomalies`` and ``tables_visited`` describe it as soon as runs() returns; they are
        reset per call. Runs are clipped to [start, end) (``count`` = entries touched).
        """
        return iter(self.run_table(start, end))

    def run_table(self, start: int | None = None, end: int | None = None) -> RunTable:
        """Like :meth:`runs`, as a :class:`RunTable` (a sequence; Run objects made on access)."""
        start = 0 if start is None else _check_int("start", start, 0, _U64)
        end = 1 << 64 if end is None else _check_int("end", end, 0, 1 << 64)
        if start >= end:
            raise ValueError(f"empty VA range [{start:#x}, {end:#x})")
        self.anomalies, self.tables_visited, self._budget_noted = [], 0, False
        self._out, self._open = [], None
        collecting = gc.isenabled()
        gc.disable()  # the walk creates many small acyclic tuples: collections would be waste
        try:
            for rs, re_ in self.fmt.va_ranges():
                s, e = max(rs, start), min(re_, end)
                if s >= e:
                    continue
                lo = _low(self.fmt, s)
                self._offset = s - lo
                self._walk([self.root], self.fmt.top_level, 0, lo, lo + (e - s), (),
                           frozenset())
                self._flush()
        finally:
            if collecting:
                gc.enable()
        out, self._out = self._out, []
        return RunTable(out)

    # --- emission -----------------------------------------------------------------------------
    def _flush(self) -> None:
        o = self._open
        if o is not None:
            self._out.append((o[0], o[2], o[1], o[3], o[4], o[5], o[6], o[7], o[9]))
            self._open = None

    def _emit(self, low: int, size: int, pa: int, level: int, attrs: Attrs, count: int,
              kind: Kind, key: object, lo: int, hi: int, own: Attrs | None = None) -> None:
        """Add a segment [low, low+size) (clipped to [lo, hi)), coalescing with the open run."""
        page_size = self.fmt.entry_size(level)
        if low < lo or low + size > hi:
            if low < lo:
                cut = lo - low
                low, size = lo, size - cut
                pa = pa + cut if kind is Kind.LEAF else 0
            size = min(size, hi - low)
            first, last = low // page_size, (low + size - 1) // page_size
            count = last - first + 1  # entries touched by the clipped range
        va = low + self._offset
        o = self._open
        if (o is not None and o[0] + o[2] == va and o[4] == level and o[7] is kind
                and (kind is not Kind.LEAF or o[1] + o[2] == pa) and o[8] == key):
            o[2] += size
            o[6] += count
            return
        self._flush()
        self._open = [va, pa, size, page_size, level, attrs, count, kind, key, own]

    def _hole(self, low: int, count: int, level: int, lo: int, hi: int) -> None:
        if self.include_holes:
            size = count * self.fmt.entry_size(level)
            self._emit(low, size, 0, level, HOLE_ATTRS, count, Kind.EMPTY, None, lo, hi)
        else:
            self._flush()

    def _anomaly(self, low: int, level: int, entry_pa: int, raw: int, reason: str) -> None:
        self.anomalies.append(Anomaly(low + self._offset, level, entry_pa, int(raw), reason))

    # --- walk ---------------------------------------------------------------------------------
    def _walk(self, pas: list[int], level: int, base: int, lo: int, hi: int,
              ctx: tuple[Attrs, ...], ancestors: frozenset[int]) -> None:
        """Walk the VA-consecutive tables ``pas`` at ``level``; the first starts at low VA
        ``base``. Only the part overlapping [lo, hi) is scanned, at most _CHUNK tables at once."""
        fmt = self.fmt
        n = fmt.entries(level)
        tspan = n * fmt.entry_size(level)
        # Skip tables entirely outside [lo, hi).
        j0 = max(0, (lo - base) // tspan)
        j1 = min(len(pas), -(-(hi - base) // tspan))
        group: list[np.ndarray] = []
        gstart = j0
        read: dict[int, np.ndarray] = {}

        def flush(upto: int) -> None:
            if group:
                self._scan(group, pas[gstart:upto], level, base + gstart * tspan, lo, hi, ctx,
                           ancestors)
                group.clear()

        for j in range(j0, j1):
            pa = pas[j]
            if self.tables_visited >= self.max_tables:
                flush(j)
                self._note_budget(base + j * tspan, level, pa)
                self._hole(base + j * tspan, (j1 - j) * n, level, lo, hi)
                return
            self.tables_visited += 1
            try:
                table = read.get(pa)  # one read per distinct table of the batch
                if table is None:
                    table = read[pa] = self.mem.read_table(pa, n)
            except (MemoryError_, ValueError, OSError) as exc:
                flush(j)
                self._anomaly(base + j * tspan, level, pa, 0, f"table at {pa:#x} unreadable: {exc}")
                self._hole(base + j * tspan, n, level, lo, hi)
                gstart = j + 1
                continue
            if not group:
                gstart = j
            group.append(table)
            if len(group) >= _CHUNK:
                flush(j + 1)
        flush(j1)

    def _note_budget(self, low: int, level: int, pa: int) -> None:
        if not self._budget_noted:
            self._budget_noted = True
            self._anomaly(low, level, pa, 0,
                          f"table budget of {self.max_tables} tables exhausted: "
                          "the rest of the walk is skipped")

    def _scan(self, tables: list[np.ndarray], pas: list[int], level: int, base: int, lo: int,
              hi: int, ctx: tuple[Attrs, ...], ancestors: frozenset[int]) -> None:
        fmt = self.fmt
        n = fmt.entries(level)
        esize = fmt.entry_size(level)
        total = len(tables) * n
        i0 = max(0, (lo - base) // esize)
        i1 = min(total, -(-(hi - base) // esize))
        if i0 >= i1:
            return
        runs = None
        if i0 == 0 and i1 == total and len(tables) >= 4:
            runs = self._runs_of_copies(tables, pas, level, esize)
        if runs is None:
            runs = self._runs_of_batch(tables, pas, level, base, esize, i0, i1)
        raws, full_keys, starts, ends, run_kinds, run_keys, run_raws, start_oas = runs
        here = None  # tables a child may not point to: the path so far and this batch
        cache: dict[int, tuple[Entry, Attrs, int]] = {}  # leaf key -> decoded, effective
        offset = self._offset

        def loop(a: int, b: int) -> None:
            """Emit runs a..b-1 one by one (tables, clipping, holes, short stretches)."""
            nonlocal here
            for s, e, kind, key_raw, raw, pa in zip(
                    starts[a:b].tolist(), ends[a:b].tolist(), run_kinds[a:b].tolist(),
                    run_keys[a:b].tolist(), run_raws[a:b].tolist(), start_oas[a:b].tolist(),
                    strict=True):
                low = base + (i0 + s) * esize
                if kind == _LEAF:
                    hit = cache.get(key_raw)
                    if hit is None:  # equal attr keys decode to equal Attrs: decode once per key
                        hit = cache[key_raw] = self._decode_leaf(raw, level, ctx)
                    entry, attrs, cmp = hit
                    if entry.kind is not Kind.LEAF:  # the format's kinds() and decode() disagree
                        gi = i0 + s
                        self._anomaly(low, level, pas[gi // n] + (gi % n) * 8, raw,
                                      f"kinds() says leaf, decode() says {entry.kind.name}")
                        self._hole(low, e - s, level, lo, hi)
                        continue
                    if not entry.attrs.present and not self.include_nonpresent:
                        self._hole(low, e - s, level, lo, hi)
                        continue
                    count = e - s
                    size = count * esize
                    if self.check_oa and entry.attrs.present and not self.mem.contains(pa, size):
                        gi = i0 + s
                        self._anomaly(low, level, pas[gi // n] + (gi % n) * 8, raw,
                                      f"leaf output range {pa:#x}+{size:#x} outside memory")
                    if lo <= low and low + size <= hi:  # not clipped: the common case, inlined
                        o = self._open
                        if o is not None:
                            if (o[8] == cmp and o[0] + o[2] == low + offset
                                    and o[1] + o[2] == pa and o[4] == level
                                    and o[7] is Kind.LEAF):
                                o[2] += size  # extends the open run
                                o[6] += count
                                continue
                            self._out.append((o[0], o[2], o[1], o[3], o[4], o[5], o[6], o[7],
                                              o[9]))
                        self._open = [low + offset, pa, size, esize, level, attrs, count,
                                      Kind.LEAF, cmp, entry.attrs if self.own_attrs else None]
                        continue
                    self._emit(low, size, pa, level, attrs, count, Kind.LEAF, cmp, lo, hi,
                               entry.attrs if self.own_attrs else None)
                elif kind == _EMPTY:
                    self._hole(low, e - s, level, lo, hi)
                else:
                    if here is None:
                        here = ancestors | frozenset(pas)
                    self._tables(raws, s, e, level, low, esize, ctx, here, pas, lo, hi, i0,
                                 base, full_keys)

        nruns = starts.size
        vector = (not self.include_holes and not self.check_oa and nruns >= _BLOCK_MIN
                  and lo <= base + i0 * esize and base + i1 * esize <= hi)
        if not vector:
            loop(0, nruns)
            return
        prev = 0
        for t in [*np.flatnonzero(run_kinds == _TABLE).tolist(), nruns]:
            if t - prev < _BLOCK_MIN or not self._emit_block(
                    starts[prev:t], ends[prev:t], run_kinds[prev:t], run_keys[prev:t],
                    start_oas[prev:t], run_raws[prev:t], level, ctx, base + i0 * esize, esize,
                    cache):
                loop(prev, t)
            loop(t, t + 1)  # the table run (nothing past the end)
            prev = t + 1

    def _runs_of_batch(self, tables: list[np.ndarray], pas: list[int], level: int, base: int,
                       esize: int, i0: int, i1: int) -> tuple:
        """Runs of entries i0..i1-1 of the concatenated ``tables``, their anomalies recorded:
        (raws, attr keys, run starts, run ends, and the kinds, keys, raws and output addresses
        of the entries at the run starts)."""
        fmt = self.fmt
        raws_all = tables[0] if len(tables) == 1 else np.concatenate(tables)
        raws = np.asarray(raws_all[i0:i1], dtype=np.uint64)
        m = raws.size
        kinds = np.asarray(fmt.kinds(raws, level), dtype=np.uint8)
        keys = full_keys = np.asarray(fmt.attr_keys(raws, level), dtype=np.uint64)
        if self._ad:
            keys = keys & ~self._ad
        starts, oas = self._runs_of(raws, kinds, keys, level, esize)
        # fmt.anomalies() checks the first entry of every run and every non-zero empty entry:
        # within a leaf run raws step exactly by the entry size, so the run's other entries
        # hold the same bits; table runs are checked entry by entry in _tables(). Entries made
        # of output-address and key bits only, whose key was found clean before, are clean.
        check = starts[kinds[starts] != _EMPTY]
        odd = (kinds == _EMPTY) & (raws != 0)
        if oas is not None and m > 1:  # slow path: runs joined by output address only
            d, do = raws[1:] - raws[:-1], oas[1:] - oas[:-1]
            odd[1:] |= (kinds[1:] == _LEAF) & (d != do) & (d != np.uint64(0) - do)
        if odd.any():
            check = np.union1d(check, np.flatnonzero(odd))
        self._check(raws, check, full_keys, level, pas, i0, base, esize,
                    oas[check] if oas is not None else None)
        start_oas = oas[starts] if oas is not None else fmt.oas(raws[starts], level)
        return (raws, full_keys, starts, np.append(starts[1:], m), kinds[starts],
                full_keys[starts], raws[starts], start_oas)

    def _runs_of_copies(self, tables: list[np.ndarray], pas: list[int], level: int,
                        esize: int) -> tuple | None:
        """:meth:`_runs_of_batch` for a batch made of a few distinct tables repeated (x86's
        ESPFIX area maps one pte table from thousands of pmd entries): each distinct table
        is analysed once and the batch's runs assembled from its runs, joined across table
        boundaries. None (use the direct analysis) if not worth it, or if a distinct table
        holds table entries or anything the anomaly check reports."""
        index: dict[int, int] = {}
        which = [index.setdefault(pa, len(index)) for pa in pas]
        if len(index) * 4 > len(pas):
            return None
        fmt = self.fmt
        n = fmt.entries(level)
        distinct: list[np.ndarray | None] = [None] * len(index)
        for table, u in zip(tables, which, strict=True):
            if distinct[u] is None:
                distinct[u] = table
        parts, edges = [], []
        for pa, u in index.items():
            raws = np.asarray(distinct[u], dtype=np.uint64)
            kinds = np.asarray(fmt.kinds(raws, level), dtype=np.uint8)
            if (kinds == _TABLE).any():
                return None
            fkeys = np.asarray(fmt.attr_keys(raws, level), dtype=np.uint64)
            keys = fkeys & ~self._ad if self._ad else fkeys
            starts, oas = self._runs_of(raws, kinds, keys, level, esize)
            if oas is not None:
                return None
            check = np.union1d(starts[kinds[starts] != _EMPTY],
                               np.flatnonzero((kinds == _EMPTY) & (raws != 0)))
            mark = len(self.anomalies)
            self._check(raws, check, fkeys, level, [pa], 0, 0, esize)
            if len(self.anomalies) > mark:  # the direct analysis reports it at every copy
                del self.anomalies[mark:]
                return None
            parts.append((starts, kinds[starts], fkeys[starts], raws[starts],
                          fmt.oas(raws[starts], level)))
            first_last = fmt.oas(raws[[0, n - 1]], level).tolist()
            edges.append(((int(kinds[0]), int(keys[0]), first_last[0]),
                          (int(kinds[-1]), int(keys[-1]), first_last[1])))
        # the batch's run list: every table's runs, in table order, shifted to its position
        w = np.array(which, dtype=np.intp)
        sizes = np.array([p[0].size for p in parts], dtype=np.intp)
        count = sizes[w]
        first = np.concatenate(([0], np.cumsum(count)[:-1]))  # first run of each table
        at = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # of each distinct table in ``cat``
        flat = np.arange(int(count.sum()), dtype=np.intp) + np.repeat(at[w] - first, count)
        cat = [np.concatenate([p[f] for p in parts])[flat] for f in range(5)]
        cat[0] = cat[0] + np.repeat(np.arange(len(pas), dtype=np.intp) * n, count)
        # a table's first run continues the previous table's last run when the direct
        # analysis would have joined them: same kind and, for leaves, equal keys and
        # contiguous output addresses
        joins: dict[tuple[int, int], bool] = {}
        keep = np.ones(flat.size, dtype=bool)
        for j in range(1, len(pas)):
            pair = (which[j - 1], which[j])
            join = joins.get(pair)
            if join is None:
                (kl, keyl, oal), (kf, keyf, oaf) = edges[pair[0]][1], edges[pair[1]][0]
                join = joins[pair] = kl == kf and (kl == _EMPTY or (
                    kl == _LEAF and keyl == keyf and oaf == oal + esize))
            if join:
                keep[first[j]] = False
        starts, run_kinds, run_keys, run_raws, start_oas = (c[keep] for c in cat)
        return (None, None, starts, np.append(starts[1:], len(pas) * n), run_kinds, run_keys,
                run_raws, start_oas)

    def _emit_block(self, starts: np.ndarray, ends: np.ndarray, kinds: np.ndarray,
                    keys: np.ndarray, oas: np.ndarray, raws: np.ndarray, level: int,
                    ctx: tuple[Attrs, ...], base: int, esize: int,
                    cache: dict[int, tuple[Entry, Attrs, int]]) -> bool:
        """Emit a stretch of leaf and empty runs (no tables, nothing clipped, no holes wanted)
        with numpy, with exactly the per-run loop's result. ``starts``/``ends`` are entry
        indices from low VA ``base``; ``raws`` holds each run's first entry. False (nothing
        emitted) if a leaf key does not decode to a leaf: the per-run loop reports that."""
        leaf_runs = np.flatnonzero(kinds == _LEAF)
        ukeys, first, inv = np.unique(keys[leaf_runs], return_index=True, return_inverse=True)
        nk = ukeys.size
        shown = np.zeros(nk, dtype=bool)
        cmp_k = np.zeros(nk, dtype=np.int64)
        attrs_k = np.empty(nk, dtype=object)
        own_k = np.empty(nk, dtype=object)
        for j, (key, f) in enumerate(zip(ukeys.tolist(), first.tolist(), strict=True)):
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = self._decode_leaf(int(raws[leaf_runs[f]]), level, ctx)
            entry, attrs, cmp = hit
            if entry.kind is not Kind.LEAF:
                return False
            shown[j] = entry.attrs.present or self.include_nonpresent
            cmp_k[j], attrs_k[j] = cmp, attrs
            own_k[j] = entry.attrs if self.own_attrs else None
        key_of = np.full(kinds.size, -1, dtype=np.int64)
        key_of[leaf_runs] = inv.reshape(-1)
        ei = leaf_runs[shown[inv.reshape(-1)]]  # the runs that are emitted
        if not ei.size:
            self._flush()
            return True
        count = ends[ei] - starts[ei]
        size = count * esize
        pa = oas[ei].astype(np.uint64)
        va = (starts[ei] * esize + base).astype(np.uint64) + np.uint64(self._offset)
        cmp = cmp_k[key_of[ei]]
        join = ((ei[1:] == ei[:-1] + 1) & (pa[1:] == pa[:-1] + size[:-1].astype(np.uint64))
                & (cmp[1:] == cmp[:-1]))
        heads = np.flatnonzero(np.concatenate(([True], ~join)))
        g_size = np.add.reduceat(size, heads)
        g_count = np.add.reduceat(count, heads)
        g_key = key_of[ei[heads]]
        g_va, g_pa, g_cmp = va[heads], pa[heads], cmp[heads]
        ng = len(heads)

        def group(k: int) -> list:  # one group as an open run
            return [int(g_va[k]), int(g_pa[k]), int(g_size[k]), esize, level,
                    attrs_k[g_key[k]], int(g_count[k]), Kind.LEAF, int(g_cmp[k]),
                    own_k[g_key[k]]]

        o, first_g = self._open, 0
        head = group(0)
        if (o is not None and ei[0] == 0 and o[8] == head[8] and o[0] + o[2] == head[0]
                and o[1] + o[2] == head[1] and o[4] == level and o[7] is Kind.LEAF):
            o[2] += head[2]  # the first group extends the open run
            o[6] += head[6]
            first_g = 1
            if ng > 1:
                self._flush()
        else:
            self._flush()
        keep_open = ei[-1] == kinds.size - 1  # ends in a shown leaf: a later one may join it
        last = ng - 1 if keep_open else ng
        if last - first_g > 8:
            k = slice(first_g, last)
            self._out.append(RunBlock(g_va[k], g_size[k], g_pa[k], esize, level,
                                      attrs_k[g_key[k]], g_count[k], own_k[g_key[k]]))
        else:
            for j in range(first_g, last):
                o = group(j)
                self._out.append((o[0], o[2], o[1], o[3], o[4], o[5], o[6], o[7], o[9]))
        if not keep_open:
            self._flush()
        elif ng - 1 >= first_g:
            self._open = group(ng - 1)
        return True

    def _runs_of(self, raws: np.ndarray, kinds: np.ndarray, keys: np.ndarray, level: int,
                 esize: int) -> tuple[np.ndarray, np.ndarray | None]:
        """First index of each run of one table batch: equal kind, and for tables equal keys,
        for leaves equal keys and output addresses stepping by ``esize``.

        Fast path: leaf contiguity is read from the raw entries (a step of +-esize, the L1TF
        inverted ones stepping down), then verified with ``fmt.oas`` at run ends and at
        equal-key leaf boundaries only; if that finds a mismatch (an output address that is not
        one linear field, garbage), the output addresses of the whole batch decide. Returns
        the starts and, when computed, the batch's output addresses."""
        m = raws.size
        fmt = self.fmt
        brk = np.ones(m, dtype=bool)
        if m == 1:
            return np.zeros(1, dtype=np.intp), None
        k1, k0 = kinds[1:], kinds[:-1]
        eqkey = keys[1:] == keys[:-1]
        d = raws[1:] - raws[:-1]
        step = (d == np.uint64(esize)) | (d == np.uint64((1 << 64) - esize))
        leaf = k1 == _LEAF
        brk[1:] = ~((k1 == k0) & ((k1 == _EMPTY) | (eqkey & ((k1 == _TABLE) | step))))
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], m)
        long = np.flatnonzero((kinds[starts] == _LEAF) & (ends - starts > 1))
        ok = True
        if long.size:
            first = fmt.oas(raws[starts[long]], level)
            last = fmt.oas(raws[ends[long] - 1], level)
            want = (ends[long] - starts[long] - 1).astype(np.uint64) * np.uint64(esize)
            ok = bool(np.array_equal(last - first, want))
        if ok:  # equal-key leaf neighbours split by the raw test must really be discontiguous
            p = np.flatnonzero(brk[1:] & leaf & (k0 == _LEAF) & eqkey & ~step)
            if p.size:
                ok = not np.any(fmt.oas(raws[p + 1], level)
                                == fmt.oas(raws[p], level) + np.uint64(esize))
        if ok:
            return starts, None
        oas = np.asarray(fmt.oas(raws, level), dtype=np.uint64)
        contig = oas[1:] == oas[:-1] + np.uint64(esize)
        brk[1:] = ~((k1 == k0) & ((k1 == _EMPTY) | (eqkey & ((k1 == _TABLE) | contig))))
        return np.flatnonzero(brk), oas

    def _check(self, raws: np.ndarray, idx: np.ndarray, keys: np.ndarray, level: int,
               pas: list[int], i0: int, base: int, esize: int,
               oas: np.ndarray | None = None) -> None:
        """Record fmt.anomalies() of the entries at ``idx`` (indices into ``raws``)."""
        if not idx.size:
            return
        fmt = self.fmt
        n = fmt.entries(level)
        sel = raws[idx]
        sel_oas = oas if oas is not None else fmt.oas(sel, level)
        sel_keys = keys[idx]
        plain = sel == (sel_oas | sel_keys)
        known = self._clean_keys.setdefault(level, set())
        if plain.any():  # a plain entry is clean iff its key is: check one entry per new key
            pk, pi = np.unique(sel_keys[plain], return_index=True)
            praw = sel[plain][pi]
            for key, raw in zip(pk.tolist(), praw.tolist(), strict=True):
                if key not in known and not fmt.anomalies(raw, level):
                    known.add(key)
            if known:
                clean = plain & np.isin(sel_keys, np.fromiter(known, np.uint64, len(known)))
                rest = ~clean
                idx, sel, sel_keys = idx[rest], sel[rest], sel_keys[rest]
        for i, raw in zip(idx.tolist(), sel.tolist(), strict=True):
            reasons = fmt.anomalies(raw, level)
            if not reasons:
                continue
            gi = i0 + i
            entry_pa = pas[gi // n] + (gi % n) * 8
            for reason in reasons:
                self._anomaly(base + gi * esize, level, entry_pa, raw, reason)

    def _decode_leaf(self, raw: int, level: int,
                     ctx: tuple[Attrs, ...]) -> tuple[Entry, Attrs, int]:
        """(entry, effective attrs, comparison id) of a leaf reached through ``ctx``; equal
        ids <=> runs may coalesce (equal effective attrs, and own attrs with own_attrs)."""
        entry = self.fmt.decode(raw, level)
        attrs = combine(ctx, entry.attrs) if ctx else entry.attrs
        cmp: object = attrs.with_(accessed=False, dirty=False) if self.ignore_ad else attrs
        if self.own_attrs:
            own = entry.attrs
            cmp = (cmp, own.with_(accessed=False, dirty=False) if self.ignore_ad else own)
        return entry, attrs, self._interned.setdefault(cmp, len(self._interned))

    def _tables(self, raws: np.ndarray, s: int, e: int, level: int, low: int, esize: int,
                ctx: tuple[Attrs, ...], here: frozenset[int], pas: list[int], lo: int, hi: int,
                i0: int, base: int, keys: np.ndarray) -> None:
        fmt = self.fmt
        n = fmt.entries(level)
        children = np.asarray(fmt.oas(raws[s:e], level), dtype=np.uint64)
        # entries whose bits beyond the table address differ from the first's: check each
        rest = raws[s:e] - children
        odd = np.flatnonzero(rest[1:] != rest[0]) + (s + 1)
        self._check(raws, odd, keys, level, pas, i0, base, esize, children[odd - s])
        entry = fmt.decode(int(raws[s]), level)
        if level == 0 or entry.kind is not Kind.TABLE or not entry.attrs.present:
            # fmt.anomalies() has said why (non-present table entry, table bit at pte level).
            self._hole(low, e - s, level, lo, hi)
            return
        child_n = fmt.entries(level - 1) * 8
        child_ctx = (*ctx, entry.attrs)
        cycle = np.isin(children, np.fromiter(here, dtype=np.uint64, count=len(here)))
        away = [c for c in np.unique(children[~cycle]).tolist()
                if not self.mem.contains(c, child_n)]
        outside = np.isin(children, np.array(away, dtype=np.uint64))
        bad = np.flatnonzero(cycle | outside).tolist()
        prev = 0
        for b in [*bad, e - s]:
            if b > prev:  # children prev..b-1 are followed as one batch
                self._walk(children[prev:b].tolist(), level - 1, low + prev * esize, lo, hi,
                           child_ctx, here)
            if b == e - s:
                break
            gi = i0 + s + b
            child = int(children[b])
            what = "is already on the walk path (cycle)" if cycle[b] else "is outside memory"
            self._anomaly(low + b * esize, level, pas[gi // n] + (gi % n) * 8,
                          int(raws[s + b]), f"table at {child:#x} {what}: not followed")
            self._hole(low + b * esize, 1, level, lo, hi)
            prev = b + 1


def walk_runs(fmt: Format, mem: PhysMemory, root: int, start: int | None = None,
              end: int | None = None, **kw: object) -> tuple[list[Run], list[Anomaly]]:
    """All runs of ``root`` in [start, end) and the anomalies met (see :class:`Walker`)."""
    walker = Walker(fmt, mem, root, **kw)  # type: ignore[arg-type]
    runs = list(walker.runs(start, end))
    return runs, walker.anomalies

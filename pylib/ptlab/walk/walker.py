"""Leaf-run iteration over one root: :class:`Walker`, what ptdump prints (mm/ptdump.c,
arch/x86/mm/dump_pagetables.c).

It reads whole tables, classifies them with the format's vectorised helpers (kinds, attr keys;
leaf contiguity from the raw entries, checked with ``oas`` at run ends) and decodes only the
first entry of each run, once per distinct attr key. Consecutive table entries of one table with
equal attributes are walked as one batch (a :class:`Batch`, the walker's cursor): their child
tables are concatenated into one VA-contiguous array (up to 512 tables), so a linear map of 512
pte tables is scanned in one numpy pass and an open run carries across table boundaries. A batch
of a few distinct tables repeated many times (x86's ESPFIX area) is analysed once per distinct
table, a batch equal to one walked earlier in the same walk (x86's ESPFIX pmd copies) replays
that walk's output at its own VA, and long stretches of leaf runs are emitted as numpy columns
(:class:`RunBlock`). Every
path decides whether something continues a run with one rule, :func:`.runs.continues`.

Garbage never hangs or crashes the walk: a table entry pointing to a table already on its walk
path (itself, an ancestor, a sibling of its parent) is a cycle; a table outside memory, a read
error, a malformed entry (``Format.anomalies``) and an exhausted budget are recorded as
:class:`Anomaly` values and the walk goes on. The budget bounds the work and the memory of a
walk whatever the memory holds: ``max_tables`` table reads, ``max_work`` work units
and ``max_anomalies`` anomalies kept (the rest are counted in ``anomaly_count``); work units
are about the cost of scanning one entry with numpy (:data:`RUN`, :data:`ONE_BY_ONE`,
:data:`CHECK`, :data:`DECODE`, :data:`FOLLOW` and :data:`SCAN` for the costlier steps).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ..formats.base import Attrs, Entry, Format, Kind, combine
from ..memory.base import MemoryError_, PhysMemory
from .batch import Batch, Runs
from .cursor import geometry
from .runs import HOLE_ATTRS, Anomaly, Run, RunBlock, RunRow, RunTable, continues
from .trace import U64 as _U64
from .trace import check_int as _check_int
from .trace import low_va as _low

__all__ = [
    "CHECK", "DECODE", "DEFAULT_MAX_ANOMALIES", "DEFAULT_MAX_TABLES", "DEFAULT_MAX_WORK",
    "FOLLOW", "ONE_BY_ONE", "RUN", "SCAN", "Batch", "Runs", "Walker", "continues", "walk_runs",
]

DEFAULT_MAX_TABLES = 1 << 18  # 1 GiB of 4K tables: far more than any real kernel holds
# Work units: about the cost of scanning one entry with numpy (10-50 ns on a 2020s core). A real
# kernel half costs ~3.4 M (x86 with ESPFIX's aliases) or ~0.4 M (arm64); the costliest garbage
# found (small tables of random entries and pointers) spends 2**24 in ~0.8 s.
DEFAULT_MAX_WORK = 1 << 24
DEFAULT_MAX_ANOMALIES = 10_000
RUN = 16  # a run found by a scan (and its memory); a child table's address checked
ONE_BY_ONE = 32  # an entry or run handled one by one in Python (per-run loop, anomaly check)
CHECK = 64  # an entry checked by Format.anomalies()
FOLLOW = 2048  # a run of table entries followed (the pass over its children)
SCAN = 4096  # a batch scanned (numpy's fixed costs)
DECODE = 512  # a leaf's attr key decoded into effective Attrs
_SMALL = 32  # children checked with Python sets up to this many
_CLEAN_KEYS = 4096  # attr keys remembered clean per level before the memo is dropped
_CHUNK = 512  # tables scanned in one numpy pass (bounds the temporary array: 2 MiB of 4K tables)
_BLOCK_MIN = 16  # table-free stretches of at least this many runs are emitted vectorised
_EMPTY, _TABLE, _LEAF = int(Kind.EMPTY), int(Kind.TABLE), int(Kind.LEAF)
_KINDS = np.array(list(Kind), dtype=object)  # kind number -> Kind
_REPLAY_MIN = 64  # batches of at least this many tables are remembered for replay


class _Walked(NamedTuple):
    """What walking one batch emitted: its first VA, the output items, the run left open,
    and the work units and tables it cost."""

    va: int
    out: list
    open: tuple | None
    work: int
    tables: int


class Walker:
    """Leaf-run iteration over one root (see :mod:`ptlab.walk.walker`).

    ``ignore_ad`` coalesces leaves differing only in accessed/dirty (``Format.ad_mask``); the
    run then reports its first leaf's attrs. ``include_nonpresent`` yields non-present leaves
    (``attrs.present`` False, e.g. an L1TF-inverted secretmem pte) as runs too.
    ``include_holes`` also yields runs for empty entries (kind EMPTY, at the level where the
    walk found them) and for entries it could not follow, so that runs cover the VA range with
    no gaps, as ptdump's note_page sees it. ``check_oa`` reports leaves whose output range
    memory does not hold (off by default: device memory is mapped legitimately).

    The budget (last line of defence against garbage): ``max_tables`` tables read and
    ``max_work`` work units, about 1 s at the default: each entry of each table read costs
    one, each batch scanned :data:`SCAN`, each run found :data:`RUN`, each run of the per-run
    loop :data:`ONE_BY_ONE`, each run of table entries followed :data:`FOLLOW` and one per
    entry, each entry checked by ``Format.anomalies`` :data:`CHECK`, each leaf key decoded
    :data:`DECODE`. When it runs out, one anomaly says so and the rest of the walk is skipped
    (a hole). The first ``max_anomalies`` anomalies are kept (and the budget's);
    ``anomaly_count`` counts all.
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
        max_work: int = DEFAULT_MAX_WORK,
        max_anomalies: int = DEFAULT_MAX_ANOMALIES,
    ) -> None:
        self.fmt, self.mem, self.geo = fmt, mem, geometry(fmt)
        self.root = _check_int("root", root, 0, _U64)
        self.ignore_ad = ignore_ad
        self.include_nonpresent = include_nonpresent
        self.include_holes = include_holes
        self.check_oa = check_oa
        self.own_attrs = own_attrs
        self.max_tables = _check_int("max_tables", max_tables, 1, 1 << 40)
        self.max_work = _check_int("max_work", max_work, 1, 1 << 62)
        self.max_anomalies = _check_int("max_anomalies", max_anomalies, 0, 1 << 40)
        self.anomalies: list[Anomaly] = []
        self.anomaly_count = 0
        self.tables_visited = 0
        self._left = self.max_work  # work units left
        self._exhausted = False
        self._ad = np.uint64(fmt.ad_mask() if ignore_ad else 0)
        self._out: list[RunRow | RunBlock] = []
        # [va, pa, size, page_size, level, attrs, count, kind, key, own]
        self._open: list | None = None
        self._offset = 0  # canonical VA - low VA in the current range
        self._clean_keys: dict[int, set[int]] = {}  # level -> attr keys without anomalies
        self._interned: dict[object, int] = {}  # run comparison key -> small int
        # _runs_of_copies results of this walk by (level, tables), and the output of batches
        # walked (see _walk): x86's ESPFIX area walks the same 512 copies of one pte table
        # once per copy of its pmd table
        self._copies: dict[tuple[int, tuple[int, ...]], tuple | None] = {}
        self._walked: dict[tuple, _Walked] = {}
        self._once = 0  # work units spent on what a walk does once (see _walk)
        self._decoded: dict[tuple, tuple[Entry, Attrs, int]] = {}  # see _decode_leaf

    # --- public -------------------------------------------------------------------------------
    @property
    def work(self) -> int:
        """Work units the last walk spent (see ``max_work``)."""
        return self.max_work - self._left

    @property
    def complete(self) -> bool:
        """Whether the last walk covered its whole range (no budget ran out)."""
        return not self._exhausted

    @property
    def anomalies_dropped(self) -> int:
        """Anomalies the last walk found beyond ``max_anomalies`` (counted, not kept)."""
        return self.anomaly_count - len(self.anomalies)

    def runs(self, start: int | None = None, end: int | None = None) -> Iterator[Run]:
        """Runs in [start, end) (default: every range of ``fmt.va_ranges()``), in VA order.

        The walk happens when runs() is called (the iterator is over a finished table), so
        ``anomalies``, ``anomaly_count``, ``tables_visited`` and ``work`` describe it as soon
        as runs() returns; they are reset per call. Runs are clipped to [start, end) (``count``
        = entries touched).
        """
        return iter(self.run_table(start, end))

    def run_table(self, start: int | None = None, end: int | None = None) -> RunTable:
        """Like :meth:`runs`, as a :class:`RunTable` (a sequence; Run objects made on access)."""
        start = 0 if start is None else _check_int("start", start, 0, _U64)
        end = 1 << 64 if end is None else _check_int("end", end, 0, 1 << 64)
        if start >= end:
            raise ValueError(f"empty VA range [{start:#x}, {end:#x})")
        self.anomalies, self.anomaly_count, self.tables_visited = [], 0, 0
        self._left, self._exhausted = self.max_work, False
        self._out, self._open = [], None
        self._copies, self._walked, self._decoded = {}, {}, {}
        collecting = gc.isenabled()
        gc.disable()  # the walk creates many small acyclic tuples: collections would be waste
        try:
            for rs, re_ in self.fmt.va_ranges():
                s, e = max(rs, start), min(re_, end)
                if s >= e:
                    continue
                lo = _low(self.fmt, s)
                self._offset = s - lo
                self._walk(Batch(self.geo, self.mem, self.geo.top, [self.root], 0, lo,
                                 lo + (e - s), (), frozenset()))
                self._flush()
        finally:
            if collecting:
                gc.enable()
        out, self._out = self._out, []
        self._copies, self._walked, self._decoded = {}, {}, {}
        return RunTable(out)

    # --- emission -----------------------------------------------------------------------------
    def _flush(self) -> None:
        o = self._open
        if o is not None:
            self._out.append((o[0], o[2], o[1], o[3], o[4], o[5], o[6], o[7], o[9]))
            self._open = None

    def _add(self, va: int, pa: int, size: int, page_size: int, level: int, attrs: Attrs,
             count: int, kind: Kind, key: object, own: Attrs | None) -> None:
        """Add the segment [va, va+size) (canonical VA): it extends the open run if it
        :func:`continues` it, else the open run is done and the segment opens the next."""
        o = self._open
        if o is not None:
            if continues(o[7], o[8], kind, key, o[0] + o[2] == va and o[4] == level,
                         o[1] + o[2] == pa):
                o[2] += size
                o[6] += count
                return
            self._out.append((o[0], o[2], o[1], o[3], o[4], o[5], o[6], o[7], o[9]))
        self._open = [va, pa, size, page_size, level, attrs, count, kind, key, own]

    def _emit(self, b: Batch, i: int, count: int, pa: int, attrs: Attrs, kind: Kind,
              key: object, own: Attrs | None = None) -> None:
        """Add batch entries [i, i+count) as one segment, clipped to the batch's range
        (``count`` then = entries touched); nothing if that leaves no entry."""
        if count <= 0:
            return
        low, high = b.span(i, i + count)
        if low < b.start or high > b.end:
            lo, high = max(low, b.start), min(high, b.end)
            if high <= lo:
                return
            pa = pa + lo - low if kind is Kind.LEAF else 0
            count = min(i + count, b.end_index) - max(i, b.index)
            low = lo
        self._add(low + self._offset, pa, high - low, b.entry_size, b.level, attrs, count, kind,
                  key, own)

    def _hole(self, b: Batch, i: int, count: int) -> None:
        if self.include_holes:
            self._emit(b, i, count, 0, HOLE_ATTRS, Kind.EMPTY, None)
        else:
            self._flush()

    # --- budget and anomalies -----------------------------------------------------------------
    def _anomaly(self, b: Batch, i: int, raw: int, reason: str) -> None:
        """Record an anomaly at batch entry ``i`` (kept while fewer than max_anomalies)."""
        self.anomaly_count += 1
        if len(self.anomalies) < self.max_anomalies:
            self.anomalies.append(Anomaly(b.va(i) + self._offset, b.level, b.entry_pa(i),
                                          int(raw), reason))

    def _spend(self, units: int, b: Batch, i: int) -> bool:
        """Take ``units`` of work; False (and, the first time, an anomaly at batch entry
        ``i``, always kept) if the budget does not hold them: the walk stops."""
        if units <= self._left and not self._exhausted:
            self._left -= units
            return True
        self._stop(b, i, f"work budget of {self.max_work} units exhausted")
        return False

    def _stop(self, b: Batch, i: int, what: str) -> None:
        if not self._exhausted:
            self._exhausted = True
            self.anomaly_count += 1
            self.anomalies.append(Anomaly(b.va(i) + self._offset, b.level, b.entry_pa(i), 0,
                                          f"{what}: the rest of the walk is skipped"))

    # --- walk ---------------------------------------------------------------------------------
    def _walk(self, b: Batch) -> None:
        """Walk batch ``b``; a batch of many tables equal to one walked before (same level,
        tables, attrs above, walk path and range within them), entered with no run open, is
        not walked again: the first walk's output is replayed at the new VA. A batch of more
        than _CHUNK tables is walked as batches of _CHUNK."""
        if len(b.tables) > _CHUNK:
            j0, j1 = b.table_span()
            for j in range(j0, j1, _CHUNK):
                self._walk(b.sub(j, min(j + _CHUNK, j1)))
            return
        if len(b.tables) < _REPLAY_MIN or self._open is not None:
            self._walk_tables(b)
            return
        key = (b.level, tuple(b.tables), b.ctx, b.path, b.start - b.base, b.end - b.base)
        hit = self._walked.get(key)
        va = b.base + self._offset
        if hit is not None and self._replay(hit, va):
            return
        n0, found0 = len(self._out), self.anomaly_count
        left0, tables0, once0 = self._left, self.tables_visited, self._once
        self._walk_tables(b)
        if self.anomaly_count == found0 and not self._exhausted:
            # a replay costs what walking the batch again would: without the checks done once
            # (attr keys found clean, the copies' analysis), so budgets end where a rescan's do
            work = left0 - self._left - (self._once - once0)
            self._walked[key] = _Walked(va, self._out[n0:], None if self._open is None else
                                        tuple(self._open), work, self.tables_visited - tables0)

    def _replay(self, w: _Walked, va: int) -> bool:
        """Emit what walk ``w`` emitted, moved to ``va``; False if the budget does not hold
        the work it cost."""
        if w.work > self._left or self.tables_visited + w.tables > self.max_tables:
            return False
        self._left -= w.work
        self.tables_visited += w.tables
        d = va - w.va
        du = np.uint64(d % (1 << 64))
        for item in w.out:
            if isinstance(item, RunBlock):
                self._out.append(RunBlock(item.va + du, item.size, item.pa, item.page_size,
                                          item.level, item.attrs, item.count, item.own,
                                          item.kind))
            else:
                self._out.append((item[0] + d, *item[1:]))
        if w.open is not None:
            self._open = [w.open[0] + d, *w.open[1:]]
        return True

    def _walk_tables(self, b: Batch) -> None:
        """Walk the tables of batch ``b`` that its range touches, at most _CHUNK at once."""
        n = b.n
        j, j1 = b.table_span()
        while j < j1:
            # one read per distinct table of the chunk (not of the batch: memory stays bounded
            # by _CHUNK tables however many tables the batch has)
            read: dict[int, np.ndarray] = {}
            k = min(j1, j + _CHUNK, j + self._left // n, j + self.max_tables - self.tables_visited)
            if k <= j or self._exhausted:  # the budget does not hold table j
                i = b.table_entry(j)
                if self.tables_visited >= self.max_tables:
                    self._stop(b, i, f"table budget of {self.max_tables} tables exhausted")
                self._spend(n, b, i)
                self._hole(b, i, b.table_entry(j1) - i)
                return
            self._left -= (k - j) * n  # tables j..k-1, paid at once
            self.tables_visited += k - j
            group: list[np.ndarray] = []
            gstart = j
            for t in range(j, k):
                pa = b.tables[t]
                table = read.get(pa)
                if table is None:
                    try:
                        table = read[pa] = self.mem.read_table(pa, n)
                    except (MemoryError_, ValueError, OSError) as exc:
                        if group:
                            self._scan(b.sub(gstart, t), group)
                            group = []
                        i = b.table_entry(t)
                        self._anomaly(b, i, 0, f"table at {pa:#x} unreadable: {exc}")
                        self._hole(b, i, n)
                        gstart = t + 1
                        continue
                group.append(table)
            if group:
                self._scan(b.sub(gstart, k), group)
            j = k

    def _scan(self, b: Batch, tables: list[np.ndarray]) -> None:
        """Emit the runs of batch ``b``, whose tables are ``tables``."""
        i0, i1 = b.index, b.end_index
        if i0 >= i1:
            return
        level, esize = b.level, b.entry_size
        runs = None
        if i0 == 0 and i1 == b.table_entry(len(tables)) and len(tables) >= 4:
            key = (level, tuple(b.tables))
            if key in self._copies:
                runs = self._copies[key]
            else:
                runs = self._copies[key] = self._runs_of_copies(b, tables)
        if runs is None:
            runs = self._runs_of_batch(b, tables)
        raws, full_keys, rs = runs
        if not self._spend(SCAN + rs.starts.size * RUN, b, i0):
            self._hole(b, i0, i1 - i0)
            return
        cache: dict[int, tuple[Entry, Attrs, int]] = {}  # leaf key -> decoded, effective

        def loop(a: int, z: int) -> bool:
            """Emit runs a..z-1 one by one (tables, clipping, holes, short stretches); False
            if the budget ran out (the rest of the batch is then a hole)."""
            paid = 0 if self._exhausted else min(z - a, self._left // ONE_BY_ONE)
            self._left -= paid * ONE_BY_ONE  # the runs the budget holds, paid at once
            for s, e, kind, key_raw, raw, pa in zip(*(c.tolist() for c in rs.part(a, a + paid)),
                                                    strict=True):
                i = i0 + s
                if kind == _LEAF:
                    hit = cache.get(key_raw)
                    if hit is None:  # equal attr keys decode to equal Attrs: decode once per key
                        if not self._spend(DECODE, b, i):
                            self._hole(b, i, i1 - i)
                            return False
                        hit = cache[key_raw] = self._decode_leaf(raw, level, b.ctx, key_raw)
                    entry, attrs, cmp = hit
                    if entry.kind is not Kind.LEAF:  # the format's kinds() and decode() disagree
                        self._anomaly(b, i, raw, f"kinds() says leaf, decode() says "
                                      f"{entry.kind.name}")
                        self._hole(b, i, e - s)
                        continue
                    if not entry.attrs.present and not self.include_nonpresent:
                        self._hole(b, i, e - s)
                        continue
                    if (self.check_oa and entry.attrs.present
                            and not self.mem.contains(pa, (e - s) * esize)):
                        self._anomaly(b, i, raw, f"leaf output range {pa:#x}+"
                                      f"{(e - s) * esize:#x} outside memory")
                    self._emit(b, i, e - s, pa, attrs, Kind.LEAF, cmp,
                               entry.attrs if self.own_attrs else None)
                elif kind == _EMPTY:
                    self._hole(b, i, e - s)
                else:
                    self._tables(b, raws, full_keys, s, e)
                    if self._exhausted:
                        self._hole(b, i0 + e, i1 - i0 - e)
                        return False
            if paid < z - a:
                i = i0 + int(rs.starts[a + paid])
                self._spend(ONE_BY_ONE, b, i)  # does not hold it: the walk stops here
                self._hole(b, i, i1 - i)
                return False
            return True

        nruns = rs.starts.size
        vector = (not self.check_oa and nruns >= _BLOCK_MIN
                  and b.fully_covered(i0) and b.fully_covered(i1 - 1))
        if not vector:
            loop(0, nruns)
            return
        prev = 0
        for t in [*np.flatnonzero(rs.kinds == _TABLE).tolist(), nruns]:
            if t - prev < _BLOCK_MIN or not self._emit_block(b, rs.part(prev, t), cache):
                if not loop(prev, t):
                    return
            if not loop(t, t + 1):  # the table run (nothing past the end)
                return
            prev = t + 1

    def _runs_of_batch(self, b: Batch, tables: list[np.ndarray]) -> tuple:
        """Runs of the entries of batch ``b`` in its range (``tables`` concatenated), their
        anomalies recorded: (the entries, their attr keys, :class:`Runs`)."""
        fmt, level, i0 = self.fmt, b.level, b.index
        raws_all = tables[0] if len(tables) == 1 else np.concatenate(tables)
        raws = np.asarray(raws_all[i0:b.end_index], dtype=np.uint64)
        m = raws.size
        kinds = np.asarray(fmt.kinds(raws, level), dtype=np.uint8)
        keys = full_keys = np.asarray(fmt.attr_keys(raws, level), dtype=np.uint64)
        if self._ad:
            keys = keys & ~self._ad
        starts, oas, start_oas = self._runs_of(raws, kinds, keys, level, b.entry_size)
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
        self._check(raws, check, full_keys, b, oas[check] if oas is not None else None)
        return raws, full_keys, Runs(starts, np.append(starts[1:], m), kinds[starts],
                                     full_keys[starts], raws[starts], start_oas)

    def _runs_of_copies(self, b: Batch, tables: list[np.ndarray]) -> tuple | None:
        """:meth:`_runs_of_batch` for a batch made of a few distinct tables repeated (x86's
        ESPFIX area maps one pte table from thousands of pmd entries): each distinct table
        is analysed once and the batch's runs assembled from its runs, joined across table
        boundaries. None (use the direct analysis) if not worth it, or if a distinct table
        holds table entries or anything the anomaly check reports."""
        index: dict[int, int] = {}
        which = [index.setdefault(pa, len(index)) for pa in b.tables]
        if len(index) * 4 > len(which):
            return None
        fmt, level, n, esize = self.fmt, b.level, b.n, b.entry_size
        distinct: list[np.ndarray | None] = [None] * len(index)
        for table, u in zip(tables, which, strict=True):
            if distinct[u] is None:
                distinct[u] = table
        parts, edges = [], []
        for u in range(len(index)):
            raws = np.asarray(distinct[u], dtype=np.uint64)
            kinds = np.asarray(fmt.kinds(raws, level), dtype=np.uint8)
            if (kinds == _TABLE).any():
                return None
            fkeys = np.asarray(fmt.attr_keys(raws, level), dtype=np.uint64)
            keys = fkeys & ~self._ad if self._ad else fkeys
            starts, oas, start_oas = self._runs_of(raws, kinds, keys, level, esize)
            if oas is not None:
                return None
            check = np.union1d(starts[kinds[starts] != _EMPTY],
                               np.flatnonzero((kinds == _EMPTY) & (raws != 0)))
            left, once = self._left, self._once
            found = self._check(raws, check, fkeys, b, record=False)
            self._once = once + left - self._left  # a later copy of this batch skips it
            if found:
                return None  # the direct analysis reports it at every copy
            parts.append((starts, kinds[starts], fkeys[starts], raws[starts], start_oas))
            first_last = fmt.oas(raws[[0, n - 1]], level).tolist()
            edges.append(((int(kinds[0]), int(keys[0]), first_last[0]),
                          (int(kinds[-1]), int(keys[-1]), first_last[1])))
        if len(parts) == 1:  # one table repeated: its runs tiled
            return None, None, self._tiled(b, len(which), parts[0], edges[0])
        # the batch's run list: every table's runs, in table order, shifted to its position
        w = np.array(which, dtype=np.intp)
        sizes = np.array([p[0].size for p in parts], dtype=np.intp)
        count = sizes[w]
        first = np.concatenate(([0], np.cumsum(count)[:-1]))  # first run of each table
        at = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # of each distinct table in ``cat``
        flat = np.arange(int(count.sum()), dtype=np.intp) + np.repeat(at[w] - first, count)
        cat = [np.concatenate([p[f] for p in parts])[flat] for f in range(5)]
        cat[0] = cat[0] + np.repeat(b.table_entry(np.arange(len(which), dtype=np.intp)), count)
        # a table's first run continues the previous table's last run by the run rule
        joins: dict[tuple[int, int], bool] = {}
        keep = np.ones(flat.size, dtype=bool)
        for j in range(1, len(which)):
            pair = (which[j - 1], which[j])
            join = joins.get(pair)
            if join is None:
                (kl, keyl, oal), (kf, keyf, oaf) = edges[pair[0]][1], edges[pair[1]][0]
                join = joins[pair] = bool(continues(kl, keyl, kf, keyf, True,
                                                    oaf == oal + esize))
            if join:
                keep[first[j]] = False
        starts, kinds, keys, raws, oas = (c[keep] for c in cat)
        return None, None, Runs(starts, np.append(starts[1:], b.table_entry(len(which))), kinds,
                                keys, raws, oas)

    def _tiled(self, b: Batch, copies: int, part: tuple, edge: tuple) -> Runs:
        """The runs of ``copies`` copies of one table whose runs are ``part`` and whose
        (first, last) entries are ``edge``: its last run continues into the next copy's first
        by the run rule, or not."""
        (kf, keyf, oaf), (kl, keyl, oal) = edge
        starts, kinds, keys, raws, oas = part
        shift = np.arange(copies, dtype=np.intp) * b.n
        if continues(kl, keyl, kf, keyf, True, oaf == oal + b.entry_size) and copies > 1:
            # copy k's first run is part of copy k-1's last: drop it (copy 0's stays)
            starts_all = np.concatenate([starts, (starts[1:][None, :] + shift[1:, None]).ravel()])
            cols = [np.concatenate([c, np.tile(c[1:], copies - 1)]) for c in
                    (kinds, keys, raws, oas)]
        else:
            starts_all = (starts[None, :] + shift[:, None]).ravel()
            cols = [np.tile(c, copies) for c in (kinds, keys, raws, oas)]
        return Runs(starts_all, np.append(starts_all[1:], b.table_entry(copies)), *cols)

    def _emit_block(self, b: Batch, rs: Runs, cache: dict[int, tuple[Entry, Attrs, int]]) -> bool:
        """Emit a stretch of leaf and empty runs (no tables, nothing clipped) with numpy, with
        exactly the per-run loop's result: shown leaves as leaf runs, the rest as holes (or
        nothing) and neighbours joined by :func:`continues`. False (nothing emitted) if a leaf
        key does not decode to a leaf (the per-run loop reports that) or the budget does not
        hold the decodes."""
        level, esize = b.level, b.entry_size
        starts, ends, kinds, keys, raws, oas = rs
        leaf_runs = np.flatnonzero(kinds == _LEAF)
        ukeys, first, inv = np.unique(keys[leaf_runs], return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        nk = ukeys.size
        new = sum(1 for key in ukeys.tolist() if key not in cache)
        if not self._spend(new * DECODE, b, b.index + int(starts[0])):
            return False
        # per distinct key, and at index nk the holes': shown?, comparison id, attrs, own
        shown = np.zeros(nk + 1, dtype=bool)
        cmp_k = np.full(nk + 1, -1, dtype=np.int64)
        attrs_k = np.empty(nk + 1, dtype=object)
        own_k = np.empty(nk + 1, dtype=object)
        attrs_k[nk] = HOLE_ATTRS
        for j, (key, f) in enumerate(zip(ukeys.tolist(), first.tolist(), strict=True)):
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = self._decode_leaf(int(raws[leaf_runs[f]]), level, b.ctx,
                                                     key)
            entry, attrs, cmp = hit
            if entry.kind is not Kind.LEAF:
                return False
            shown[j] = entry.attrs.present or self.include_nonpresent
            cmp_k[j], attrs_k[j] = cmp, attrs
            own_k[j] = entry.attrs if self.own_attrs else None
        key_of = np.full(kinds.size, nk, dtype=np.int64)  # hidden leaves and empties: holes
        key_of[leaf_runs] = np.where(shown[inv], inv, nk)
        if self.include_holes:  # every run is emitted, as a leaf run or a hole
            ei = np.arange(kinds.size)
            k_of = key_of
            leaf = k_of != nk
            kind = np.where(leaf, _LEAF, _EMPTY)
            pa = np.where(leaf, oas, 0).astype(np.uint64)
            k0, k1 = kind[:-1], kind[1:]
        else:  # only the shown leaves
            ei = np.flatnonzero(key_of != nk)
            if not ei.size:
                self._flush()
                return True
            k_of = key_of[ei]
            pa = oas[ei].astype(np.uint64)
            k0 = k1 = _LEAF
        count = ends[ei] - starts[ei]
        size = count * esize
        va = b.va(starts[ei] + b.index).astype(np.uint64) + np.uint64(self._offset)
        cmp = cmp_k[k_of]
        join = continues(k0, cmp[:-1], k1, cmp[1:], ei[1:] == ei[:-1] + 1,
                         pa[1:] == pa[:-1] + size[:-1].astype(np.uint64))
        heads = np.flatnonzero(np.concatenate(([True], ~join)))
        g_size = np.add.reduceat(size, heads)
        g_count = np.add.reduceat(count, heads)
        g_key = k_of[heads]
        g_kind = _KINDS[kind[heads]] if self.include_holes else None
        g_va, g_pa, g_cmp = va[heads], pa[heads], cmp[heads]
        ng = len(heads)

        def group(k: int) -> tuple:  # one group as a segment for _add
            c = int(g_cmp[k])
            return (int(g_va[k]), int(g_pa[k]), int(g_size[k]), esize, level,
                    attrs_k[g_key[k]], int(g_count[k]),
                    Kind.LEAF if g_kind is None else g_kind[k], None if c < 0 else c,
                    own_k[g_key[k]])

        if ei[0] != 0:  # a hidden leaf or a hole before the first group ends the open run
            self._flush()
        self._add(*group(0))  # the first group may continue the open run
        keep_open = ei[-1] == kinds.size - 1  # ends in an emitted run: a later one may join it
        if ng == 1:
            if not keep_open:
                self._flush()
            return True
        self._flush()
        last = ng - 1 if keep_open else ng
        if last - 1 > 8:
            k = slice(1, last)
            self._out.append(RunBlock(g_va[k], g_size[k], g_pa[k], esize, level,
                                      attrs_k[g_key[k]], g_count[k], own_k[g_key[k]],
                                      None if g_kind is None else g_kind[k]))
        else:
            for j in range(1, last):
                self._add(*group(j))
                self._flush()
        if keep_open:
            self._add(*group(ng - 1))
        return True

    def _runs_of(self, raws: np.ndarray, kinds: np.ndarray, keys: np.ndarray, level: int,
                 esize: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """First index of each run of one table batch: where an entry does not
        :func:`continues` the one before.

        Fast path: leaf contiguity is read from the raw entries (a step of +-esize, the L1TF
        inverted ones stepping down), then verified with ``fmt.oas`` of every run's first and
        last entry (one call: on small tables its fixed cost dominates), which also shows
        whether equal-key leaf neighbours split by the raw test are really discontiguous; if
        that finds a mismatch (an output address that is not one linear field, garbage), the
        output addresses of the whole batch decide. Returns the starts, the batch's output
        addresses when computed, and the output address of each run's first entry."""
        m = raws.size
        fmt = self.fmt
        if m == 1:
            return np.zeros(1, dtype=np.intp), None, np.asarray(fmt.oas(raws, level),
                                                                dtype=np.uint64)
        brk = np.ones(m, dtype=bool)
        k1, k0 = kinds[1:], kinds[:-1]
        d = raws[1:] - raws[:-1]
        step = (d == np.uint64(esize)) | (d == np.uint64((1 << 64) - esize))
        brk[1:] = ~continues(k0, keys[:-1], k1, keys[1:], True, step)
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], m)
        n = starts.size
        edge = np.asarray(fmt.oas(raws[np.concatenate((starts, ends - 1))], level),
                          dtype=np.uint64)
        first, last = edge[:n], edge[n:]
        leaf = kinds[starts] == _LEAF
        want = (ends - starts - 1).astype(np.uint64) * np.uint64(esize)
        ok = bool(np.all(~leaf | (last - first == want)))
        if ok:  # equal-key leaf neighbours split by the raw test must really be discontiguous
            p = starts[1:] - 1  # the entries before a break: each run's last but the final's
            sel = leaf[:-1] & leaf[1:] & (keys[p] == keys[p + 1]) & ~step[p]
            ok = not np.any(first[1:][sel] == last[:-1][sel] + np.uint64(esize))
        if ok:
            return starts, None, first
        oas = np.asarray(fmt.oas(raws, level), dtype=np.uint64)
        brk[1:] = ~continues(k0, keys[:-1], k1, keys[1:], True,
                             oas[1:] == oas[:-1] + np.uint64(esize))
        starts = np.flatnonzero(brk)
        return starts, oas, oas[starts]

    def _check(self, raws: np.ndarray, idx: np.ndarray, keys: np.ndarray, b: Batch,
               oas: np.ndarray | None = None, record: bool = True) -> int:
        """Record fmt.anomalies() of the entries at ``idx`` (indices into ``raws``, from
        ``b.index``); the number found (record=False: only count them)."""
        if not idx.size:
            return 0
        fmt, level, i0 = self.fmt, b.level, b.index
        sel = raws[idx]
        sel_oas = oas if oas is not None else fmt.oas(sel, level)
        sel_keys = keys[idx]
        plain = sel == (sel_oas | sel_keys)
        known = self._clean_keys.setdefault(level, set())
        if len(known) > _CLEAN_KEYS:
            known.clear()
        if idx.size <= _SMALL:  # the same with Python sets: numpy's fixed costs dominate
            keys_l, sel_l, plain_l = sel_keys.tolist(), sel.tolist(), plain.tolist()
            fresh = {k: r for k, r, p in zip(keys_l, sel_l, plain_l, strict=True)
                     if p and k not in known}
            if not self._spend(len(fresh) * CHECK, b, i0 + int(idx[0])):
                return 0
            self._once += len(fresh) * CHECK
            known.update(k for k, r in fresh.items() if not fmt.anomalies(r, level))
            rest = [not (p and k in known) for k, p in zip(keys_l, plain_l, strict=True)]
            if not all(rest):
                idx, sel = idx[rest], sel[rest]
        elif plain.any():  # a plain entry is clean iff its key is: check one per new key
            pk, pi = np.unique(sel_keys[plain], return_index=True)
            new = [(key, raw) for key, raw in zip(pk.tolist(), sel[plain][pi].tolist(),
                                                   strict=True) if key not in known]
            if not self._spend(len(new) * CHECK, b, i0 + int(idx[0])):
                return 0
            self._once += len(new) * CHECK
            for key, raw in new:
                if not fmt.anomalies(raw, level):
                    known.add(key)
            if known:
                clean = plain & np.isin(sel_keys, np.fromiter(known, np.uint64, len(known)))
                rest = ~clean
                idx, sel = idx[rest], sel[rest]
        if not self._spend(idx.size * CHECK, b, i0 + int(idx[0]) if idx.size else i0):
            return 0
        found = 0
        for i, raw in zip(idx.tolist(), sel.tolist(), strict=True):
            reasons = fmt.anomalies(raw, level)
            found += len(reasons)
            if record:
                for reason in reasons:
                    self._anomaly(b, i0 + i, raw, reason)
        return found

    def _decode_leaf(self, raw: int, level: int, ctx: tuple[Attrs, ...],
                     key: int) -> tuple[Entry, Attrs, int]:
        """(entry, effective attrs, comparison id) of a leaf reached through ``ctx``; equal
        ids <=> runs may coalesce (equal effective attrs, and own attrs with own_attrs).
        Remembered for the walk by attr ``key`` (equal keys decode to equal attrs; the
        callers still pay DECODE once per batch, so the budget does not depend on it)."""
        memo = self._decoded.get((key, level, ctx))
        if memo is None:
            memo = self._decoded[(key, level, ctx)] = self._decode_leaf_now(raw, level, ctx)
        return memo

    def _decode_leaf_now(self, raw: int, level: int,
                         ctx: tuple[Attrs, ...]) -> tuple[Entry, Attrs, int]:
        entry = self.fmt.decode(raw, level)
        attrs = combine(ctx, entry.attrs) if ctx else entry.attrs
        cmp: object = attrs.with_(accessed=False, dirty=False) if self.ignore_ad else attrs
        if self.own_attrs:
            own = entry.attrs
            cmp = (cmp, own.with_(accessed=False, dirty=False) if self.ignore_ad else own)
        return entry, attrs, self._interned.setdefault(cmp, len(self._interned))

    def _tables(self, b: Batch, raws: np.ndarray, keys: np.ndarray, s: int, e: int) -> None:
        """Follow the run of table entries s..e-1 (indices into ``raws``, from ``b.index``),
        as many children at once as the budget can still read."""
        fmt, level = self.fmt, b.level
        i = b.index + s
        if not self._spend(FOLLOW + e - s, b, i):  # the children's pass below
            self._hole(b, i, e - s)
            return
        children = np.asarray(fmt.oas(raws[s:e], level), dtype=np.uint64)
        # entries whose bits beyond the table address differ from the first's: check each
        rest = raws[s:e] - children
        odd = np.flatnonzero(rest[1:] != rest[0]) + (s + 1)
        self._check(raws, odd, keys, b, children[odd - s])
        entry = self.geo.decode(int(raws[s]), level)
        if level == 0 or entry.kind is not Kind.TABLE or not entry.attrs.present:
            # fmt.anomalies() has said why (non-present table entry, table bit at pte level).
            self._hole(b, i, e - s)
            return
        child_n = self.geo.entries[level - 1]
        p = 0
        while p < e - s and not self._exhausted:
            q = min(e - s, p + max(_CHUNK, self._left // child_n + 1))
            self._children(b, i + p, children[p:q], raws[s + p:s + q], entry.attrs)
            p = q
        if p < e - s:
            self._hole(b, i + p, e - s - p)

    def _children(self, b: Batch, i: int, children: np.ndarray, raws: np.ndarray,
                  attrs: Attrs) -> None:
        """Walk the tables ``children`` that batch entries i, i+1, ... point to: stretches of
        followable ones as one batch each; cycles and tables outside memory are anomalies."""
        child_bytes = self.geo.entries[b.level - 1] * 8
        here, path = b.below()
        if children.size <= _SMALL:  # Python sets beat numpy's set routines on a few values
            ls = children.tolist()
            cycle = np.array([c in here for c in ls], dtype=bool)
            check = list({c for c in ls if c not in here})
        else:
            cycle = np.isin(children, path)
            check = np.unique(children[~cycle]).tolist()
        if not self._spend(len(check) * RUN, b, i):
            self._hole(b, i, children.size)
            return
        away = {c for c in check if not self.mem.contains(c, child_bytes)}
        if not away:
            bad = cycle
        elif children.size <= _SMALL:
            bad = cycle | np.array([c in away for c in ls], dtype=bool)
        else:
            bad = cycle | np.isin(children, np.fromiter(away, np.uint64, len(away)))
        if not bad.any():
            self._walk(b.descend_run(i, children.tolist(), attrs))
            return
        cuts = [0, *(np.flatnonzero(bad[1:] != bad[:-1]) + 1).tolist(), children.size]
        for p, q in zip(cuts, cuts[1:], strict=False):
            if self._exhausted:
                self._hole(b, i + p, children.size - p)
                return
            if not bad[p]:
                self._walk(b.descend_run(i + p, children[p:q].tolist(), attrs))
                continue
            room = max(0, min(q, p + self.max_anomalies - len(self.anomalies)))
            for k in range(p, room):
                what = "is already on the walk path (cycle)" if cycle[k] else "is outside memory"
                self._anomaly(b, i + k, int(raws[k]),
                              f"table at {int(children[k]):#x} {what}: not followed")
            self.anomaly_count += q - max(p, room)  # counted, not kept
            self._hole(b, i + p, q - p)


def walk_runs(fmt: Format, mem: PhysMemory, root: int, start: int | None = None,
              end: int | None = None, **kw: object) -> tuple[list[Run], list[Anomaly]]:
    """All runs of ``root`` in [start, end) and the anomalies met (see :class:`Walker`)."""
    walker = Walker(fmt, mem, root, **kw)  # type: ignore[arg-type]
    runs = list(walker.runs(start, end))
    return runs, walker.anomalies

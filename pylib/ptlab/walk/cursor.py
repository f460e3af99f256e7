"""The cursor: the one place that descends page tables (after generic_pt's ``struct pt_state``).

A :class:`Cursor` is a position inside ONE table of a descent: the format's geometry, the
memory it reads through (any :class:`~ptlab.memory.PhysMemory`, or the engine's transaction
overlay: anything with ``read_table(pa, n)``), the level, the table's PA, the low VA its entry
0 maps (``base``), the low-VA range [start, end) of the operation clipped to the table's span,
and the index range [index, end_index) of the entries that range touches. Everything that
walks — the walker's translate and runs, every engine operation — gets its index arithmetic,
its coverage test and its next level from here:

- ``for_each_entry()`` iterates the level's entries in range (``for_each_pt_level_entry``),
- ``fully_covered(i)`` says whether entry ``i``'s whole span is inside the range
  (``pt_entry_fully_covered``), ``partition()`` splits the range into its partly covered
  edge entries and the fully covered block between them,
- ``descend(i, child)`` is the cursor of the table entry ``i`` points to, the range clipped
  to that entry's span (``pt_descend``); ``children()`` descends every table entry in range,
- ``va(i)``, ``span(i0, i1)`` and ``clip(i)`` are the VAs of entries (flush ranges, messages),
- ``Cursor.at_root`` starts a descent; ``Cursor.whole`` covers one table whose VA does not
  matter (freeing, counting),
- :func:`seek` descends to the table at one level holding a VA (translate, split, share),
  :func:`walk_range` runs a level function from the root (``pt_walk_range``),
  :func:`leaf_cursors` visits every leaf in range, in VA order.

VAs here are *low* VAs: the canonical VA with the sign-extension / upper-half bits removed
(``va & (2**va_bits - 1)``), so a root spans [0, 2**va_bits); ``end`` is exclusive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import numpy as np

from ..formats.base import Entry, Format, Kind

__all__ = [
    "Cursor", "Geometry", "TableReader", "follow", "geometry", "leaf_cursors", "seek",
    "walk_range",
]

T = TypeVar("T")
_EMPTY, _TABLE, _LEAF = int(Kind.EMPTY), int(Kind.TABLE), int(Kind.LEAF)
_DECODE_CACHE = 4096  # decoded entries kept per level before the cache is dropped


class TableReader(Protocol):
    """What a cursor reads through: physical memory, or an engine transaction's overlay."""

    def read_table(self, pa: int, n: int) -> np.ndarray: ...


class Geometry:
    """A format's per-level numbers, computed once, and a small decode cache."""

    __slots__ = ("_decoded", "entries", "fmt", "mask", "shift", "size", "top")

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.top = fmt.levels - 1
        self.shift = tuple(fmt.shift(lvl) for lvl in range(fmt.levels))
        self.entries = tuple(fmt.entries(lvl) for lvl in range(fmt.levels))
        self.size = tuple(1 << sh for sh in self.shift)  # VA bytes one entry maps, per level
        self.mask = fmt.va_span - 1
        self._decoded: list[dict[int, Entry]] = [{} for _ in range(fmt.levels)]

    def decode(self, raw: int, level: int) -> Entry:
        """``fmt.decode`` with a per-level cache (tables repeat the same few entries)."""
        cache = self._decoded[level]
        ent = cache.get(raw)
        if ent is None:
            if len(cache) >= _DECODE_CACHE:
                cache.clear()
            ent = cache[raw] = self.fmt.decode(raw, level)
        return ent


_GEOMETRIES: dict[int, tuple[Format, Geometry]] = {}


def geometry(fmt: Format) -> Geometry:
    """The (shared) :class:`Geometry` of ``fmt``."""
    hit = _GEOMETRIES.get(id(fmt))
    if hit is None or hit[0] is not fmt:
        hit = _GEOMETRIES[id(fmt)] = (fmt, Geometry(fmt))
    return hit[1]


class Cursor:
    """A position in one table of a descent over the low-VA range [start, end)."""

    __slots__ = ("base", "end", "end_index", "geo", "index", "level", "mem", "start", "table")

    def __init__(self, geo: Geometry, mem: TableReader, level: int, table: int, base: int,
                 start: int, end: int) -> None:
        self.geo = geo
        self.mem = mem
        self.level = level
        self.table = table
        self.base = base
        self.start = start
        self.end = end
        sh = geo.shift[level]
        self.index = (start - base) >> sh
        self.end_index = ((end - 1 - base) >> sh) + 1

    @classmethod
    def at_root(cls, fmt: Format | Geometry, mem: TableReader, root: int, start: int,
                end: int) -> Cursor:
        """The cursor of the root table over low-VA range [start, end)."""
        geo = fmt if isinstance(fmt, Geometry) else geometry(fmt)
        return cls(geo, mem, geo.top, root, 0, start, end)

    @classmethod
    def whole(cls, geo: Geometry, mem: TableReader, level: int, table: int) -> Cursor:
        """A cursor over every entry of the table at ``table`` (``level``), whose VA is not
        known (entry 0 taken to map VA 0): for walks that need no VA, such as freeing."""
        return cls(geo, mem, level, table, 0, 0, geo.entries[level] << geo.shift[level])

    # --- the table and its entries ---------------------------------------------------------
    @property
    def n(self) -> int:
        """Entries of this table."""
        return self.geo.entries[self.level]

    @property
    def entry_size(self) -> int:
        """Bytes of VA one entry of this table maps."""
        return 1 << self.geo.shift[self.level]

    def table_raws(self) -> np.ndarray:
        """Every raw entry of the table (read through ``mem``; may be read-only)."""
        return self.mem.read_table(self.table, self.geo.entries[self.level])

    def raws(self, i0: int | None = None, i1: int | None = None) -> np.ndarray:
        """Raw entries [i0, i1) (default: the entries in range)."""
        return self.table_raws()[self.index if i0 is None else i0:
                                 self.end_index if i1 is None else i1]

    def raw(self, i: int | None = None) -> int:
        """Raw entry ``i`` (default: the current one)."""
        return int(self.table_raws()[self.index if i is None else i])

    def entry(self, i: int | None = None) -> Entry:
        """Decoded entry ``i`` (default: the current one)."""
        geo, level = self.geo, self.level
        raw = int(self.mem.read_table(self.table, geo.entries[level])[
            self.index if i is None else i])
        ent = geo._decoded[level].get(raw)
        return ent if ent is not None else geo.decode(raw, level)

    def kind(self, i: int | None = None) -> Kind:
        return self.entry(i).kind

    def kinds(self, i0: int | None = None, i1: int | None = None) -> np.ndarray:
        """Kind values (uint8) of entries [i0, i1) (default: the entries in range)."""
        return self.geo.fmt.kinds(self.raws(i0, i1), self.level)

    def entry_pa(self, i: int | None = None) -> int:
        """PA of entry ``i`` (default: the current one)."""
        return self.table + 8 * (self.index if i is None else i)

    def va(self, i: int | None = None) -> int:
        """Low VA of the start of entry ``i``'s span (default: the current entry)."""
        return self.base + ((self.index if i is None else i) << self.geo.shift[self.level])

    def span(self, i0: int, i1: int | None = None) -> tuple[int, int]:
        """Low-VA range [start, end) of entries [i0, i1) (default: entry ``i0`` alone)."""
        sh = self.geo.shift[self.level]
        return self.base + (i0 << sh), self.base + ((i0 + 1 if i1 is None else i1) << sh)

    def clip(self, i: int) -> tuple[int, int]:
        """The part of the range inside entry ``i``'s span."""
        eb = self.base + (i << self.geo.shift[self.level])
        return max(self.start, eb), min(self.end, eb + (1 << self.geo.shift[self.level]))

    def canonical(self, low: int) -> int:
        """The canonical VA of low VA ``low``."""
        return self.geo.fmt.canonical(low)

    # --- coverage --------------------------------------------------------------------------
    def fully_covered(self, i: int | None = None) -> bool:
        """Whether entry ``i``'s whole span lies inside [start, end)."""
        eb = self.va(i)
        return self.start <= eb and eb + (1 << self.geo.shift[self.level]) <= self.end

    def partition(self) -> tuple[list[int], int, int]:
        """The partly covered entries (at most the first and the last in range) and the
        block [f0, f1) of fully covered entries between them."""
        i0, i1 = self.index, self.end_index
        m = (1 << self.geo.shift[self.level]) - 1
        f0 = i0 if (self.start - self.base) & m == 0 else i0 + 1
        f1 = i1 if (self.end - self.base) & m == 0 else i1 - 1
        partial = [i0] if f0 > i0 else []
        if f1 < i1 and i1 - 1 not in partial:
            partial.append(i1 - 1)
        return partial, f0, f1

    def for_each_entry(self) -> Iterator[int]:
        """The indices of the entries in range, the cursor moving along (``index``)."""
        i0, i1 = self.index, self.end_index
        try:
            for i in range(i0, i1):
                self.index = i
                yield i
        finally:
            self.index = i0

    # --- descent ---------------------------------------------------------------------------
    def descend(self, i: int, child: int) -> Cursor:
        """The cursor of table ``child`` (what entry ``i`` points to), the range clipped to
        entry ``i``'s span."""
        geo = self.geo
        sh = geo.shift[self.level]
        eb = self.base + (i << sh)
        ee = eb + (1 << sh)
        s, e = self.start, self.end
        return Cursor(geo, self.mem, self.level - 1, child, eb, s if s > eb else eb,
                      e if e < ee else ee)

    def children(self, *, present: bool = True) -> Iterator[tuple[int, Cursor]]:
        """(index, cursor of the table it points to) of every table entry in range, in
        order. ``present=False`` includes non-present table entries: hardware does not
        follow them, but they still own their table (freeing, counting)."""
        if self.level == 0:
            return
        i0 = self.index
        for t in np.flatnonzero(self.kinds() == _TABLE).tolist():
            ent = self.entry(i0 + t)
            if present and not ent.attrs.present:
                continue
            yield i0 + t, self.descend(i0 + t, ent.oa)

    def __repr__(self) -> str:
        return (f"<Cursor {self.geo.fmt.name} level {self.level} table {self.table:#x} "
                f"[{self.index}, {self.end_index}) of [{self.start:#x}, {self.end:#x})>")


def walk_range(fmt: Format | Geometry, mem: TableReader, root: int, start: int, end: int,
               fn: Callable[[Cursor], T]) -> T:
    """Run the level function ``fn`` on the root cursor of low-VA range [start, end);
    ``fn`` recurses through :meth:`Cursor.descend` (``pt_walk_range``)."""
    return fn(Cursor.at_root(fmt, mem, root, start, end))


def seek(fmt: Format | Geometry, mem: TableReader, root: int, low: int, level: int,
         step: Callable[[Cursor, Entry], int | None]) -> Cursor | None:
    """Descend from ``root`` towards low VA ``low`` to the table at ``level``.

    At each level above it, ``step(cursor, entry)`` gets the cursor on the entry covering
    ``low`` and returns the PA of the next table (following a TABLE entry, or creating one),
    or None to stop; seek then returns None. Returns the cursor at ``level`` on ``low``'s
    entry (its range is [low, low+1))."""
    c = Cursor.at_root(fmt, mem, root, low, low + 1)
    while c.level > level:
        child = step(c, c.entry())
        if child is None:
            return None
        c = c.descend(c.index, child)
    return c


def follow(c: Cursor, ent: Entry) -> int | None:
    """The :func:`seek` step that only follows present table entries."""
    return ent.oa if ent.kind is Kind.TABLE and ent.attrs.present else None


def leaf_cursors(c: Cursor) -> Iterator[tuple[Cursor, int]]:
    """(cursor of its table, index) of every leaf overlapping ``c``'s range, in VA order.
    Non-present table entries are not descended."""
    fmt, level, i0 = c.geo.fmt, c.level, c.index
    kinds = fmt.kinds(c.raws(), level)
    for t in np.flatnonzero(kinds != _EMPTY).tolist():
        i = i0 + t
        if kinds[t] == _LEAF:
            yield c, i
            continue
        ent = c.entry(i)
        if ent.attrs.present and level > 0:
            yield from leaf_cursors(c.descend(i, ent.oa))

"""The engine's core: a root with its format, memory, allocator and gather, and the helpers
every operation uses (range slicing, argument checks, descent, split, contiguous-hint
unfolding). Every descent goes through :mod:`ptlab.walk.cursor`: operations are level
functions on a :class:`~ptlab.walk.cursor.Cursor` reading through the transaction.

Internally VAs are *low* VAs: the canonical VA with the sign-extension / TTBR1 bits
removed (``va & (2**va_bits - 1)``), so a root spans [0, 2**va_bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

from ..alloc import Allocator, NormalAllocator, PhysPool
from ..formats.base import ATTR_FIELDS, Attrs, Entry, Format, FormatError, Kind
from ..memory.base import PhysMemory
from ..tlb import Gather
from ..walk.cursor import Cursor, geometry, seek
from .errors import EngineError, NotMapped
from .leafenc import LeafEncoder
from .registry import memory_state, registry_for
from .txn import Txn

LEAF, TABLE, EMPTY_K = int(Kind.LEAF), int(Kind.TABLE), int(Kind.EMPTY)
T = TypeVar("T")
_ONE, _NONE = np.zeros(1, dtype=np.intp), np.zeros(0, dtype=np.intp)  # offsets, shared:
_ONE.flags.writeable = _NONE.flags.writeable = False  # read-only
_INT_FIELDS = {"cache": 7, "pkey": 15, "shareability": 3, "sw": None}  # field -> max value


class PageSizes(dict[int, int]):
    """Allowed leaf level -> page size, plus the levels where contiguous-hint groups may be
    written (``cont``)."""

    cont: frozenset[int] = frozenset()


def check_attr_values(values: Mapping[str, Any]) -> None:
    """EngineError unless every value has its Attrs field's type: bool for flags, a
    non-negative int (in the field's range) for cache / pkey / shareability / sw."""
    for name, v in values.items():
        if name in _INT_FIELDS:
            hi = _INT_FIELDS[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (hi and v > hi):
                rng = f"0..{hi}" if hi else ">= 0"
                raise EngineError(f"attribute {name} must be an int {rng}, got {v!r}")
        elif not isinstance(v, bool):
            raise EngineError(f"attribute {name} must be a bool, got {v!r}")


def default_allocator(mem: PhysMemory, page_size: int) -> Allocator:
    """A NormalAllocator over a pool at PA 1 TiB (4 GiB) of ``mem`` — or the top quarter
    of a smaller memory — one pool per memory and page size, so PageTables created without
    an allocator never collide."""
    st = memory_state(mem)
    key = f"pool-{page_size}"
    pool = st.get(key)
    if pool is None:
        base, size = 1 << 40, 1 << 32
        if not mem.contains(base, size):
            ranges = mem.ranges()
            if not ranges:
                raise EngineError("memory has no known range for a default table pool")
            s, e = ranges[-1]
            size = ((e - s) // 4) // page_size * page_size
            base = (e - size) // page_size * page_size
        pool = st[key] = PhysPool(mem, base, size, page_size)
    assert isinstance(pool, PhysPool)
    return NormalAllocator(pool)


class TableCore:
    """One page-table root in ``mem`` with format ``fmt``.

    ``root=None`` allocates an empty root from ``alloc``; pass an existing root (e.g. one
    imported from a guest, or another PageTable's) to operate on it: such a *view* does
    not own the root, and its :meth:`destroy` frees nothing. ``gather`` collects flushes
    and table frees. ``table_attrs``: attributes of the table entries the engine creates
    (default ``fmt.table_attrs()``, e.g. x86 ``_KERNPG_TABLE``; pass US set for user
    tables). An allocator whose pages the format cannot point to (another page size, PAs
    above the format's PA width, another memory) is refused here and on assignment.
    """

    def __init__(
        self,
        fmt: Format,
        mem: PhysMemory,
        root: int | None = None,
        alloc: Allocator | None = None,
        gather: Gather | None = None,
        *,
        table_attrs: Attrs | None = None,
    ) -> None:
        self.fmt = fmt
        self.mem = mem
        self.geo = geometry(fmt)
        self.alloc = alloc if alloc is not None else default_allocator(mem, fmt.table_bytes)
        self.gather = gather if gather is not None else Gather()
        self.registry = registry_for(mem)
        self.table_attrs = self._normalize(table_attrs or fmt.table_attrs(), Kind.TABLE)
        self.enc = LeafEncoder(fmt)
        self.top = fmt.levels - 1
        self._cc = [fmt.contig_count(lvl) for lvl in range(fmt.levels)]
        self._cbit: dict[int, int] = {}
        self._ranges = fmt.va_ranges()
        self._default_sizes = PageSizes(fmt.page_sizes())
        self._norm: dict[Attrs, Attrs] = {}
        self._changers: dict[tuple, Callable[[Attrs], Attrs]] = {}
        self.owns_root = root is None
        if root is None:
            tx = Txn(self)
            fake = tx.new_table(self.alloc, self.top)
            tx.incref(fake)
            root = tx.commit()[fake]
        elif not isinstance(root, int) or root % fmt.table_bytes or not mem.contains(root, 8):
            raise EngineError(f"root {root!r} is not a table-aligned PA inside the memory")
        self.root: int = root

    # --- the allocator ---------------------------------------------------------------------
    @property
    def alloc(self) -> Allocator:
        return self._alloc

    @alloc.setter
    def alloc(self, alloc: Allocator) -> None:
        self._alloc = self._check_alloc(alloc)

    def _check_alloc(self, alloc: Allocator) -> Allocator:
        """``alloc`` if its pages can hold this format's tables, else EngineError."""
        fmt = self.fmt
        if not callable(getattr(alloc, "reserve", None)) or not callable(
                getattr(alloc, "free", None)):
            raise EngineError(f"allocator must have reserve()/free(), got {alloc!r}")
        rng = alloc.pa_range() if callable(getattr(alloc, "pa_range", None)) else None
        if rng is not None and rng[0] >= rng[1]:
            return alloc  # hands out nothing (no-allocation mode): any format
        size = getattr(alloc, "page_size", None)
        if size != fmt.table_bytes:
            raise EngineError(f"allocator pages are {size!r} bytes; {fmt.name} tables are "
                              f"{fmt.table_bytes:#x}")
        if rng is not None and rng[1] > 1 << fmt.pa_bits:
            raise EngineError(f"allocator pages up to {rng[1]:#x} lie above {fmt.name}'s "
                              f"{fmt.pa_bits}-bit physical addresses")
        amem = getattr(alloc, "mem", None)
        if amem is not None and amem is not self.mem:
            raise EngineError("allocator pages live in another memory than the tables")
        return alloc

    # --- argument checks --------------------------------------------------------------------
    def _alive(self) -> None:
        if self.root is None:
            raise EngineError("page table already destroyed")

    def _va(self, lo: int) -> int:
        return self.fmt.canonical(lo)

    def _span(self, va: int, size: int, align: int) -> tuple[int, int]:
        if not isinstance(va, int | np.integer) or not isinstance(size, int | np.integer):
            raise EngineError(f"VA and size must be integers, got {va!r}, {size!r}")
        va, size = int(va), int(size)
        if size <= 0:
            raise EngineError(f"size must be positive, got {size:#x}")
        if va % align or size % align:
            raise EngineError(f"VA {va:#x} / size {size:#x} not aligned to {align:#x}")
        for s, e in self._ranges:
            if s <= va and va + size <= e:
                lo = va & self.geo.mask
                return lo, lo + size
        raise EngineError(
            f"[{va:#x}, {va + size:#x}) is not inside one VA range of {self.fmt.name}"
        )

    def _check_level(self, op: str, level: object, lowest: int = 1) -> None:
        """EngineError unless ``level`` is an int in lowest..top (``op`` names the caller)."""
        if not isinstance(level, int) or not lowest <= level <= self.top:
            raise EngineError(f"{op} level must be {lowest}..{self.top}, got {level!r}")

    def _normalize(self, attrs: Attrs, kind: Kind = Kind.LEAF) -> Attrs:
        """``fmt.normalize`` of type-checked ``attrs``; EngineError for bad values."""
        if not isinstance(attrs, Attrs):
            raise EngineError(f"attrs must be an Attrs, got {type(attrs).__name__}")
        check_attr_values({name: getattr(attrs, name) for name in ATTR_FIELDS})
        try:
            return self.fmt.normalize(attrs, kind)
        except FormatError as e:
            raise EngineError(str(e)) from None

    def _leaf_attrs(self, attrs: Attrs) -> Attrs:
        """Checked, normalised leaf attributes (memoised)."""
        try:
            a = self._norm.get(attrs)
        except TypeError:  # an unhashable field value: refused by _normalize
            a = None
        if a is None:
            a = self._normalize(attrs)
            if attrs.contiguous:
                raise EngineError("the contiguous hint is managed by the engine, not passed in")
            self._norm[attrs] = a
        return a

    # --- descent ----------------------------------------------------------------------------
    def _root(self, tx: Txn, lo: int, hi: int) -> Cursor:
        """The root cursor of low-VA range [lo, hi), reading through ``tx``."""
        return Cursor(self.geo, tx, self.top, self.root, 0, lo, hi)

    def _child(self, c: Cursor, i: int, ent: Entry) -> int:
        """The table a TABLE ``ent`` (entry ``i`` of ``c``) points to; EngineError when it
        is not present (the engine does not descend what hardware would not)."""
        if not ent.attrs.present:
            raise EngineError(
                f"VA {self._va(c.clip(i)[0]):#x}: non-present table entry at level {c.level}; "
                "cannot descend"
            )
        return ent.oa

    def _descend(self, c: Cursor, i: int) -> Cursor:
        """The cursor below the table entry ``i`` of ``c`` (present, else EngineError)."""
        return c.descend(i, self._child(c, i, c.entry(i)))

    def _seek_entry(self, tx: Txn, va: int, level: int, op: str, wanted: str) -> Cursor:
        """The cursor on the entry at ``level`` (1..top) covering ``va``, reached through
        table entries only; EngineError ("``op`` level must be", "no ``wanted`` at
        level") otherwise."""
        self._check_level(op, level)
        lo, _ = self._span(va, 1 << self.fmt.page_shift, 1)

        def step(c: Cursor, ent: Entry) -> int:
            if ent.kind is not Kind.TABLE:
                what = "a leaf" if ent.kind is Kind.LEAF else "nothing"
                raise EngineError(
                    f"VA {va:#x}: {what} at level {c.level}, no {wanted} at level {level}")
            return self._child(c, c.index, ent)

        c = seek(self.geo, tx, self.root, lo, level, step)
        assert c is not None
        return c

    def _path(
        self, tx: Txn, lo: int, level: int, alloc: Allocator | None = None, pin: bool = False
    ) -> Cursor:
        """The cursor at ``level`` on ``lo``'s entry, creating (or splitting) tables above
        it; with ``pin`` every table on the way is pinned."""
        alloc = alloc or self.alloc

        def step(c: Cursor, ent: Entry) -> int:
            i = c.index
            if ent.kind is Kind.EMPTY:
                child = self._new_child(tx, c, i, alloc)
            elif ent.kind is Kind.LEAF:
                child = self._split(tx, c, i, ent, alloc)
            else:
                child = self._child(c, i, ent)
            if pin:
                tx.pin(child)
            return child

        if pin:
            tx.pin(self.root)
        c = seek(self.geo, tx, self.root, lo, level, step)
        assert c is not None
        return c

    def _partition(self, tx: Txn, c: Cursor) -> tuple[list[int], int, int]:
        """``c.partition()``, with the contiguous groups the range covers only in part
        unfolded first (a change to part of a group must not keep the hint)."""
        partial, f0, f1 = c.partition()
        cc = self._cc[c.level]
        if cc > 1 and (partial or f0 % cc or f1 % cc):  # else only whole groups are covered
            self._uncont_edges(tx, c, partial)
        return partial, f0, f1

    def _edges(self, tx: Txn, c: Cursor, partial: list[int], *, strict: bool = False,
               keep: Callable[[Entry], bool] | None = None) -> Iterator[tuple[int, Cursor]]:
        """(index, child cursor) of each partly covered entry that holds something: a
        table is descended, a huge leaf split first (unless ``keep(leaf)``); a hole is
        skipped, or NotMapped with ``strict``."""
        for i in partial:
            ent = c.entry(i)
            if ent.kind is Kind.EMPTY:
                if strict:
                    raise NotMapped(f"VA {self._va(c.clip(i)[0]):#x} is not mapped")
                continue
            if ent.kind is Kind.LEAF:
                if keep is not None and keep(ent):
                    continue
                child = self._split(tx, c, i, ent)
            else:
                child = self._child(c, i, ent)
            yield i, c.descend(i, child)

    def _block(self, c: Cursor, f0: int, f1: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Entries [f0, f1) of ``c``: (raws, kinds, leaf offsets, table offsets), offsets
        from ``f0`` (a one-entry block, the common single-page case, without a search)."""
        blk = c.raws(f0, f1)
        kinds = self.fmt.kinds(blk, c.level)
        if f1 - f0 == 1:
            k = int(kinds[0])
            return blk, kinds, _ONE if k == LEAF else _NONE, [0] if k == TABLE else []
        return (blk, kinds, np.flatnonzero(kinds == LEAF),
                np.flatnonzero(kinds == TABLE).tolist())

    # --- changes ----------------------------------------------------------------------------
    def _table_raw(self, child: int, level: int) -> int:
        return self.fmt.table(child, level, self.table_attrs)

    def _new_child(self, tx: Txn, c: Cursor, i: int, alloc: Allocator) -> int:
        """A new empty table linked at entry ``i`` of ``c``."""
        child = tx.new_table(alloc, c.level - 1)
        tx.link(c, i, child, self._table_raw(child, c.level))
        return child

    def _split(self, tx: Txn, c: Cursor, i: int, ent: Entry, alloc: Allocator | None = None
               ) -> int:
        """Replace leaf ``ent`` (entry ``i`` of ``c``) by a table of next-level leaves
        mapping the same addresses (``split_large_page``); the huge page's span is flushed."""
        level, lower = c.level, c.level - 1
        if lower not in self.fmt.leaf_levels:
            raise EngineError(f"{self.fmt.name}: no leaves at level {lower} to split into")
        if ent.attrs.contiguous:
            self._uncont(tx, c, i)
        child = tx.new_table(alloc or self.alloc, lower)
        a = ent.attrs.with_(contiguous=False) if ent.attrs.contiguous else ent.attrs
        n, esz = self.geo.entries[lower], self.geo.size[lower]
        oas = np.arange(n, dtype=np.uint64) * np.uint64(esz) + np.uint64(ent.oa)
        tx.tables[child][:] = self.enc.encode(oas, a, lower)
        tx.link(c, i, child, self._table_raw(child, level))
        tx.flush(*c.span(i))
        return child

    def _maybe_free(self, tx: Txn, c: Cursor, i: int, child: int) -> bool:
        """Unlink and free ``child`` (entry ``i`` of ``c``) if empty and ours alone."""
        if tx.refcount(child) != 1 or tx.pinned(child):
            return False
        if tx.read_table(child, self.geo.entries[c.level - 1]).any():
            return False
        tx.write(c.table, c.n)[i] = 0
        tx.release(child, c.level - 1)
        return True

    def _finish(self, tx: Txn) -> None:
        tx.commit()
        self.gather.end_op()

    def _over(self, va: int, size: int, fn: Callable[[Txn, Cursor], T]) -> T:
        """Run the level function ``fn`` from the root cursor of [va, va+size) (granule
        aligned) in one transaction, committed when ``fn`` returns (``pt_walk_range``)."""
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        out = fn(tx, self._root(tx, lo, hi))
        self._finish(tx)
        return out

    # --- the contiguous hint (arm64 CONT_PTE / CONT_PMD) -------------------------------------
    def _cont_attrs(self, a: Attrs) -> Attrs:
        return self.fmt.normalize(a.with_(contiguous=True))

    def _cont_mask(self, level: int) -> int:
        """Raw bit(s) of the contiguous hint in a leaf at ``level`` (0 if none)."""
        m = self._cbit.get(level)
        if m is None:
            m = 0
            if self._cc[level] > 1 and level in self.fmt.leaf_levels:
                a = self.fmt.normalize(Attrs())
                m = self.fmt.leaf(0, self._cont_attrs(a), level) ^ self.fmt.leaf(0, a, level)
            self._cbit[level] = m
        return m

    def _uncont(self, tx: Txn, c: Cursor, i: int) -> None:
        """Clear the contiguous hint on the whole group holding entry ``i`` of ``c`` before
        part of it changes (contpte unfold: the group is flushed)."""
        cc = self._cc[c.level]
        mask = self._cont_mask(c.level) if cc > 1 else 0
        if not mask:
            return
        g0 = i - i % cc
        grp = c.raws(g0, g0 + cc)
        bits = grp & np.uint64(mask)
        if not bits.any():
            return
        hit = (bits != 0) & (self.fmt.kinds(grp, c.level) == LEAF)
        if hit.any():
            tx.write(c.table, c.n)[g0:g0 + cc] = np.where(hit, grp & ~np.uint64(mask), grp)
            tx.flush(*c.span(g0, g0 + cc))

    def _uncont_edges(self, tx: Txn, c: Cursor, partial: list[int]) -> None:
        """Unfold the contiguous groups an operation on ``c``'s range covers only in part."""
        cc = self._cc[c.level]
        if cc == 1 or not self._cont_mask(c.level):
            return
        i0, i1 = c.index, c.end_index
        for i in {i0, i1 - 1}:
            g0 = i - i % cc
            if i in partial or g0 < i0 or g0 + cc > i1:
                self._uncont(tx, c, i)

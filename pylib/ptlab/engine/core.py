"""The engine's core: a root with its format, memory, allocator and gather, and the helpers
every operation uses (range slicing, descent, split, contiguous-hint unfolding).

Internally VAs are *low* VAs: the canonical VA with the sign-extension / TTBR1 bits
removed (``va & (2**va_bits - 1)``), so a root spans [0, 2**va_bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..alloc import Allocator, NormalAllocator, PhysPool
from ..formats.base import Attrs, Entry, Format, Kind
from ..memory.base import PhysMemory
from ..tlb import Gather
from .errors import EngineError
from .leafenc import LeafEncoder
from .registry import memory_state, registry_for
from .txn import Txn

LEAF, TABLE, EMPTY_K = int(Kind.LEAF), int(Kind.TABLE), int(Kind.EMPTY)


class PageSizes(dict[int, int]):
    """Allowed leaf level -> page size, plus the levels where contiguous-hint groups may be
    written (``cont``)."""

    cont: frozenset[int] = frozenset()


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
    imported from a guest) to operate on it. ``gather`` collects flushes and table frees.
    ``table_attrs``: attributes of the table entries the engine creates (default
    ``fmt.table_attrs()``, e.g. x86 ``_KERNPG_TABLE``; pass US set for user tables).
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
        self.alloc = alloc if alloc is not None else default_allocator(mem, fmt.table_bytes)
        self.gather = gather if gather is not None else Gather()
        self.registry = registry_for(mem)
        self.table_attrs = fmt.normalize(table_attrs or fmt.table_attrs(), Kind.TABLE)
        self.enc = LeafEncoder(fmt)
        self.top = fmt.levels - 1
        self._n = [fmt.entries(lvl) for lvl in range(fmt.levels)]
        self._sh = [fmt.shift(lvl) for lvl in range(fmt.levels)]
        self._mask = fmt.va_span - 1
        self._cc = [fmt.contig_count(lvl) for lvl in range(fmt.levels)]
        self._cbit: dict[int, int] = {}
        self._ranges = fmt.va_ranges()
        self._default_sizes = PageSizes(fmt.page_sizes())
        self._norm: dict[Attrs, Attrs] = {}
        self._changers: dict[tuple, Callable[[Attrs], Attrs]] = {}
        self._decoded: list[dict[int, Entry]] = [{} for _ in range(fmt.levels)]
        if root is None:
            tx = Txn(self)
            fake = tx.new_table(self.alloc, self.top)
            tx.incref(fake)
            root = tx.commit()[fake]
        elif not isinstance(root, int) or root % fmt.table_bytes or not mem.contains(root, 8):
            raise EngineError(f"root {root!r} is not a table-aligned PA inside the memory")
        self.root: int = root

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
                lo = va & self._mask
                return lo, lo + size
        raise EngineError(
            f"[{va:#x}, {va + size:#x}) is not inside one VA range of {self.fmt.name}"
        )

    def _slots(self, level: int, tbase: int, s: int, e: int) -> tuple[list[int], int, int]:
        """Partially covered entry indices, and the fully covered block [f0, f1)."""
        sh = self._sh[level]
        m = (1 << sh) - 1
        i0 = (s - tbase) >> sh
        i1 = ((e - 1 - tbase) >> sh) + 1
        f0 = i0 if (s - tbase) & m == 0 else i0 + 1
        f1 = i1 if (e - tbase) & m == 0 else i1 - 1
        partial = [i0] if f0 > i0 else []
        if f1 < i1 and i1 - 1 not in partial:
            partial.append(i1 - 1)
        return partial, f0, f1

    def _entry(self, tx: Txn, tpa: int, level: int, idx: int) -> Entry:
        raw = int(tx.read(tpa, self._n[level])[idx])
        cache = self._decoded[level]
        ent = cache.get(raw)
        if ent is None:
            if len(cache) > 4096:
                cache.clear()
            ent = cache[raw] = self.fmt.decode(raw, level)
        return ent

    def _check_level(self, op: str, level: object, lowest: int = 1) -> None:
        """EngineError unless ``level`` is an int in lowest..top (``op`` names the caller)."""
        if not isinstance(level, int) or not lowest <= level <= self.top:
            raise EngineError(f"{op} level must be {lowest}..{self.top}, got {level!r}")

    def _entry_at(self, tx: Txn, va: int, level: int, op: str, wanted: str
                  ) -> tuple[int, int, int, Entry]:
        """(low VA, table PA, index, entry) of the entry at ``level`` (1..top) covering
        ``va``, reached through table entries only; EngineError ("``op`` level must be",
        "no ``wanted`` at level") otherwise."""
        self._check_level(op, level)
        lo, _ = self._span(va, 1 << self.fmt.page_shift, 1)
        tpa, lvl = self.root, self.top
        while True:
            idx = (lo >> self._sh[lvl]) & (self._n[lvl] - 1)
            ent = self._entry(tx, tpa, lvl, idx)
            if lvl == level:
                return lo, tpa, idx, ent
            if ent.kind is not Kind.TABLE:
                what = "a leaf" if ent.kind is Kind.LEAF else "nothing"
                raise EngineError(
                    f"VA {va:#x}: {what} at level {lvl}, no {wanted} at level {level}")
            tpa, lvl = self._child(ent, lvl, lo), lvl - 1

    def _child(self, ent: Entry, level: int, lo: int) -> int:
        if not ent.attrs.present:
            raise EngineError(
                f"VA {self._va(lo):#x}: non-present table entry at level {level}; "
                "cannot descend"
            )
        return ent.oa

    def _leaf_attrs(self, attrs: Attrs) -> Attrs:
        if not isinstance(attrs, Attrs):
            raise EngineError(f"attrs must be an Attrs, got {type(attrs).__name__}")
        if attrs.contiguous:
            raise EngineError("the contiguous hint is managed by the engine, not passed in")
        a = self._norm.get(attrs)
        if a is None:
            a = self._norm[attrs] = self.fmt.normalize(attrs)
        return a

    def _split(
        self, tx: Txn, tpa: int, idx: int, level: int, eb: int, ent: Entry,
        alloc: Allocator | None = None,
    ) -> int:
        """Replace leaf ``ent`` (entry ``idx`` of ``tpa``) by a table of next-level leaves."""
        lower = level - 1
        if lower not in self.fmt.leaf_levels:
            raise EngineError(f"{self.fmt.name}: no leaves at level {lower} to split into")
        if ent.attrs.contiguous:
            self._uncont(tx, tpa, level, eb - (idx << self._sh[level]), idx)
        child = tx.new_table(alloc or self.alloc, lower)
        a = ent.attrs.with_(contiguous=False) if ent.attrs.contiguous else ent.attrs
        n = self._n[lower]
        oas = np.arange(n, dtype=np.uint64) * np.uint64(1 << self._sh[lower]) + np.uint64(ent.oa)
        tx.tables[child][:] = self.enc.encode(oas, a, lower)
        tx.link(tpa, self._n[level], idx, level, child, self._table_raw(child, level))
        tx.flush(eb, eb + (1 << self._sh[level]))
        return child

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

    def _uncont(self, tx: Txn, tpa: int, level: int, tbase: int, idx: int) -> None:
        """Clear the contiguous hint on the whole group holding entry ``idx`` before part of
        it changes (contpte unfold: the group is flushed)."""
        cc = self._cc[level]
        mask = self._cont_mask(level) if cc > 1 else 0
        if not mask:
            return
        g0 = idx - idx % cc
        grp = tx.read(tpa, self._n[level])[g0:g0 + cc]
        bits = grp & np.uint64(mask)
        if not bits.any():
            return
        hit = (bits != 0) & (self.fmt.kinds(grp, level) == LEAF)
        if hit.any():
            w = tx.write(tpa, self._n[level])
            w[g0:g0 + cc] = np.where(hit, grp & ~np.uint64(mask), grp)
            sh = self._sh[level]
            tx.flush(tbase + (g0 << sh), tbase + ((g0 + cc) << sh))

    def _uncont_edges(
        self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int, partial: list[int]
    ) -> None:
        """Unfold the contiguous groups an operation on [s, e) covers only in part."""
        cc = self._cc[level]
        if cc == 1 or not self._cont_mask(level):
            return
        sh = self._sh[level]
        i0 = (s - tbase) >> sh
        i1 = ((e - 1 - tbase) >> sh) + 1
        for idx in {i0, i1 - 1}:
            g0 = idx - idx % cc
            if idx in partial or g0 < i0 or g0 + cc > i1:
                self._uncont(tx, tpa, level, tbase, idx)

    def _table_raw(self, child: int, level: int) -> int:
        return self.fmt.table(child, level, self.table_attrs)

    def _new_child(self, tx: Txn, tpa: int, idx: int, level: int, alloc: Allocator) -> int:
        child = tx.new_table(alloc, level - 1)
        tx.link(tpa, self._n[level], idx, level, child, self._table_raw(child, level))
        return child

    def _path(
        self, tx: Txn, lo: int, level: int, alloc: Allocator | None = None, pin: bool = False
    ) -> int:
        """The table at ``level`` whose span holds ``lo``, creating (or splitting) above it."""
        alloc = alloc or self.alloc
        tpa, lvl = self.root, self.top
        if pin:
            tx.pin(tpa)
        while lvl > level:
            idx = (lo >> self._sh[lvl]) & (self._n[lvl] - 1)
            ent = self._entry(tx, tpa, lvl, idx)
            eb = lo >> self._sh[lvl] << self._sh[lvl]
            if ent.kind is Kind.EMPTY:
                tpa = self._new_child(tx, tpa, idx, lvl, alloc)
            elif ent.kind is Kind.LEAF:
                tpa = self._split(tx, tpa, idx, lvl, eb, ent, alloc)
            else:
                tpa = self._child(ent, lvl, lo)
            lvl -= 1
            if pin:
                tx.pin(tpa)
        return tpa

    def _finish(self, tx: Txn) -> None:
        tx.commit()
        self.gather.end_op()

    def _maybe_free(self, tx: Txn, tpa: int, level: int, idx: int, child: int) -> bool:
        """Unlink and free ``child`` (entry ``idx`` of ``tpa``) if empty and ours alone."""
        if tx.refcount(child) != 1 or tx.pinned(child):
            return False
        if tx.read(child, self._n[level - 1]).any():
            return False
        tx.write(tpa, self._n[level])[idx] = 0
        tx.release(child, level - 1)
        return True

    def _leaf_slots(
        self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """(table, level, index, low VA) of every leaf overlapping [s, e), in VA order."""
        fmt, sh = self.fmt, self._sh[level]
        i0 = (s - tbase) >> sh
        i1 = ((e - 1 - tbase) >> sh) + 1
        blk = tx.read(tpa, self._n[level])[i0:i1]
        kinds = fmt.kinds(blk, level)
        for t in np.flatnonzero(kinds != EMPTY_K):
            idx = i0 + int(t)
            eb = tbase + (idx << sh)
            if kinds[t] == LEAF:
                yield tpa, level, idx, eb
                continue
            ent = self._entry(tx, tpa, level, idx)
            if ent.attrs.present:
                yield from self._leaf_slots(
                    tx, ent.oa, level - 1, eb, max(s, eb), min(e, eb + (1 << sh))
                )

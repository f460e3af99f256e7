"""map and unmap: the largest page sizes alignment allows; partial unmaps split huge
leaves; emptied tables are freed through the gather."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..formats.base import Attrs, Kind
from ..walk.cursor import Cursor
from .core import TABLE, PageSizes, TableCore
from .errors import EngineError, MappingExists
from .txn import Txn


@dataclass(slots=True)
class MapArgs:
    """What one map operation writes: through ``tx``, leaves with OA = low VA + ``delta``
    and attributes ``attrs``, at the levels ``allowed``; ``replace`` existing mappings."""

    tx: Txn
    delta: int
    attrs: Attrs
    allowed: PageSizes
    replace: bool
    lowest: int  # min(allowed): no leaf below this level


class MapOps(TableCore):
    """map / unmap (mixed into :class:`~ptlab.engine.PageTable`)."""

    def page_sizes(self) -> dict[int, tuple[int, bool]]:
        """Every page size map() accepts -> (level, contiguous): the format's leaf sizes and
        its contiguous-hint group sizes (arm64 CONT_PTE / CONT_PMD)."""
        out = {size: (lvl, False) for lvl, size in self.fmt.page_sizes().items()}
        for lvl, size in self.fmt.page_sizes().items():
            if self._cc[lvl] > 1:
                out[size * self._cc[lvl]] = (lvl, True)
        return out

    def _allowed(self, page_sizes: Iterable[int] | None) -> PageSizes:
        if page_sizes is None:
            return self._default_sizes
        out = PageSizes()
        known = self.page_sizes()
        cont = set()
        for ps in page_sizes:
            if ps not in known:
                valid = ", ".join(f"{v:#x}" for v in sorted(known))
                raise EngineError(f"{self.fmt.name} has no page size {ps!r} (valid: {valid})")
            lvl, is_cont = known[ps]
            if is_cont:
                cont.add(lvl)
            out[lvl] = self.fmt.entry_size(lvl)
        if not out:
            raise EngineError("page_sizes is empty")
        out.cont = frozenset(cont)
        return out

    def map(
        self,
        va: int,
        pa: int,
        size: int,
        attrs: Attrs,
        page_sizes: Iterable[int] | None = None,
        replace: bool = False,
    ) -> None:
        """Map [va, va+size) to [pa, pa+size) with the largest page sizes alignment allows.

        ``page_sizes`` (default: every leaf size of the format, no contiguous hint) may
        include contiguous-hint sizes (see :meth:`page_sizes`); groups are then written
        where VA and PA alignment allow. Existing mappings in the range raise
        :class:`MappingExists` unless ``replace``. Existing tables are descended into
        (never replaced by a bigger leaf).
        """
        if page_sizes is not None:
            page_sizes = list(page_sizes)
        allowed = self._allowed(page_sizes)
        g = min(page_sizes) if page_sizes else min(allowed.values())
        lo, hi = self._span(va, size, g)
        if not isinstance(pa, int | np.integer) or pa < 0 or pa % g:
            raise EngineError(f"PA {pa!r} is not a non-negative {g:#x}-aligned address")
        pa = int(pa)
        if pa + (hi - lo) > 1 << self.fmt.pa_bits:
            raise EngineError(f"PA range ends above 2**{self.fmt.pa_bits}")
        a = self._leaf_attrs(attrs)
        tx = Txn(self)
        m = MapArgs(tx, pa - lo, a, allowed, replace, min(allowed))
        self._map(m, self._root(tx, lo, hi))
        self._finish(tx)

    def _map(self, m: MapArgs, c: Cursor) -> None:
        """Map ``c``'s range: leaves where the whole entry is covered and allowed, else one
        level down (creating, or with ``replace`` splitting, what is in the way)."""
        level, tx = c.level, m.tx
        if level < m.lowest:
            raise EngineError(
                f"VA {self._va(c.start):#x}: a table down to level {level} is in the way of "
                f"page sizes {sorted(m.allowed.values())}"
            )
        partial, f0, f1 = self._partition(tx, c)
        for i in partial:
            self._map_child(m, c, i)
        if f0 >= f1:
            return
        esz = self.geo.size[level]
        if not (level in m.allowed and m.delta % esz == 0):
            for i in range(f0, f1):
                self._map_child(m, c, i)
            return
        blk, kinds, leaves, tables = self._block(c, f0, f1)
        if leaves.size and not m.replace:
            raise MappingExists(f"VA {self._va(c.va(f0 + int(leaves[0]))):#x} is already mapped")
        oa0 = c.va(f0) + m.delta
        raws = self.enc.encode(
            np.arange(f1 - f0, dtype=np.uint64) * np.uint64(esz) + np.uint64(oa0), m.attrs, level
        )
        cc = self._cc[level]
        if level in m.allowed.cont and m.delta % (esz * cc) == 0:
            g0, g1 = -(-f0 // cc) * cc, f1 // cc * cc
            if g0 < g1:
                groups = (kinds[g0 - f0:g1 - f0] != TABLE).reshape(-1, cc).all(axis=1)
                sel = np.zeros(f1 - f0, dtype=bool)
                sel[g0 - f0:g1 - f0] = np.repeat(groups, cc)
                if sel.any():
                    oas = np.flatnonzero(sel).astype(np.uint64) * np.uint64(esz) + np.uint64(oa0)
                    raws[sel] = self.enc.encode(oas, self._cont_attrs(m.attrs), level)
        if tables:
            raws = np.where(kinds == TABLE, blk, raws)
        if leaves.size:
            tx.flush(*c.span(f0 + int(leaves[0]), f0 + int(leaves[-1]) + 1))
        tx.write(c.table, c.n)[f0:f1] = raws
        for t in tables:
            self._map(m, self._descend(c, f0 + t))

    def _map_child(self, m: MapArgs, c: Cursor, i: int) -> None:
        """Map the part of ``c``'s range inside entry ``i`` one level down."""
        if c.level == 0:
            raise EngineError(f"VA {self._va(c.clip(i)[0]):#x}: cannot map below the last level")
        ent = c.entry(i)
        if ent.kind is Kind.EMPTY:
            child = self._new_child(m.tx, c, i, self.alloc)
        elif ent.kind is Kind.LEAF:
            if not m.replace:
                raise MappingExists(f"VA {self._va(c.clip(i)[0]):#x} is already mapped")
            child = self._split(m.tx, c, i, ent)
        else:
            child = self._child(c, i, ent)
        self._map(m, c.descend(i, child))

    def unmap(self, va: int, size: int, *, free_tables: bool = True) -> None:
        """Unmap [va, va+size). Huge leaves partly inside are split, the rest stays mapped.

        With ``free_tables`` tables left empty are unlinked and freed through the gather
        (never pinned/preallocated ones, never ones another root still references).
        """
        self._over(va, size, lambda tx, c: self._unmap(tx, c, free_tables))

    def _unmap(self, tx: Txn, c: Cursor, free: bool) -> None:
        partial, f0, f1 = self._partition(tx, c)
        for i, d in self._edges(tx, c, partial):
            self._unmap(tx, d, free)
            if free:
                self._maybe_free(tx, c, i, d.table)
        if f0 >= f1:
            return
        _, _, leaves, tables = self._block(c, f0, f1)
        if leaves.size:
            tx.write(c.table, c.n)[f0 + leaves] = 0
            tx.flush(*c.span(f0 + int(leaves[0]), f0 + int(leaves[-1]) + 1))
        whole_ptes = c.level == 1 and free  # pte tables wholly unmapped go in one step
        n0 = self.geo.entries[0]
        for t in tables:
            i = f0 + t
            child = self._child(c, i, c.entry(i))
            if whole_ptes and tx.refcount(child) == 1 and not tx.pinned(child):
                if tx.read_table(child, n0).any():  # flush what it mapped
                    tx.flush(*c.span(i))
                tx.write(c.table, c.n)[i] = 0
                tx.release(child, 0)
                continue
            self._unmap(tx, c.descend(i, child), free)
            if free:
                self._maybe_free(tx, c, i, child)

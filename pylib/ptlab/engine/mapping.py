"""map and unmap: the largest page sizes alignment allows; partial unmaps split huge
leaves; emptied tables are freed through the gather."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..formats.base import Attrs, Kind
from .core import LEAF, TABLE, PageSizes, TableCore
from .errors import EngineError, MappingExists
from .txn import Txn


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
        self._map(tx, self.root, self.top, 0, lo, hi, pa - lo, a, allowed, replace)
        self._finish(tx)

    def _map(
        self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int, delta: int,
        a: Attrs, allowed: PageSizes, replace: bool,
    ) -> None:
        if level < min(allowed):
            raise EngineError(
                f"VA {self._va(s):#x}: a table down to level {level} is in the way of "
                f"page sizes {sorted(allowed.values())}"
            )
        fmt, n, sh = self.fmt, self._n[level], self._sh[level]
        esz = 1 << sh
        partial, f0, f1 = self._slots(level, tbase, s, e)
        self._uncont_edges(tx, tpa, level, tbase, s, e, partial)
        for idx in partial:
            eb = tbase + (idx << sh)
            self._map_child(
                tx, tpa, level, idx, eb, max(s, eb), min(e, eb + esz), delta, a, allowed, replace
            )
        if f0 >= f1:
            return
        if not (level in allowed and delta % esz == 0):
            for idx in range(f0, f1):
                eb = tbase + (idx << sh)
                self._map_child(tx, tpa, level, idx, eb, eb, eb + esz, delta, a, allowed, replace)
            return
        blk = tx.read(tpa, n)[f0:f1]
        kinds = fmt.kinds(blk, level)
        leaves = np.flatnonzero(kinds == LEAF)
        if leaves.size and not replace:
            raise MappingExists(f"VA {self._va(tbase + ((f0 + int(leaves[0])) << sh)):#x} "
                                "is already mapped")
        tables = np.flatnonzero(kinds == TABLE)
        oa0 = tbase + (f0 << sh) + delta
        raws = self.enc.encode(
            np.arange(f1 - f0, dtype=np.uint64) * np.uint64(esz) + np.uint64(oa0), a, level
        )
        cc = self._cc[level]
        if level in allowed.cont and delta % (esz * cc) == 0:
            g0, g1 = -(-f0 // cc) * cc, f1 // cc * cc
            if g0 < g1:
                groups = (kinds[g0 - f0:g1 - f0] != TABLE).reshape(-1, cc).all(axis=1)
                sel = np.zeros(f1 - f0, dtype=bool)
                sel[g0 - f0:g1 - f0] = np.repeat(groups, cc)
                if sel.any():
                    oas = np.flatnonzero(sel).astype(np.uint64) * np.uint64(esz) + np.uint64(oa0)
                    raws[sel] = self.enc.encode(oas, self._cont_attrs(a), level)
        if tables.size:
            child_oas = [int(x) for x in fmt.oas(blk[tables], level)]
            raws = np.where(kinds == TABLE, blk, raws)
        if leaves.size:
            tx.flush(tbase + ((f0 + int(leaves[0])) << sh),
                     tbase + ((f0 + int(leaves[-1]) + 1) << sh))
        tx.write(tpa, n)[f0:f1] = raws
        for t, child in zip(tables, child_oas if tables.size else (), strict=True):
            idx = f0 + int(t)
            eb = tbase + (idx << sh)
            self._child(self._entry(tx, tpa, level, idx), level, eb)
            self._map(tx, child, level - 1, eb, eb, eb + esz, delta, a, allowed, replace)

    def _map_child(
        self, tx: Txn, tpa: int, level: int, idx: int, eb: int, s: int, e: int, delta: int,
        a: Attrs, allowed: PageSizes, replace: bool,
    ) -> None:
        if level == 0:
            raise EngineError(f"VA {self._va(s):#x}: cannot map below the last level")
        ent = self._entry(tx, tpa, level, idx)
        if ent.kind is Kind.EMPTY:
            child = self._new_child(tx, tpa, idx, level, self.alloc)
        elif ent.kind is Kind.LEAF:
            if not replace:
                raise MappingExists(f"VA {self._va(s):#x} is already mapped")
            child = self._split(tx, tpa, idx, level, eb, ent)
        else:
            child = self._child(ent, level, s)
        self._map(tx, child, level - 1, eb, s, e, delta, a, allowed, replace)

    def unmap(self, va: int, size: int, *, free_tables: bool = True) -> None:
        """Unmap [va, va+size). Huge leaves partly inside are split, the rest stays mapped.

        With ``free_tables`` tables left empty are unlinked and freed through the gather
        (never pinned/preallocated ones, never ones another root still references).
        """
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        self._unmap(tx, self.root, self.top, 0, lo, hi, free_tables)
        self._finish(tx)

    def _unmap(
        self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int, free: bool
    ) -> None:
        fmt, n, sh = self.fmt, self._n[level], self._sh[level]
        esz = 1 << sh
        partial, f0, f1 = self._slots(level, tbase, s, e)
        self._uncont_edges(tx, tpa, level, tbase, s, e, partial)
        for idx in partial:
            ent = self._entry(tx, tpa, level, idx)
            if ent.kind is Kind.EMPTY:
                continue
            eb = tbase + (idx << sh)
            if ent.kind is Kind.LEAF:
                child = self._split(tx, tpa, idx, level, eb, ent)
            else:
                child = self._child(ent, level, eb)
            self._unmap(tx, child, level - 1, eb, max(s, eb), min(e, eb + esz), free)
            if free:
                self._maybe_free(tx, tpa, level, idx, child)
        if f0 >= f1:
            return
        blk = tx.read(tpa, n)[f0:f1]
        kinds = fmt.kinds(blk, level)
        leaves = np.flatnonzero(kinds == LEAF)
        tables = np.flatnonzero(kinds == TABLE)
        child_oas = [int(x) for x in fmt.oas(blk[tables], level)] if tables.size else []
        if leaves.size:
            w = tx.write(tpa, n)
            w[f0 + leaves] = 0
            tx.flush(tbase + ((f0 + int(leaves[0])) << sh),
                     tbase + ((f0 + int(leaves[-1]) + 1) << sh))
        for t, child in zip(tables, child_oas, strict=True):
            idx = f0 + int(t)
            eb = tbase + (idx << sh)
            self._child(self._entry(tx, tpa, level, idx), level, eb)
            if level == 1 and free and tx.refcount(child) == 1 and not tx.pinned(child):
                if tx.read(child, self._n[0]).any():
                    tx.flush(eb, eb + esz)
                tx.write(tpa, n)[idx] = 0
                tx.release(child, 0)
                continue
            self._unmap(tx, child, level - 1, eb, eb, eb + esz, free)
            if free:
                self._maybe_free(tx, tpa, level, idx, child)

"""Shape changes that keep the mapping: split a huge leaf, collapse a table back into one,
free empty tables, destroy a root."""

from __future__ import annotations

import numpy as np

from ..formats.base import Kind
from .core import LEAF, TABLE, TableCore
from .errors import EngineError
from .txn import Txn


class ShapeOps(TableCore):
    """split / collapse / free_empty / destroy (mixed into :class:`~ptlab.engine.PageTable`)."""

    def split(self, va: int, level: int) -> None:
        """Split the huge leaf at ``level`` mapping ``va`` into a table of next-level leaves
        with the same attributes (``split_large_page``)."""
        tx = Txn(self)
        lo, tpa, idx, ent = self._entry_at(tx, va, level, "split", "leaf")
        if ent.kind is not Kind.LEAF:
            raise EngineError(f"VA {va:#x}: no leaf at level {level} to split")
        self._split(tx, tpa, idx, level, lo >> self._sh[level] << self._sh[level], ent)
        self._finish(tx)

    def collapse(self, va: int, size: int) -> int:
        """Merge every table in [va, va+size) whose entries are all leaves with equal
        attributes and contiguous, aligned output addresses into one huge leaf (bottom-up).
        Shared and pinned tables are left alone. Returns the number of tables collapsed."""
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        count = self._collapse(tx, self.root, self.top, 0, lo, hi)
        self._finish(tx)
        return count

    def _collapse(self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int) -> int:
        if level == 0:
            return 0
        fmt, n, sh = self.fmt, self._n[level], self._sh[level]
        esz = 1 << sh
        i0 = (s - tbase) >> sh
        i1 = ((e - 1 - tbase) >> sh) + 1
        blk = tx.read(tpa, n)[i0:i1]
        tables = np.flatnonzero(fmt.kinds(blk, level) == TABLE)
        count = 0
        for t in tables:
            idx = i0 + int(t)
            eb = tbase + (idx << sh)
            ent = self._entry(tx, tpa, level, idx)
            if not ent.attrs.present:
                continue
            child = ent.oa
            count += self._collapse(tx, child, level - 1, eb, max(s, eb), min(e, eb + esz))
            if s <= eb and eb + esz <= e and self._collapsible(tx, child, level):
                ct = tx.read(child, self._n[level - 1])
                leaf = fmt.decode(int(ct[0]), level - 1)
                a = leaf.attrs.with_(contiguous=False) if leaf.attrs.contiguous else leaf.attrs
                tx.write(tpa, n)[idx] = self.enc.one(leaf.oa, a, level)
                tx.release(child, level - 1)
                tx.flush(eb, eb + esz)
                count += 1
        return count

    def _collapsible(self, tx: Txn, child: int, level: int) -> bool:
        fmt = self.fmt
        if level not in fmt.leaf_levels or tx.refcount(child) != 1 or tx.pinned(child):
            return False
        lower = level - 1
        ct = tx.read(child, self._n[lower])
        if not (fmt.kinds(ct, lower) == LEAF).all():
            return False
        keys = fmt.attr_keys(ct, lower)
        if not (keys == keys[0]).all():
            return False
        oas = fmt.oas(ct, lower)
        oa0 = int(oas[0])
        if oa0 % (1 << self._sh[level]):
            return False
        want = np.arange(ct.size, dtype=np.uint64) * np.uint64(1 << self._sh[lower])
        return bool((oas - np.uint64(oa0) == want).all())

    def free_empty(self, va: int, size: int) -> int:
        """Unlink and free tables in [va, va+size) that hold no entries (bottom-up)."""
        lo, hi = self._span(va, size, self.fmt.table_bytes)
        tx = Txn(self)
        count = self._free_empty(tx, self.root, self.top, 0, lo, hi)
        self._finish(tx)
        return count

    def _free_empty(self, tx: Txn, tpa: int, level: int, tbase: int, s: int, e: int) -> int:
        if level == 0:
            return 0
        sh = self._sh[level]
        i0 = (s - tbase) >> sh
        i1 = ((e - 1 - tbase) >> sh) + 1
        blk = tx.read(tpa, self._n[level])[i0:i1]
        count = 0
        for t in np.flatnonzero(self.fmt.kinds(blk, level) == TABLE):
            idx = i0 + int(t)
            eb = tbase + (idx << sh)
            ent = self._entry(tx, tpa, level, idx)
            if not ent.attrs.present:
                continue
            count += self._free_empty(tx, ent.oa, level - 1, eb, max(s, eb),
                                      min(e, eb + (1 << sh)))
            if s <= eb and eb + (1 << sh) <= e:
                count += self._maybe_free(tx, tpa, level, idx, ent.oa)
        return count

    def destroy(self) -> None:
        """Drop this root: free every table only it references (shared ones survive while
        another root holds them), then flush."""
        if self.root is None:
            raise EngineError("page table already destroyed")
        tx = Txn(self)
        tx.release(self.root, self.top)
        self._finish(tx)
        self.root = None  # type: ignore[assignment]
        self.gather.flush()

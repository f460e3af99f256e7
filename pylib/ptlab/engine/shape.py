"""Shape changes that keep the mapping: split a huge leaf, collapse a table back into one,
free empty tables, destroy a root."""

from __future__ import annotations

import numpy as np

from ..formats.base import Kind
from ..walk.cursor import Cursor
from .core import LEAF, TableCore
from .errors import EngineError
from .txn import Txn


class ShapeOps(TableCore):
    """split / collapse / free_empty / destroy (mixed into :class:`~ptlab.engine.PageTable`)."""

    def split(self, va: int, level: int) -> None:
        """Split the huge leaf at ``level`` mapping ``va`` into a table of next-level leaves
        with the same attributes (``split_large_page``)."""
        tx = Txn(self)
        c = self._seek_entry(tx, va, level, "split", "leaf")
        ent = c.entry()
        if ent.kind is not Kind.LEAF:
            raise EngineError(f"VA {va:#x}: no leaf at level {level} to split")
        self._split(tx, c, c.index, ent)
        self._finish(tx)

    def collapse(self, va: int, size: int) -> int:
        """Merge every table in [va, va+size) whose entries are all leaves with equal
        attributes and contiguous, aligned output addresses into one huge leaf (bottom-up).
        Shared and pinned tables are left alone. Returns the number of tables collapsed."""
        return self._over(va, size, self._collapse)

    def _collapse(self, tx: Txn, c: Cursor) -> int:
        count = 0
        for i, d in c.children():
            count += self._collapse(tx, d)
            if c.fully_covered(i) and self._collapsible(tx, d):
                leaf = self.geo.decode(int(d.table_raws()[0]), d.level)
                a = leaf.attrs.with_(contiguous=False) if leaf.attrs.contiguous else leaf.attrs
                tx.write(c.table, c.n)[i] = self.enc.one(leaf.oa, a, c.level)
                tx.release(d.table, d.level)
                tx.flush(*c.span(i))
                count += 1
        return count

    def _collapsible(self, tx: Txn, d: Cursor) -> bool:
        """Whether table ``d`` can become one leaf in its parent: ours alone, unpinned,
        all leaves, equal attributes, output addresses contiguous from an aligned start."""
        fmt, lower = self.fmt, d.level
        if (lower + 1 not in fmt.leaf_levels or tx.refcount(d.table) != 1
                or tx.pinned(d.table)):
            return False
        ct = d.table_raws()
        if not (fmt.kinds(ct, lower) == LEAF).all():
            return False
        keys = fmt.attr_keys(ct, lower)
        if not (keys == keys[0]).all():
            return False
        oas = fmt.oas(ct, lower)
        oa0 = int(oas[0])
        if oa0 % self.geo.size[lower + 1]:
            return False
        want = np.arange(ct.size, dtype=np.uint64) * np.uint64(d.entry_size)
        return bool((oas - np.uint64(oa0) == want).all())

    def free_empty(self, va: int, size: int) -> int:
        """Unlink and free tables in [va, va+size) that hold no entries (bottom-up)."""
        return self._over(va, size, self._free_empty)

    def _free_empty(self, tx: Txn, c: Cursor) -> int:
        count = 0
        for i, d in c.children():
            count += self._free_empty(tx, d)
            if c.fully_covered(i):
                count += self._maybe_free(tx, c, i, d.table)
        return count

    def destroy(self) -> None:
        """Drop this root: free every table only it references (shared ones survive while
        another root holds them), then flush. A view of a root this PageTable did not
        create (``root=`` given) is only dropped: the root's owner keeps its tables."""
        self._alive()
        if not self.owns_root:
            self.root = None  # type: ignore[assignment]
            return
        tx = Txn(self)
        tx.release(self.root, self.top)
        self._finish(tx)
        self.root = None  # type: ignore[assignment]
        self.gather.flush()

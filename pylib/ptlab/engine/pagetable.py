"""PageTable: the generic engine's operations on one root of any format.

Every operation runs as a :class:`~ptlab.engine.txn.Txn`: it works out its changes on an
overlay (validating everything and creating placeholder tables for what it needs), then
reserves all new table pages in one call per allocator and only then writes. So an
operation that fails — overlap, bad argument, or no memory for a table — writes nothing.
The operations live in mixins, one family per module: :mod:`.mapping` (map, unmap),
:mod:`.protect` (protect, apply, set_table_attrs), :mod:`.shape` (split, collapse,
free_empty, destroy), :mod:`.sharing` (share, unshare, clone, preallocate).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..formats.base import Entry
from ..walk import Run, Trace, Walker, translate
from .core import TABLE, PageSizes, default_allocator
from .errors import EngineError, MappingExists, NotMapped
from .mapping import MapOps
from .protect import ApplyFn, AttrChange, ProtectOps
from .shape import ShapeOps
from .txn import Txn

__all__ = [
    "ApplyFn", "AttrChange", "EngineError", "MappingExists", "NotMapped", "PageSizes",
    "PageTable", "default_allocator",
]


class PageTable(MapOps, ProtectOps, ShapeOps):
    """One page-table root in ``mem`` with format ``fmt`` (see :class:`TableCore` for the
    constructor: ``PageTable(fmt, mem, root=None, alloc=None, gather=None, *,
    table_attrs=None)``)."""

    def leaves(
        self, va: int | None = None, size: int | None = None
    ) -> Iterator[tuple[int, int, Entry]]:
        """(va, level, entry) of every leaf overlapping the range (default: everything)."""
        ranges = [(va, size)] if va is not None else [
            (s, e - s) for s, e in self.fmt.va_ranges()
        ]
        tx = Txn(self)
        for v, sz in ranges:
            lo, hi = self._span(v, sz if sz is not None else 1, 1)
            for tpa, level, idx, eb in self._leaf_slots(tx, self.root, self.top, 0, lo, hi):
                yield self._va(eb), level, self._entry(tx, tpa, level, idx)

    def lookup(self, va: int) -> tuple[int, Entry] | None:
        """(level, leaf entry) translating ``va``, or None."""
        for _, level, ent in self.leaves(va - va % (1 << self.fmt.page_shift),
                                         1 << self.fmt.page_shift):
            return level, ent
        return None

    def table_count(self) -> int:
        """Tables reachable from this root (root included)."""
        tx = Txn(self)
        seen: set[int] = set()

        def walk(tpa: int, level: int) -> None:
            seen.add(tpa)
            if level == 0:
                return
            t = tx.read(tpa, self._n[level])
            nz = np.flatnonzero(self.fmt.kinds(t, level) == TABLE)
            for oa in self.fmt.oas(t[nz], level):
                if int(oa) not in seen:
                    walk(int(oa), level - 1)

        walk(self.root, self.top)
        return len(seen)

    def share(self, other: PageTable, va: int, size: int, level: int, *,
              replace: bool = False) -> None:
        from .sharing import share

        share(self, other, va, size, level, replace=replace)

    def unshare(self, va: int, size: int, level: int) -> int:
        from .sharing import unshare

        return unshare(self, va, size, level)

    def clone(self, other: PageTable, va: int, size: int, *, replace: bool = False) -> int:
        from .sharing import clone

        return clone(self, other, va, size, replace=replace)

    def preallocate(self, va: int, size: int, level: int = 0) -> int:
        from .sharing import preallocate

        return preallocate(self, va, size, level)

    def translate(self, va: int) -> Trace:
        """The walker's trace of ``va`` through this root."""
        return translate(self.fmt, self.mem, self.root, va)

    def runs(self, start: int | None = None, end: int | None = None, **kw: Any) -> list[Run]:
        """Leaf runs of this root in [start, end) (``Walker(**kw).runs``)."""
        return list(Walker(self.fmt, self.mem, self.root, **kw).runs(start, end))

    def __repr__(self) -> str:
        root = "destroyed" if self.root is None else f"{self.root:#x}"
        return f"<PageTable {self.fmt.name} root={root}>"

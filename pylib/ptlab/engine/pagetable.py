"""PageTable: the generic engine's operations on one root of any format.

Every operation runs as a :class:`~ptlab.engine.txn.Txn`: it works out its changes on an
overlay (validating everything and creating placeholder tables for what it needs), then
reserves all new table pages in one call per allocator and only then writes. So an
operation that fails — overlap, bad argument, or no memory for a table — writes nothing.
The operations live in mixins, one family per module: :mod:`.mapping` (map, unmap),
:mod:`.protect` (protect, apply, set_table_attrs), :mod:`.shape` (split, collapse,
free_empty, destroy), :mod:`.sharing` (share, unshare, clone, preallocate). Each is a level
function on a :class:`~ptlab.walk.cursor.Cursor` reading through the transaction: index
ranges from ``partition()``, children from ``descend()``, single entries from ``seek()``.

Flushes (the model's ``mmu_gather``): an operation that changed a present translation or
freed a table ends with exactly one flush (none inside :meth:`Gather.batch` or no-flush
mode until those end; none when nothing changed), its ranges coalesced from: each changed
or removed leaf's span; a split huge leaf's whole span; an unfolded contiguous group's span;
a collapsed table's span; an upper entry's span when its restrictions change; a freed pte
table's span when it still held leaves. Freed table pages go back after that flush.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..formats.base import Entry
from ..walk import Run, Trace, Walker, translate
from ..walk.cursor import Cursor, leaf_cursors, walk_range
from .core import PageSizes, default_allocator
from .errors import EngineError, MappingExists, NotMapped
from .mapping import MapOps
from .protect import ApplyFn, AttrChange, ProtectOps
from .shape import ShapeOps
from .txn import Txn

U64 = (1 << 64) - 1

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
        """(va, level, entry) of every leaf overlapping the range (default: everything),
        present or not, in VA order."""
        self._alive()
        ranges = [(va, size)] if va is not None else [
            (s, e - s) for s, e in self.fmt.va_ranges()
        ]
        tx = Txn(self)
        for v, sz in ranges:
            lo, hi = self._span(v, sz if sz is not None else 1, 1)
            for c, i in leaf_cursors(self._root(tx, lo, hi)):
                yield self._va(c.va(i)), c.level, c.entry(i)

    def lookup(self, va: int) -> tuple[int, Entry] | None:
        """(level, leaf entry) translating ``va``, or None when ``va`` is not translated.

        One answer with :meth:`translate`: ``lookup(va)`` is not None exactly when
        ``translate(va).mapped``, and then it is ``(trace.level, trace.steps[-1].entry)``.
        A *non-present leaf* (e.g. x86's L1TF-inverted secretmem / set_direct_map_invalid
        pte) is not a translation: lookup returns None and translate faults "not present"
        (the entry stays visible in the trace's last step; :meth:`leaves` lists it)."""
        t = self.translate(va)
        return None if t.fault is not None else (t.level, t.steps[-1].entry)  # type: ignore[return-value]

    def table_count(self) -> int:
        """Tables reachable from this root (root included; tables behind non-present table
        entries too, since they are still owned)."""
        self._alive()
        seen: set[int] = set()

        def visit(c: Cursor) -> None:
            seen.add(c.table)
            for _, d in c.children(present=False):
                if d.table not in seen:
                    visit(d)

        walk_range(self.geo, Txn(self), self.root, 0, self.fmt.va_span, visit)
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
        """The walker's trace of ``va`` through this root (see :func:`ptlab.walk.translate`:
        ``fault`` is None only for a present leaf; a non-present leaf faults "not present"
        with its level, PA and attributes still filled in). Agrees with :meth:`lookup`."""
        self._alive()
        if isinstance(va, bool) or not isinstance(va, int | np.integer) or not 0 <= va <= U64:
            raise EngineError(f"VA must be an integer in 0..2**64-1, got {va!r}")
        return translate(self.fmt, self.mem, self.root, int(va))

    def runs(self, start: int | None = None, end: int | None = None, **kw: Any) -> list[Run]:
        """Leaf runs of this root in [start, end) (``Walker(**kw).runs``)."""
        self._alive()
        return list(Walker(self.fmt, self.mem, self.root, **kw).runs(start, end))

    def __repr__(self) -> str:
        root = "destroyed" if self.root is None else f"{self.root:#x}"
        return f"<PageTable {self.fmt.name} root={root}>"

"""The walker's cursor over a batch of tables (:class:`Batch`) and the run arrays of a scanned
batch (:class:`Runs`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..formats.base import Attrs
from .cursor import Cursor, Geometry, TableReader

__all__ = ["Batch", "Runs"]


class Batch(Cursor):
    """The walker's cursor: ``tables``, VA-consecutive tables of one level walked as one (entry
    ``i`` of the batch is entry ``i % n`` of table ``i // n``), the range clipped to their span,
    with the attrs of the table entries above (``ctx``) and the tables a child table may not
    be (``path``: the walk path above)."""

    __slots__ = ("_below", "ctx", "path", "tables")

    def __init__(self, geo: Geometry, mem: TableReader, level: int, tables: list[int],
                 base: int, start: int, end: int, ctx: tuple[Attrs, ...],
                 path: frozenset[int]) -> None:
        self.geo, self.level, self.base = geo, level, base
        stop = self.va(len(tables) * geo.entries[level])  # low VA past the last table
        super().__init__(geo, mem, level, tables[0], base, max(start, base), min(end, stop))
        self.tables, self.ctx, self.path = tables, ctx, path
        self._below: tuple[frozenset[int], np.ndarray] | None = None

    def table_entry(self, j: int) -> int:
        """Batch index of table ``j``'s entry 0."""
        return j * self.n

    def below(self) -> tuple[frozenset[int], np.ndarray]:
        """The tables a child table may not be (the path and this batch's tables), as a set
        and as an array."""
        if self._below is None:
            here = self.path | frozenset(self.tables)
            self._below = here, np.fromiter(here, dtype=np.uint64, count=len(here))
        return self._below

    def table_span(self) -> tuple[int, int]:
        """[j0, j1): the tables the range touches."""
        if self.start >= self.end:
            return 0, 0
        n = self.n
        return self.index // n, -(-self.end_index // n)

    def sub(self, j0: int, j1: int) -> Batch:
        """Tables [j0, j1) as a batch of their own."""
        return Batch(self.geo, self.mem, self.level, self.tables[j0:j1],
                     self.va(self.table_entry(j0)),
                     self.start, self.end, self.ctx, self.path)

    def entry_pa(self, i: int | None = None) -> int:
        """PA of batch entry ``i`` (default: the current one)."""
        t, k = divmod(self.index if i is None else i, self.n)
        return self.tables[t] + 8 * k

    def descend_run(self, i: int, children: list[int], attrs: Attrs) -> Batch:
        """The batch of ``children``, the tables entries i, i+1, ... point to (``descend``
        for a run of table entries whose own attrs are ``attrs``)."""
        return Batch(self.geo, self.mem, self.level - 1, children, self.va(i), self.start,
                     self.end, (*self.ctx, attrs), self.below()[0])


class Runs(NamedTuple):
    """The runs of a scanned batch: each run's first and past-the-end entry (indices from the
    batch cursor's ``index``), and the kind, attr key, raw entry and output address of its
    first entry."""

    starts: np.ndarray
    ends: np.ndarray
    kinds: np.ndarray
    keys: np.ndarray
    raws: np.ndarray
    oas: np.ndarray

    def part(self, a: int, z: int) -> Runs:
        """Runs a..z-1."""
        return Runs(*(c[a:z] for c in self))

"""Leaf runs: what a walk yields (:class:`Run`), the one rule of what continues a run
(:func:`continues`), the anomalies a walk records, and the :class:`RunTable` holding a whole
walk's runs compactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat, starmap
from typing import Any, overload

import numpy as np

from ..formats.base import Attrs, Kind

__all__ = ["HOLE_ATTRS", "Anomaly", "Run", "RunBlock", "RunRow", "RunTable", "continues"]

HOLE_ATTRS = Attrs(present=False)  # attrs of a hole run (no entry at all)
_EMPTY, _LEAF = int(Kind.EMPTY), int(Kind.LEAF)


def continues(prev_kind: Any, prev_key: Any, kind: Any, key: Any, adjacent: Any,
              contiguous: Any) -> Any:
    """The run rule: whether a segment (an entry, a run) continues the run before it.

    It must start where that run ends, at the same level (``adjacent``), and be of the same
    kind; a hole (EMPTY) continues a hole; a table or a leaf needs an equal key (the attr keys
    of raw entries, or the comparison ids of decoded leaves) and a leaf also an output address
    that continues the run's (``contiguous``). Elementwise on numpy arrays (the boundary pairs
    of a batch) as on scalars (the open run and the next segment): every path of the walker
    uses this one definition."""
    same = (kind == prev_kind) & (
        (kind == _EMPTY) | ((key == prev_key) & ((kind != _LEAF) | contiguous)))
    return same if adjacent is True else adjacent & same


@dataclass(frozen=True, slots=True)
class Run:
    """A VA range of leaves with equal effective attrs and page size, contiguous in PA.

    With ``Walker(include_holes=True)`` a run may also be a hole: ``kind`` EMPTY, ``level`` the
    level of the empty entries, ``page_size`` their entry size, ``pa`` 0, ``attrs`` HOLE_ATTRS.
    With ``Walker(own_attrs=True)`` runs also split where the leaves' own attrs differ (a table
    entry's restriction can make them differ from the effective ``attrs``) and ``own`` holds them.
    """

    va: int
    size: int
    pa: int
    page_size: int
    level: int
    attrs: Attrs
    count: int
    kind: Kind = Kind.LEAF
    own: Attrs | None = None  # the leaves' own attrs (Walker(own_attrs=True) only)

    @property
    def end(self) -> int:
        return self.va + self.size


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A malformed or unusable entry met by the walk (``reason`` says which and why)."""

    va: int
    level: int
    entry_pa: int
    raw: int
    reason: str


_RUN_SET = tuple(getattr(Run, f).__set__ for f in
                 ("va", "size", "pa", "page_size", "level", "attrs", "count", "kind", "own"))


def _make_run(va: int, size: int, pa: int, page_size: int, level: int, attrs: Attrs,
              count: int, kind: Kind, own: Attrs | None, _new=object.__new__,
              _s=_RUN_SET) -> Run:
    """Run(...) without the frozen dataclass __init__ (about twice as fast; hot path)."""
    r = _new(Run)
    _s[0](r, va)
    _s[1](r, size)
    _s[2](r, pa)
    _s[3](r, page_size)
    _s[4](r, level)
    _s[5](r, attrs)
    _s[6](r, count)
    _s[7](r, kind)
    _s[8](r, own)
    return r


RunRow = tuple[int, int, int, int, int, Attrs, int, Kind, "Attrs | None"]


class RunBlock:
    """Consecutive runs of one page size and level, held as numpy columns (the vectorised part
    of a walk); rows are made from them on access. ``kind`` holds each run's :class:`Kind`
    (an object array; None: all leaves)."""

    __slots__ = ("attrs", "count", "kind", "level", "own", "pa", "page_size", "size", "va")

    def __init__(self, va: np.ndarray, size: np.ndarray, pa: np.ndarray, page_size: int,
                 level: int, attrs: np.ndarray, count: np.ndarray, own: np.ndarray,
                 kind: np.ndarray | None = None) -> None:
        self.va, self.size, self.pa, self.count = va, size, pa, count
        self.page_size, self.level, self.attrs, self.own = page_size, level, attrs, own
        self.kind = kind

    def __len__(self) -> int:
        return self.va.size

    def rows(self) -> Iterator[RunRow]:
        kind = repeat(Kind.LEAF) if self.kind is None else self.kind.tolist()
        return zip(self.va.tolist(), self.size.tolist(), self.pa.tolist(),
                   repeat(self.page_size), repeat(self.level), self.attrs.tolist(),
                   self.count.tolist(), kind, self.own.tolist())


class RunTable(Sequence[Run]):
    """The runs of one walk, in VA order, held as rows (va, size, pa, page_size, level, attrs,
    count, kind, own) and :class:`RunBlock` columns; :class:`Run` objects are built on
    access, so a walk that yields tens of thousands of runs (x86's ESPFIX aliases) does not
    pay for objects nobody looks at."""

    __slots__ = ("_items", "_len", "_rows")

    def __init__(self, items: list[RunRow | RunBlock]) -> None:
        self._items = items
        self._rows: list[RunRow] | None = None
        self._len = sum(len(i) if isinstance(i, RunBlock) else 1 for i in items)

    def __len__(self) -> int:
        return self._len

    def rows(self) -> Iterator[RunRow]:
        """Every run as a row tuple, in VA order."""
        if self._rows is not None:
            return iter(self._rows)
        return chain.from_iterable(i.rows() if isinstance(i, RunBlock) else (i,)
                                   for i in self._items)

    def _all_rows(self) -> list[RunRow]:
        if self._rows is None:
            self._rows = list(self.rows())
        return self._rows

    @overload
    def __getitem__(self, i: int) -> Run: ...
    @overload
    def __getitem__(self, i: slice) -> RunTable: ...
    def __getitem__(self, i: int | slice) -> Run | RunTable:
        if isinstance(i, slice):
            return RunTable(self._all_rows()[i])
        return _make_run(*self._all_rows()[i])

    def __iter__(self) -> Iterator[Run]:
        return starmap(_make_run, self.rows())

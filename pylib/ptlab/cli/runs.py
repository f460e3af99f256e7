"""Leaf runs as text and JSON: one line (or object) per run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..formats.base import Attrs, Format
from ..walk.runs import RunRow
from .text import attrs_text, level_name, size_text


def run_text(fmt: Format, r: Any) -> str:
    return (f"{r.va:#018x}-{r.va + r.size:#018x} {size_text(r.size):>6}  pa {r.pa:#014x}  "
            f"{r.count:>6} x {size_text(r.page_size):<4} {level_name(fmt, r.level):<4} "
            f"{attrs_text(r.attrs)}")


class RunLines:
    """:func:`run_text` for many runs: the text of a (page size, level, attributes) tail and
    of each size is made once (a walk has tens of thousands of runs, few distinct tails)."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        # keyed by id(attrs): the walk shares one Attrs object among runs; the value keeps
        # the object alive, so its id cannot be reused for other attributes
        self._tails: dict[tuple[int, int, int], tuple[Attrs, str]] = {}
        self._sizes: dict[int, str] = {}

    def __call__(self, r: Any) -> str:
        a = r.attrs
        key = (r.page_size, r.level, id(a))
        hit = self._tails.get(key)
        if hit is None:
            hit = self._tails[key] = (a, f"{size_text(r.page_size):<4} "
                                         f"{level_name(self.fmt, r.level):<4} {attrs_text(a)}")
        tail = hit[1]
        size = self._sizes.get(r.size)
        if size is None:
            size = self._sizes[r.size] = f"{size_text(r.size):>6}"
        return f"{r.va:#018x}-{r.va + r.size:#018x} {size}  pa {r.pa:#014x}  {r.count:>6} x {tail}"

    def rows(self, rows: Iterable[RunRow]) -> Iterator[str]:
        """The lines of runs given as rows (:meth:`ptlab.walk.runs.RunTable.rows`: no Run
        objects made)."""
        tails, sizes = self._tails, self._sizes
        for va, size, pa, psize, level, attrs, count, _kind, _own in rows:
            hit = tails.get((psize, level, id(attrs)))
            if hit is None:
                hit = tails[(psize, level, id(attrs))] = (
                    attrs, f"{size_text(psize):<4} {level_name(self.fmt, level):<4} "
                    f"{attrs_text(attrs)}")
            sz = sizes.get(size)
            if sz is None:
                sz = sizes[size] = f"{size_text(size):>6}"
            yield f"{va:#018x}-{va + size:#018x} {sz}  pa {pa:#014x}  {count:>6} x {hit[1]}"


def run_json(fmt: Format, r: Any) -> dict[str, Any]:
    return {"va": f"{r.va:#x}", "end": f"{r.va + r.size:#x}", "size": r.size,
            "pa": f"{r.pa:#x}", "page_size": r.page_size, "count": r.count, "level": r.level,
            "level_name": level_name(fmt, r.level), "attrs": attrs_text(r.attrs)}

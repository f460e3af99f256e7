"""Leaf runs as text and JSON: one line (or object) per run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from operator import add
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
        self._jtails: dict[tuple[int, int], tuple[Attrs, str]] = {}  # json_chunks'

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


    def chunks(self, rows: Iterable[RunRow], chunk: int = 4096) -> Iterator[tuple[str, int]]:
        """:meth:`rows` as text blocks of up to ``chunk`` lines (each line ends in a newline)
        and their line count: the rows are transposed and every block formatted by one
        ``%`` of a repeated line template, without a Python call per line."""
        tails, sizes = self._tails, self._sizes
        for vas, lens, pas, psizes, levels, attrs, counts in _columns(rows, chunk):
            szs = [sizes.get(n) or self._size(n) for n in lens]
            tls = [(tails.get((p, lv, id(a))) or self._tail(p, lv, a))[1]
                   for p, lv, a in zip(psizes, levels, attrs, strict=True)]
            yield _format(_LINE, vas, list(map(add, vas, lens)), szs, pas, counts, tls)

    def json_chunks(self, rows: Iterable[RunRow],
                    chunk: int = 4096) -> Iterator[tuple[str, int]]:
        """:meth:`chunks` for ``walk --json``: each line is ``json.dumps(run_json(fmt, r))``
        byte for byte, the (level, attributes) part made once per distinct pair."""
        jtails = self._jtails
        for vas, lens, pas, psizes, levels, attrs, counts in _columns(rows, chunk):
            tls = [(jtails.get((lv, id(a))) or self._jtail(lv, a))[1]
                   for lv, a in zip(levels, attrs, strict=True)]
            yield _format(_JSON_LINE, vas, list(map(add, vas, lens)), lens, pas, psizes,
                          counts, tls)

    def _size(self, n: int) -> str:
        text = self._sizes[n] = f"{size_text(n):>6}"
        return text

    def _jtail(self, level: int, attrs: Attrs) -> tuple[Attrs, str]:
        import json

        hit = self._jtails[(level, id(attrs))] = (
            attrs, f'"level": {json.dumps(level)}, '
                   f'"level_name": {json.dumps(level_name(self.fmt, level))}, '
                   f'"attrs": {json.dumps(attrs_text(attrs))}')
        return hit

    def _tail(self, psize: int, level: int, attrs: Attrs) -> tuple[Attrs, str]:
        hit = self._tails[(psize, level, id(attrs))] = (
            attrs, f"{size_text(psize):<4} {level_name(self.fmt, level):<4} {attrs_text(attrs)}")
        return hit


def _columns(rows: Iterable[RunRow], chunk: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    """Blocks of up to ``chunk`` rows, transposed: (vas, sizes, pas, page sizes, levels,
    attrs, counts)."""
    it = iter(rows)
    while part := list(islice(it, chunk)):
        yield tuple(zip(*part, strict=True))[:7]


def _format(line: str, *columns: Sequence[Any]) -> tuple[str, int]:
    """One block of lines: the template ``line`` repeated, filled from ``columns`` row by
    row by a single ``%``; returns the text and its number of lines."""
    n, k = len(columns[0]), len(columns)
    flat: list[Any] = [None] * (k * n)
    for i, column in enumerate(columns):
        flat[i::k] = column
    return (line * n) % tuple(flat), n


_LINE = "%#018x-%#018x %s  pa %#014x  %6d x %s\n"  # RunLines' line, for chunks()
# json_chunks' line: run_json's keys in its order, json.dumps' separators
_JSON_LINE = ('{"va": "%#x", "end": "%#x", "size": %d, "pa": "%#x", "page_size": %d, '
              '"count": %d, %s}\n')


def run_json(fmt: Format, r: Any) -> dict[str, Any]:
    return {"va": f"{r.va:#x}", "end": f"{r.va + r.size:#x}", "size": r.size,
            "pa": f"{r.pa:#x}", "page_size": r.page_size, "count": r.count, "level": r.level,
            "level_name": level_name(fmt, r.level), "attrs": attrs_text(r.attrs)}


def anomaly_json(a: Any) -> dict[str, Any]:
    """One walker anomaly as ``walk --json`` prints it."""
    return {"anomaly": a.reason, "va": f"{a.va:#x}", "level": a.level,
            "entry_pa": f"{a.entry_pa:#x}", "raw": f"{a.raw:#x}"}

"""``ptlab search``: find a byte pattern in memory through the page tables (gdb-pt-dump's
``-find``/``-ss``): hits as VAs, with the PA and the mapping.

Physical memory is read once, whatever the number of VAs mapping it (the direct map aliases
all of RAM): the PA ranges the leaf runs cover (clipped to what the memory holds) are scanned
in chunks, and each hit is reported at every VA of every run that maps all of it. A match
that straddles two runs (VA-contiguous but not PA-contiguous pages) is not found.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .formats.base import Attrs, Kind
from .walk import Run
from .walk.runs import RunTable

CHUNK = 16 << 20  # bytes read at once


@dataclass(frozen=True, slots=True)
class Hit:
    va: int
    pa: int
    page_size: int
    attrs: Attrs


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in ranges:  # sorted
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _clip(ranges: list[tuple[int, int]], to: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for s, e in ranges:
        for ts, te in to:
            lo, hi = max(s, ts), min(e, te)
            if lo < hi:
                out.append((lo, hi))
    return out


def physical_hits(mem: Any, needle: bytes, ranges: list[tuple[int, int]]) -> Iterator[int]:
    """PAs in ``ranges`` where ``needle`` starts and wholly lies (within one range)."""
    n = len(needle)
    for s, e in ranges:
        pa = s
        while pa < e:
            size = min(CHUNK + n - 1, e - pa)
            data = mem.read(pa, size)
            pos = data.find(needle)
            while pos >= 0 and pos < CHUNK:
                yield pa + pos
                pos = data.find(needle, pos + 1)
            pa += CHUNK


def search(mem: Any, runs: RunTable | Sequence[Run], needle: bytes,
           limit: int) -> tuple[list[Hit], bool]:
    """Hits of ``needle`` at the VAs of ``runs`` (present leaves), in VA order; at most
    ``limit`` (True when more were left out)."""
    if not needle:
        raise ValueError("empty pattern")
    rows = runs.rows() if isinstance(runs, RunTable) else (
        (r.va, r.size, r.pa, r.page_size, r.level, r.attrs, r.count, r.kind, r.own)
        for r in runs)
    leaves = sorted(((pa, size, va, psize, attrs) for va, size, pa, psize, _l, attrs, _c, kind,
                     _o in rows if kind is Kind.LEAF and attrs.present))
    starts = [r[0] for r in leaves]
    longest = max((r[1] for r in leaves), default=0)
    scan = _clip(_union([(r[0], r[0] + r[1]) for r in leaves]), mem.ranges())
    hits: list[Hit] = []
    more = False
    for pa in physical_hits(mem, needle, scan):
        i = bisect.bisect_right(starts, pa)
        while i > 0 and starts[i - 1] > pa - longest:
            rpa, size, va, psize, attrs = leaves[i - 1]
            if pa + len(needle) <= rpa + size:
                hits.append(Hit(va + pa - rpa, pa, psize, attrs))
            i -= 1
        if len(hits) > limit:
            more = True
            break
    hits.sort(key=lambda h: h.va)
    return hits[:limit], more or len(hits) > limit

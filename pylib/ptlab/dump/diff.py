"""Semantic diff of two walks: which VA ranges were added, removed or changed.

Compares what each VA translates to (attributes and, optionally, the output address), not how
it is mapped: a 2M leaf split into 512 equal 4K leaves is no change unless
``compare_page_size``. Works on walker runs or on parsed ptdump lines (which carry no PA).
Output ranges are coalesced: adjacent pieces with the same kind, the same old and new
attributes (and, with ``compare_pa``, contiguous output addresses) form one :class:`Change`,
whose ``old_pa``/``new_pa`` are those at its start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..formats.base import Attrs, Kind
from ..walk import Run
from .render import DumpRun

__all__ = ["Change", "diff", "shifted"]

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class Change:
    """[va, end) was ``kind`` ("added", "removed", "changed"); ``old``/``new`` are the
    attributes (Attrs for runs, the flag words for ptdump lines), None where unmapped;
    ``old_pa``/``new_pa`` the output address at ``va`` when known."""

    va: int
    end: int
    kind: str
    old: Attrs | tuple[str, ...] | None
    new: Attrs | tuple[str, ...] | None
    old_pa: int | None = None
    new_pa: int | None = None
    old_page_size: int | None = None  # walker runs only
    new_page_size: int | None = None

    @property
    def size(self) -> int:
        return self.end - self.va


@dataclass(frozen=True, slots=True)
class _Seg:
    va: int
    end: int
    value: object  # compared for equality
    shown: Attrs | tuple[str, ...]
    pa: int | None
    page_size: int | None = None


def _segments(runs: Iterable[Run | DumpRun], compare_page_size: bool,
              ignore_ad: bool) -> list[_Seg]:
    out: list[_Seg] = []
    for r in runs:
        if isinstance(r, DumpRun):
            if not r.mapped:
                continue
            end = r.end or _U64
            value = (r.flags, r.level) if compare_page_size else r.flags
            out.append(_Seg(r.va, end, value, r.flags, None))
            continue
        if r.kind is not Kind.LEAF or not r.attrs.present:
            continue
        a = r.attrs.with_(accessed=False, dirty=False) if ignore_ad else r.attrs
        value = (a, r.page_size) if compare_page_size else a
        out.append(_Seg(r.va, r.end, value, r.attrs, r.pa, r.page_size))
    out.sort(key=lambda s: s.va)
    for a, b in zip(out, out[1:], strict=False):
        if a.end > b.va:
            raise ValueError(f"overlapping runs at {b.va:#x}")
    return out


def _cover(segs: Sequence[_Seg], i: int, lo: int) -> tuple[int, _Seg | None]:
    while i < len(segs) and segs[i].end <= lo:
        i += 1
    if i < len(segs) and segs[i].va <= lo:
        return i, segs[i]
    return i, None


def diff(old: Iterable[Run | DumpRun], new: Iterable[Run | DumpRun], *,
         compare_pa: bool = True, compare_page_size: bool = False,
         ignore_ad: bool = False) -> list[Change]:
    """Changes from ``old`` to ``new`` in VA order. With ``compare_page_size``, a range
    mapped with the same attributes (and PA) at a smaller page size is "split", at a larger
    one "merged"."""
    a = _segments(old, compare_page_size, ignore_ad)
    b = _segments(new, compare_page_size, ignore_ad)
    cuts = sorted({s.va for s in a} | {s.end for s in a} | {s.va for s in b} | {s.end for s in b})
    out: list[Change] = []
    i = j = 0
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        i, o = _cover(a, i, lo)
        j, n = _cover(b, j, lo)
        if o is None and n is None:
            continue
        opa = None if o is None or o.pa is None else o.pa + (lo - o.va)
        npa = None if n is None or n.pa is None else n.pa + (lo - n.va)
        if o is None:
            kind = "added"
        elif n is None:
            kind = "removed"
        elif o.value == n.value and (not compare_pa or opa == npa):
            continue
        elif (compare_page_size and o.shown == n.shown and (not compare_pa or opa == npa)
              and o.page_size is not None and n.page_size is not None):
            kind = "split" if n.page_size < o.page_size else "merged"
        else:
            kind = "changed"
        oshown = None if o is None else o.shown
        nshown = None if n is None else n.shown
        ops_ = None if o is None else o.page_size
        nps = None if n is None else n.page_size
        if out:
            p = out[-1]
            if (p.end == lo and p.kind == kind and p.old == oshown and p.new == nshown
                    and (p.old_page_size, p.new_page_size) == (ops_, nps)
                    and (not compare_pa or (
                        (opa is None or p.old_pa is not None and p.old_pa + p.size == opa)
                        and (npa is None or p.new_pa is not None and p.new_pa + p.size == npa)))):
                out[-1] = Change(p.va, hi, kind, p.old, p.new, p.old_pa, p.new_pa, ops_, nps)
                continue
        out.append(Change(lo, hi, kind, oshown, nshown, opa, npa, ops_, nps))
    return out


def shifted(runs: Iterable[Run], lo: int, hi: int, delta: int) -> list[Run]:
    """``runs`` with those inside [lo, hi) moved by ``delta`` (a KASLR displacement taken
    out), re-sorted."""
    from dataclasses import replace

    out = [replace(r, va=r.va + delta) if lo <= r.va and r.va + r.size <= hi else r
           for r in runs]
    return sorted(out, key=lambda r: r.va)

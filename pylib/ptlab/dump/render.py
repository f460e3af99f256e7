"""Render walker runs as the kernel's ptdump debugfs text (x86-64 and arm64, Linux 6.1).

The kernel prints from ``note_page()``, called for every entry the generic walker
(mm/ptdump.c over mm/pagewalk.c) visits: a line is flushed when the entry's protection bits,
its level or the address-marker section changes, so lines coalesce regardless of physical
contiguity and holes (empty entries) are printed too, at the level where the walk met them.
:func:`note_runs` replays that state machine over walker runs (``include_holes=True``), calling
it at run starts and at every entry boundary where a marker can trigger, which reproduces the
kernel's output including its quirks: a marker's header is printed only at the first entry
boundary at or past it (the line before it may straddle the marker), one marker advance per
call on x86, and the final flush ending at ``0x0000000000000000``.

Sources: arch/x86/mm/dump_pagetables.c (``note_page``, ``printk_prot``, level names
pgd/p4d/pud/pmd/pte, "0x%0*lx-0x%0*lx   ", "%9lu%c ", units "BKMGTPE", walk ranges
{0, PTRS_PER_PGD * PGD_LEVEL_MULT / 2} and {GUARD_HOLE_END_ADDR, ~0UL}, protection value
``val & PTE_FLAGS_MASK``, which drops a large leaf's PAT bit 12), arch/arm64/mm/ptdump.c
(``note_page``, ``pte_bits[]``, ``pg_level[]`` names, "0x%016lx-0x%016lx   ", "%9lu%c %s" in
units "KMGTPE" of KiB, " %s" per bit), mm/pagewalk.c ``real_depth()`` (a hole in a folded
top level is reported at depth 0, pgd).

Protection bits are re-encoded from the runs' attributes with the format's own codec: the
leaves' own attributes (``Walker(own_attrs=True)``, which :func:`dump` uses) as the kernel
prints them, and on x86 the effective RW/USR/NX, which the kernel also compares. Runs walked
without ``own_attrs`` render their effective attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..arch import ArchOps, Marker, arch_for
from ..formats.base import Attrs, Entry, Format, FormatError, Kind
from ..walk import Run, Walker
from ..walk.runs import RunTable
from .markers import default_markers

__all__ = [
    "DumpRun", "Header", "Skipped", "dump", "format_items", "format_line", "format_runs",
    "kernel_ranges", "note_runs", "render",
]

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class DumpRun:
    """One printed ptdump line: [va, end) (end 0 = the top of the address space), the flag
    words as printed (x86: USR RW/ro PWT PCD PSE PAT GLB NX/x; arm64: F USR RW/ro NX/x SHD AF NG
    CON BLK UXN GP and the memory type; empty for a hole), the level name as printed and the
    marker section it was printed under."""

    va: int
    end: int
    flags: tuple[str, ...]
    level: str
    section: str = ""

    @property
    def size(self) -> int:
        return (self.end - self.va) % _U64 or _U64

    @property
    def mapped(self) -> bool:
        return bool(self.flags) and "F" not in self.flags


@dataclass(frozen=True, slots=True)
class Header:
    """A ``---[ name ]---`` marker line."""

    name: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """x86's ``... N entries skipped ...`` line (sections with max_lines)."""

    count: int


Item = DumpRun | Header | Skipped


def format_line(run: DumpRun, arch: str | Format | ArchOps) -> str:
    """One line exactly as the kernel of ``arch`` prints it (without the newline)."""
    ops = arch if isinstance(arch, ArchOps) else arch_for(arch)
    return ops.ptdump_line(run.va, run.end, run.flags, run.level)


def format_items(items: Iterable[Item], arch: str | Format | ArchOps) -> str:
    """Text of headers, lines and skip notes, one per line."""
    ops = arch if isinstance(arch, ArchOps) else arch_for(arch)
    out = []
    for it in items:
        if isinstance(it, Header):
            out.append(f"---[ {it.name} ]---")
        elif isinstance(it, Skipped):
            out.append(f"... {it.count} entr{'y' if it.count == 1 else 'ies'} skipped ... ")
        else:
            out.append(format_line(it, ops))
    return "".join(line + "\n" for line in out)


def format_runs(runs: Iterable[DumpRun], arch: str | Format | ArchOps) -> str:
    """Text of ``runs`` with a header wherever the section changes (inverse of parse())."""
    items: list[Item] = []
    section = None
    for r in runs:
        if r.section != section:
            items.append(Header(r.section))
            section = r.section
        items.append(r)
    return format_items(items, arch)


# --- the note_page state machine ----------------------------------------------------------------
def kernel_ranges(fmt: Format) -> list[tuple[int, int]]:
    """VA ranges the kernel's ptdump walks for this root (x86 skips the hypervisor hole)."""
    return arch_for(fmt).ptdump_ranges(fmt)


class _Codec:
    """Run -> (ptdump depth, protection key, printed words), cached per attrs and level."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.ops = arch_for(fmt)
        self.names = self.ops.ptdump_names(fmt)
        self._cache: dict[tuple, tuple[object, tuple[str, ...]]] = {}
        self._by_id: dict[tuple[int, int, int], tuple[Attrs, Attrs, tuple]] = {}

    def depth(self, level: int, hole: bool) -> int:
        return self.ops.ptdump_depth(self.fmt, level, hole)

    def prot(self, kind: Kind, attrs: Attrs, own: Attrs | None, level: int,
             depth: int) -> tuple[object, tuple[str, ...]]:
        """(comparison key, printed words) of a leaf run (see ArchOps.ptdump_prot)."""
        if kind is not Kind.LEAF:
            return 0, ()
        own = own if own is not None else attrs
        idk = (id(attrs), id(own), level)
        byid = self._by_id.get(idk)
        if byid is not None:  # the walk shares Attrs objects among its runs
            return byid[2]
        ck = (attrs, own, level)
        hit = self._cache.get(ck)
        if hit is None:
            try:
                raw = self.fmt.encode(Entry(Kind.LEAF, 0, own), level)
                eff_raw = self.fmt.encode(Entry(Kind.LEAF, 0, attrs), level)
                hit = self.ops.ptdump_prot(raw, eff_raw, depth)
            except FormatError:  # attributes the codec cannot write back: print blank
                hit = (("unencodable", attrs, own), ())
            self._cache[ck] = hit
        self._by_id[idk] = (attrs, own, hit)  # holding the objects keeps their ids unique
        return hit


def _spans(runs: Iterable[Run]) -> Iterator[tuple[int, int, int, int, Kind, Attrs,
                                                  Attrs | None]]:
    """(va, end, page_size, level, kind, attrs, own) of ``runs``, VA-adjacent runs that
    differ only in PA merged (ptdump ignores physical contiguity): far fewer to replay."""
    rows = runs.rows() if isinstance(runs, RunTable) else (
        (r.va, r.size, r.pa, r.page_size, r.level, r.attrs, r.count, r.kind, r.own)
        for r in runs)
    cur = None
    for va, size, _pa, psize, level, attrs, _count, kind, own in rows:
        if (cur is not None and va == cur[1] and psize == cur[2] and level == cur[3]
                and kind is cur[4] and (attrs is cur[5] or attrs == cur[5])
                and (own is cur[6] or own == cur[6])):
            cur[1] = va + size
            continue
        if cur is not None:
            yield tuple(cur)  # type: ignore[misc]
        cur = [va, va + size, psize, level, kind, attrs, own]
    if cur is not None:
        yield tuple(cur)  # type: ignore[misc]


class _State:
    def __init__(self, markers: list[Marker], names: tuple[str, ...], ops: ArchOps) -> None:
        if not markers or markers[-1].name is not None:
            markers = [*markers, Marker(_U64 - 1, None)]
        self.m, self.names = markers, names
        self.first_start = ops.ptdump_first_start
        self.caps_lines = ops.ptdump_caps_lines
        self.recheck = ops.ptdump_recheck_marker
        self.level: int | None = None
        self.prot: object = 0
        self.words: tuple[str, ...] = ()
        self.start = 0
        self.idx = 0
        self.lines = 0
        self.out: list[Item] = []
        self.next_start = 0

        self.next_start = self._next_start()  # where the next marker begins

    def _advance(self) -> None:
        self.idx = min(self.idx + 1, len(self.m) - 1)
        self.next_start = self._next_start()
        name = self.m[self.idx].name
        if name is not None:
            self.out.append(Header(name))

    def _next_start(self) -> int:
        return self.m[self.idx + 1].start if self.idx + 1 < len(self.m) else _U64

    def note(self, addr: int, depth: int, prot: object, words: tuple[str, ...]) -> None:
        if self.level is None:  # first entry
            self.prot, self.words, self.level = prot, words, depth
            if self.first_start:
                self.start = addr
            self.out.append(Header(self.m[self.idx].name or ""))
        elif prot != self.prot or depth != self.level or addr >= self.next_start:
            mk = self.m[self.idx]
            crossed = addr >= self.next_start
            if not self.caps_lines or not mk.max_lines or self.lines < mk.max_lines:
                self.out.append(DumpRun(self.start, addr, self.words, self.names[self.level],
                                        mk.name or ""))
            self.lines += 1
            if crossed:
                if self.caps_lines and mk.max_lines and self.lines > mk.max_lines:
                    self.out.append(Skipped(self.lines - mk.max_lines))
                self.lines = 0
                self._advance()
            self.start, self.prot, self.words, self.level = addr, prot, words, depth
        if self.recheck and addr >= self.next_start:
            self._advance()


def note_runs(runs: Iterable[Run], fmt: Format,
              markers: list[Marker] | None = None) -> list[Item]:
    """Replay the kernel's note_page() over walker runs (sorted; ``include_holes=True`` runs
    give the exact output, gaps are treated as pgd-level holes)."""
    codec = _Codec(fmt)
    st = _State(markers if markers is not None else default_markers(fmt), codec.names,
                codec.ops)
    ranges = kernel_ranges(fmt)
    top_size = fmt.entry_size(fmt.top_level)
    ri = 0
    cursor = ranges[0][0] if ranges else 0
    depths: dict[tuple[int, bool], int] = {}

    def event_run(va: int, end: int, depth: int, prot: object, words: tuple[str, ...],
                  esize: int) -> None:
        # note_page() at va, then at each entry boundary where the next marker can trigger
        addr = va
        st.note(addr, depth, prot, words)
        if st.next_start >= end or addr + esize >= end:  # no entry boundary left to note
            return
        while True:
            m = st.next_start
            nxt = max(m, addr + esize)
            nxt = addr + -(-(nxt - addr) // esize) * esize
            if nxt >= end:
                return
            addr = nxt
            st.note(addr, depth, prot, words)

    # (level, kind, id(attrs), id(own)) -> (attrs, own, depth, prot, words); the objects are
    # held so that their ids stay theirs
    looks: dict[tuple[int, Kind, int, int], tuple[Any, ...]] = {}
    rs_cur, re_cur = ranges[0] if ranges else (0, 0)
    for va, end, psize, level, kind, attrs, own in _spans(runs):
        lk = (level, kind, id(attrs), id(own))
        look = looks.get(lk)
        if look is None:
            dk = (level, kind is not Kind.LEAF)
            depth = depths.get(dk)
            if depth is None:
                depth = depths[dk] = codec.depth(*dk)
            look = looks[lk] = (attrs, own, depth, *codec.prot(kind, attrs, own, level, depth))
        _, _, depth, prot, words = look
        if (va == cursor and rs_cur <= va and end <= re_cur and st.level is not None
                and (st.next_start >= end or va + psize >= end) and va < st.next_start):
            # the common case: inside the current range, after the previous span, no marker
            # boundary to note inside it: one note_page() call
            if prot != st.prot or depth != st.level:
                st.note(va, depth, prot, words)
            cursor = end
            continue
        for k in range(ri, len(ranges)):
            rs, re_ = ranges[k]
            s, e = max(va, rs), min(end, re_)
            if s >= e:
                continue
            if k != ri:
                ri, cursor = k, rs
                rs_cur, re_cur = rs, re_
            if s > cursor:  # a gap in the runs: a hole at pgd level
                event_run(cursor, s, 0, 0, (), top_size)
            event_run(s, e, depth, prot, words, psize)
            cursor = e
    if st.level is not None:  # the final flush: note_page(st, 0, -1, 0)
        if ri == len(ranges) - 1 and cursor < ranges[-1][1]:
            event_run(cursor, ranges[-1][1], 0, 0, (), top_size)
        st.note(0, -1, 0, ())
    return st.out


def render(runs: Iterable[Run], fmt: Format, markers: list[Marker] | None = None) -> str:
    """The kernel's ptdump text for ``runs`` (see :func:`note_runs`)."""
    return format_items(note_runs(runs, fmt, markers), fmt.arch)


def dump(fmt: Format, mem, root: int, markers: list[Marker] | None = None,
         **walker_kw: object) -> str:
    """Walk ``root`` and render it as /sys/kernel/debug/page_tables/kernel (x86) or
    kernel_page_tables (arm64) would print it."""
    walker = Walker(fmt, mem, root, include_holes=True, include_nonpresent=True,
                    own_attrs=True, **walker_kw)  # type: ignore[arg-type]
    return render(walker.run_table(), fmt, markers)

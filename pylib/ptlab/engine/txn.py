"""One engine operation as a transaction: simulate on an overlay, then reserve and commit.

An operation reads tables through :meth:`Txn.read_table` (so a
:class:`~ptlab.walk.cursor.Cursor` reads through the overlay) and changes them through
:meth:`Txn.write` (a private copy per touched table). Tables it needs are created as
*placeholders*: overlay tables at addresses taken from the top of the physical address
space down, skipping every PA the memory's table registry knows (every table the engine
allocated and still holds, whatever allocator it came from) and every PA this transaction
has read as a real table, so a placeholder never stands for a real table. When the
operation has finished without error, :meth:`Txn.commit` reserves the real pages — one
``reserve(n)`` per allocator, all-or-nothing — checks them (table-aligned, inside the
memory and the format's PA width, not a live table, as many as asked), patches the
entries that point to placeholders, and only then writes the overlay to memory, applies
reference-count changes and hands flush ranges and freed tables to the gather. An error
anywhere before the writes gives every reserved page back and leaves memory, registry and
gather untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..alloc import Allocator, AllocError
from ..formats.base import Kind
from ..walk.cursor import Cursor
from .errors import EngineError

if TYPE_CHECKING:
    from .core import TableCore as PageTable


class Txn:
    def __init__(self, pt: PageTable) -> None:
        if getattr(pt, "root", 0) is None:
            raise EngineError("page table already destroyed")
        self.pt = pt
        self.fmt = pt.fmt
        self.geo = pt.geo
        self.mem = pt.mem
        self.reg = pt.registry
        self.tables: dict[int, np.ndarray] = {}  # overlay: table PA -> entries
        self.seen: set[int] = set()  # real tables read (never used as placeholders)
        self.new: dict[int, Allocator] = {}  # placeholder PA -> allocator that must back it
        self.fakes: set[int] = set()  # every placeholder made (some may be released again)
        self.links: list[tuple[int, int, int, int]] = []  # (table, index, level, placeholder)
        self.delta: dict[int, int] = {}  # reference-count changes
        self.pins: set[int] = set()
        self.unpins: set[int] = set()
        self.released: list[int] = []  # real tables whose last reference went away
        self.flushes: list[tuple[int, int]] = []  # low-VA ranges whose translations changed
        self._next_fake = (1 << self.fmt.pa_bits) - self.fmt.table_bytes

    # --- tables -----------------------------------------------------------------------------
    def read_table(self, pa: int, n: int) -> np.ndarray:
        """Table ``pa`` (``n`` entries) as this transaction sees it."""
        t = self.tables.get(pa)
        if t is not None:
            return t
        self.seen.add(pa)
        return self.mem.read_table(pa, n)

    def write(self, pa: int, n: int) -> np.ndarray:
        """The overlay copy of table ``pa`` (``n`` entries), to change in place."""
        t = self.tables.get(pa)
        if t is None:
            self.seen.add(pa)
            t = self.tables[pa] = np.array(self.mem.read_table(pa, n), dtype=np.uint64)
        return t

    def new_table(self, alloc: Allocator, level: int) -> int:
        """A zeroed placeholder table at ``level``, to be backed by ``alloc`` at commit."""
        fake, step, reg = self._next_fake, self.fmt.table_bytes, self.reg
        while (fake in reg.refs or fake in reg.source or fake in reg.pinned
               or fake in self.seen or fake in self.tables):
            fake -= step
        if fake < 0:
            raise EngineError("no physical address left for a placeholder table")
        self._next_fake = fake - step
        self.tables[fake] = np.zeros(self.geo.entries[level], dtype=np.uint64)
        self.new[fake] = alloc
        self.fakes.add(fake)
        self.delta[fake] = 0
        return fake

    def link(self, c: Cursor, i: int, child: int, raw: int) -> None:
        """Make entry ``i`` of ``c``'s table the table entry ``raw`` -> ``child``."""
        self.write(c.table, c.n)[i] = raw
        self.incref(child)
        if child in self.new:
            self.links.append((c.table, i, c.level, child))

    # --- references -------------------------------------------------------------------------
    def refcount(self, pa: int) -> int:
        base = 0 if pa in self.fakes else self.reg.refcount(pa)
        return base + self.delta.get(pa, 0)

    def pinned(self, pa: int) -> bool:
        return (pa in self.reg.pinned or pa in self.pins) and pa not in self.unpins

    def incref(self, pa: int) -> None:
        self.delta[pa] = self.delta.get(pa, 0) + 1

    def release(self, pa: int, level: int) -> None:
        """Drop one reference to table ``pa`` (at ``level``); free it and, recursively,
        what only it referenced when that was the last one (non-present table entries
        included: they still own their table)."""
        self.delta[pa] = self.delta.get(pa, 0) - 1
        if self.refcount(pa) > 0:
            return
        if level > 0:
            for _, child in Cursor.whole(self.geo, self, level, pa).children(present=False):
                self.release(child.table, child.level)
        self.tables.pop(pa, None)
        self.unpins.add(pa)
        if pa in self.new:
            del self.new[pa]
        else:
            self.released.append(pa)

    def pin(self, pa: int) -> None:
        self.pins.add(pa)
        self.unpins.discard(pa)

    def flush(self, lo: int, hi: int) -> None:
        """Note that translations of low VAs [lo, hi) change (merged with the previous
        range when they touch: an operation's ranges arrive in VA order, inside one VA
        range of the format)."""
        fl = self.flushes
        if fl and fl[-1][1] == lo:
            fl[-1] = (fl[-1][0], hi)
        else:
            fl.append((lo, hi))

    # --- commit -----------------------------------------------------------------------------
    def commit(self) -> dict[int, int]:
        """Reserve, patch, write, account. Returns placeholder -> real PA."""
        fmt, mem, reg = self.fmt, self.mem, self.reg
        real: dict[int, int] = {}
        if self.new:
            real, got = self._reserve()
            try:
                for table, index, level, fake in self.links:
                    t = self.tables.get(table)
                    if t is None or fake not in real:
                        continue
                    e = fmt.decode(int(t[index]), level)
                    if e.kind is Kind.TABLE and e.oa == fake:
                        t[index] = fmt.table(real[fake], level, e.attrs)
            except BaseException:
                _give_back(got)
                raise
        for pa, t in self.tables.items():
            mem.write_table(real.get(pa, pa), t)
        for pa, d in self.delta.items():
            if pa in real:
                reg.source[real[pa]] = self.new[pa]
                reg.refs[real[pa]] = d
            elif pa in self.fakes or d == 0:
                continue
            else:
                reg.refs[pa] = reg.refcount(pa) + d
        for pa in self.pins:
            if pa not in self.unpins:
                reg.pinned.add(real.get(pa, pa))
        gather, alloc = self.pt.gather, self.pt.alloc
        for pa in self.released:
            reg.refs.pop(pa, None)
            reg.pinned.discard(pa)
            src = reg.source.pop(pa, None)
            if src is None and alloc.owns(pa):
                src = alloc
            if src is not None:
                gather.free_table(pa, src)
        canon = fmt.canonical
        for lo, hi in self.flushes:
            gather.add_range(canon(lo), canon(hi - 1) + 1)
        return real

    def _reserve(self) -> tuple[dict[int, int], list[tuple[Allocator, list[int]]]]:
        """One ``reserve`` per allocator; every page checked. Returns placeholder -> real
        PA and (allocator, pages) of everything reserved. On any error every page
        reserved so far (including surplus pages) goes back to its allocator."""
        by_alloc: dict[int, tuple[Allocator, list[int]]] = {}
        for fake, alloc in self.new.items():
            by_alloc.setdefault(id(alloc), (alloc, []))[1].append(fake)
        real: dict[int, int] = {}
        got: list[tuple[Allocator, list[int]]] = []
        taken: set[int] = set()
        try:
            for alloc, fakes in by_alloc.values():
                pas = list(alloc.reserve(len(fakes)))
                got.append((alloc, pas))
                if len(pas) != len(fakes):
                    raise AllocError(f"allocator returned {len(pas)} pages, not {len(fakes)}")
                self._check_pages(pas, taken)
                real.update(zip(fakes, pas, strict=True))
        except BaseException:
            _give_back(got)
            raise
        return real, got

    def _check_pages(self, pas: list[int], taken: set[int]) -> None:
        """EngineError unless every page of ``pas`` can hold a new table of this format
        (and is not a live table, nor handed out twice)."""
        fmt, tb = self.fmt, self.fmt.table_bytes
        limit, contains, live = 1 << fmt.pa_bits, self.mem.contains, self.reg.source
        if pas and all(type(pa) is int for pa in pas):  # the usual case, checked in bulk
            lo, hi = min(pas), max(pas)
            fresh = set(pas)
            if (0 <= lo and hi + tb <= limit and not any(pa % tb for pa in pas)
                    and len(fresh) == len(pas) and live.keys().isdisjoint(fresh)
                    and taken.isdisjoint(fresh)
                    and (contains(lo, hi + tb - lo) or all(contains(pa, tb) for pa in pas))):
                taken.update(fresh)
                return
        for pa in pas:  # one by one, for the error
            if (isinstance(pa, bool) or not isinstance(pa, int | np.integer) or pa < 0
                    or pa % tb or pa + tb > limit or not contains(pa, tb)):
                raise EngineError(
                    f"allocator page {pa!r} cannot hold a {fmt.name} table ({tb:#x}-aligned, "
                    f"below 2**{fmt.pa_bits}, inside the memory)")
            if pa in live or pa in taken:
                raise EngineError(f"allocator handed out PA {pa:#x}, which already holds a table")
            taken.add(pa)


def _give_back(got: list[tuple[Allocator, list[int]]]) -> None:
    """Return reserved pages to their allocators (best effort: every page is tried)."""
    for alloc, pas in got:
        for pa in pas:
            try:
                alloc.free(pa)
            except Exception:  # a page the allocator refuses stays with it
                pass

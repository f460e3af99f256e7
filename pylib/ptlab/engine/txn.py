"""One engine operation as a transaction: simulate on an overlay, then reserve and commit.

An operation reads tables through :meth:`Txn.read` and changes them through
:meth:`Txn.write` (a private copy per touched table). Tables it needs are created as
*placeholders* at addresses at the very top of the physical address space, which no real
table uses. When the operation has finished without error, :meth:`Txn.commit` reserves the
real pages — one ``reserve(n)`` per allocator, all-or-nothing — patches the entries that
point to placeholders, and only then writes the overlay to memory, applies reference-count
changes and hands flush ranges and freed tables to the gather. An error anywhere before
that point leaves memory, registry and gather untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..alloc import Allocator, AllocError
from ..formats.base import Kind
from .errors import EngineError

if TYPE_CHECKING:
    from .core import TableCore as PageTable


class Txn:
    def __init__(self, pt: PageTable) -> None:
        if getattr(pt, "root", 0) is None:
            raise EngineError("page table already destroyed")
        self.pt = pt
        self.fmt = pt.fmt
        self.mem = pt.mem
        self.reg = pt.registry
        self.tables: dict[int, np.ndarray] = {}  # overlay: table PA -> entries
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
    def read(self, pa: int, n: int) -> np.ndarray:
        t = self.tables.get(pa)
        return t if t is not None else self.mem.read_table(pa, n)

    def write(self, pa: int, n: int) -> np.ndarray:
        t = self.tables.get(pa)
        if t is None:
            t = self.tables[pa] = np.array(self.mem.read_table(pa, n), dtype=np.uint64)
        return t

    def new_table(self, alloc: Allocator, level: int) -> int:
        fake = self._next_fake
        self._next_fake -= self.fmt.table_bytes
        self.tables[fake] = np.zeros(self.fmt.entries(level), dtype=np.uint64)
        self.new[fake] = alloc
        self.fakes.add(fake)
        self.delta[fake] = 0
        return fake

    def link(self, table: int, n: int, index: int, level: int, child: int, raw: int) -> None:
        """Make entry ``index`` of ``table`` (at ``level``) the table entry ``raw`` -> child."""
        self.write(table, n)[index] = raw
        self.incref(child)
        if child in self.new:
            self.links.append((table, index, level, child))

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
        what only it referenced when that was the last one."""
        self.delta[pa] = self.delta.get(pa, 0) - 1
        if self.refcount(pa) > 0:
            return
        if level > 0:
            t = self.read(pa, self.fmt.entries(level))
            nz = np.flatnonzero(t)
            if nz.size:
                kinds = self.fmt.kinds(t[nz], level)
                oas = self.fmt.oas(t[nz], level)
                for k, oa in zip(kinds, oas, strict=True):
                    if k == Kind.TABLE:
                        self.release(int(oa), level - 1)
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
        self.flushes.append((lo, hi))

    # --- commit -----------------------------------------------------------------------------
    def commit(self) -> dict[int, int]:
        """Reserve, patch, write, account. Returns placeholder -> real PA."""
        real = self._reserve()
        fmt, mem, reg = self.fmt, self.mem, self.reg
        for table, index, level, fake in self.links:
            t = self.tables.get(table)
            if t is None or fake not in real:
                continue
            e = fmt.decode(int(t[index]), level)
            if e.kind is Kind.TABLE and e.oa == fake:
                t[index] = fmt.table(real[fake], level, e.attrs)
        for pa, t in self.tables.items():
            mem.write_table(real.get(pa, pa), t)
        for pa, d in self.delta.items():
            if pa in real:
                pa = real[pa]
                reg.source[pa] = self.new_sources[pa]
                reg.refs[pa] = d
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

    def _reserve(self) -> dict[int, int]:
        by_alloc: dict[int, tuple[Allocator, list[int]]] = {}
        for fake, alloc in self.new.items():
            by_alloc.setdefault(id(alloc), (alloc, []))[1].append(fake)
        real: dict[int, int] = {}
        self.new_sources: dict[int, Allocator] = {}
        done: list[tuple[Allocator, list[int]]] = []
        try:
            for alloc, fakes in by_alloc.values():
                pas = alloc.reserve(len(fakes))
                if len(pas) != len(fakes):
                    raise AllocError(f"allocator returned {len(pas)} pages, not {len(fakes)}")
                done.append((alloc, pas))
                for fake, pa in zip(fakes, pas, strict=True):
                    real[fake] = pa
                    self.new_sources[pa] = alloc
        except BaseException:
            for alloc, pas in done:
                for pa in pas:
                    alloc.free(pa)
            raise
        return real

"""Raw page-table construction for tests and benchmarks, independent of the engine.

:class:`TableBuilder` writes entries with the format's own codec (``fmt.leaf`` /
``fmt.table`` / ``fmt.encode``) into a :class:`~ptlab.memory.SparseMemory`, allocating table
pages with a bump pointer. Whole runs of leaves are written one table at a time with numpy, so
:func:`linear_map_model` builds a 260k-leaf arm64 linear map in well under a second.
"""

from __future__ import annotations

import numpy as np

from .arch import arch_for, arm64, x86_64
from .formats.base import Attrs, Entry, Format, FormatError, Kind
from .memory.sparse import SparseMemory

__all__ = [
    "ARM64_PAGE_KERNEL", "X86_PAGE_KERNEL", "TableBuilder", "linear_map_model", "raw_tables",
]

ARM64_PAGE_KERNEL = arm64.PAGE_KERNEL  # PAGE_KERNEL (arch/arm64/include/asm/pgtable-prot.h)
X86_PAGE_KERNEL = x86_64.PAGE_KERNEL  # __PAGE_KERNEL (arch/x86/include/asm/pgtable_types.h)


class TableBuilder:
    """Builds raw tables for ``fmt`` in ``mem`` (a fresh SparseMemory by default).

    Tables are allocated upwards from ``base``; the root is allocated first (``root``).
    Table entries get ``fmt.table_attrs()`` unless ``table_attrs`` maps a level to other attrs.
    """

    def __init__(self, fmt: Format, mem: SparseMemory | None = None, base: int = 0x100_0000,
                 table_attrs: dict[int, Attrs] | None = None) -> None:
        self.fmt = fmt
        self.mem = mem if mem is not None else SparseMemory()
        tb = fmt.table_bytes
        self._next = (base + tb - 1) // tb * tb
        self.table_attrs = dict(table_attrs or {})
        self.tables: list[int] = []
        self.root = self.alloc()

    def alloc(self) -> int:
        """A zeroed table page."""
        pa = self._next
        self._next += self.fmt.table_bytes
        self.mem.zero(pa, self.fmt.table_bytes)
        self.tables.append(pa)
        return pa

    def _low(self, va: int) -> int:
        if not self.fmt.covers(va):
            raise FormatError(f"{self.fmt.name}: VA {va:#x} is not translated by this root")
        return va & (self.fmt.va_span - 1)

    def entry_pa(self, va: int, level: int, create: bool = True) -> int:
        """PA of the entry translating ``va`` at ``level``, creating tables above it."""
        fmt, low = self.fmt, self._low(va)
        table = self.root
        for lvl in range(fmt.top_level, level, -1):
            epa = table + fmt.index(low, lvl) * 8
            raw = self.mem.read_u64(epa)
            entry = fmt.decode(raw, lvl)
            if entry.kind is Kind.EMPTY:
                if not create:
                    raise LookupError(f"no table at level {lvl} for {va:#x}")
                child = self.alloc()
                attrs = self.table_attrs.get(lvl, fmt.table_attrs())
                self.mem.write_u64(epa, fmt.table(child, lvl, attrs))
                table = child
            elif entry.kind is Kind.TABLE:
                table = entry.oa
            else:
                raise FormatError(f"leaf at level {lvl} in the way of {va:#x}")
        return table + fmt.index(low, level) * 8

    def set_raw(self, va: int, level: int, raw: int) -> int:
        """Write ``raw`` as the entry for ``va`` at ``level``; returns its PA."""
        epa = self.entry_pa(va, level)
        self.mem.write_u64(epa, raw)
        return epa

    def set_table_attrs(self, va: int, level: int, attrs: Attrs) -> None:
        """Rewrite the table entry at ``level`` on the path of ``va`` with ``attrs``."""
        epa = self.entry_pa(va, level, create=False)
        entry = self.fmt.decode(self.mem.read_u64(epa), level)
        if entry.kind is not Kind.TABLE:
            raise FormatError(f"no table entry at level {level} for {va:#x}")
        self.mem.write_u64(epa, self.fmt.table(entry.oa, level, attrs))

    def map(self, va: int, pa: int, size: int, attrs: Attrs, level: int = 0) -> None:
        """Map [va, va+size) to pa with leaves at ``level`` (all aligned to its entry size)."""
        fmt = self.fmt
        esize = fmt.entry_size(level)
        if va % esize or pa % esize or size % esize or size <= 0:
            raise FormatError(f"map {va:#x}->{pa:#x}+{size:#x} not aligned to {esize:#x}")
        total = size // esize
        done = 0
        while done < total:
            cur_va = va + done * esize
            epa = self.entry_pa(cur_va, level)
            idx = fmt.index(self._low(cur_va), level)
            k = min(total - done, fmt.entries(level) - idx)
            self.mem.write_table(epa, self.leaf_raws(pa + done * esize, attrs, level, k))
            done += k

    def leaf_raws(self, pa: int, attrs: Attrs, level: int, k: int) -> np.ndarray:
        """Raw leaves for ``k`` consecutive pages from ``pa`` (vectorised when the format's
        output address is a linear field, checked against the codec)."""
        fmt = self.fmt
        esize = fmt.entry_size(level)
        r0 = fmt.encode(Entry(Kind.LEAF, pa, attrs), level)
        if k == 1:
            return np.array([r0], dtype=np.uint64)
        r1 = fmt.encode(Entry(Kind.LEAF, pa + esize, attrs), level)
        rl = fmt.encode(Entry(Kind.LEAF, pa + (k - 1) * esize, attrs), level)
        step = (r1 - r0) % (1 << 64)
        if (r0 + (k - 1) * step) % (1 << 64) == rl:
            raws = np.uint64(r0) + np.arange(k, dtype=np.uint64) * np.uint64(step)
            oas = fmt.oas(raws, level)
            want = np.uint64(pa) + np.arange(k, dtype=np.uint64) * np.uint64(esize)
            if np.array_equal(oas, want):
                return raws
        return np.array([fmt.encode(Entry(Kind.LEAF, pa + i * esize, attrs), level)
                         for i in range(k)], dtype=np.uint64)


def linear_map_model(fmt: Format | None = None, pages: int = 259_000, blocks: int = 157,
                     page_offset: int | None = None) -> TableBuilder:
    """A model of a guest's linear map (arm64 rodata=full by default): ``pages`` 4 KiB leaves
    followed by ``blocks`` 2 MiB blocks, the architecture's PAGE_KERNEL, from PA 0x4000_0000
    at the default PAGE_OFFSET. Defaults mirror a 1 GiB guest
    (~259k pages, 157 blocks, ~525 tables). Returns the builder (``.fmt``, ``.mem``, ``.root``).
    """
    if fmt is None:
        from .formats.arm64 import Arm64

        fmt = Arm64(4096, 48, upper=True)
    ops = arch_for(fmt)
    attrs = ops.page_kernel
    base = page_offset if page_offset is not None else ops.linear_map_base(fmt)
    b = TableBuilder(fmt)
    pa0 = 0x4000_0000
    b.map(base, pa0, pages * 4096, fmt.normalize(attrs), level=0)
    if blocks:
        bs = fmt.entry_size(1)
        start = (base + pages * 4096 + bs - 1) // bs * bs
        b.map(start, pa0 + (start - base), blocks * bs, fmt.normalize(attrs), level=1)
    return b


def raw_tables(fmt: Format, mem, root: int) -> set[int]:
    """Every table reachable from ``root``, from raw reads decoded one entry at a time (an
    oracle for table counts that shares nothing with the cursor or the engine)."""
    seen, todo = set(), [(root, fmt.levels - 1)]
    while todo:
        pa, lvl = todo.pop()
        seen.add(pa)
        for i in range(fmt.entries(lvl)) if lvl else ():
            e = fmt.decode(mem.read_u64(pa + 8 * i), lvl)
            if e.kind is Kind.TABLE and e.oa not in seen:
                todo.append((e.oa, lvl - 1))
    return seen

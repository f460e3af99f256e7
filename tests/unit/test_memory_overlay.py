"""OverlayMemory: copy-on-write over a base memory that is never written."""

from __future__ import annotations

import numpy as np
import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.memory.base import OutOfRange, PhysMemory
from ptlab.memory.overlay import OverlayMemory
from ptlab.memory.sparse import SparseMemory
from ptlab.testing import X86_PAGE_KERNEL, TableBuilder
from ptlab.walk import Walker

DM = 0xFFFF_8880_0000_0000
SCRATCH = (1 << 40, (1 << 40) + (4 << 20))


class ReadOnly(PhysMemory):
    """A base that refuses every write (as a stopped guest must be treated)."""

    def __init__(self, inner: SparseMemory) -> None:
        self.inner = inner

    def read(self, pa: int, size: int) -> bytes:
        return self.inner.read(pa, size)

    def contains(self, pa: int, size: int = 8) -> bool:
        return pa + size <= 1 << 32 and self.inner.contains(pa, size)

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, 1 << 32)]


def guest() -> tuple[TableBuilder, ReadOnly]:
    """A 'guest': a 2M-mapped 8 MiB direct map built without the engine."""
    fmt = by_name("x86_64-4level")
    b = TableBuilder(fmt)
    b.map(DM, 0, 8 << 20, fmt.normalize(X86_PAGE_KERNEL), level=1)
    return b, ReadOnly(b.mem)


def test_reads_fall_through_and_writes_stay_private() -> None:
    base = SparseMemory(1 << 32)
    base.write_u64(0x5000, 0x1111)
    base.write_u64(0x5008, 0x2222)
    before = base.snapshot()
    ov = OverlayMemory(base)
    assert ov.read_u64(0x5000) == 0x1111
    ov.write_u64(0x5008, 0x3333)
    ov.write(0x5ffc, b"\xaa" * 8)  # crosses into frame 6
    assert ov.read_u64(0x5008) == 0x3333 and ov.read_u64(0x5000) == 0x1111
    assert ov.read(0x5ffc, 8) == b"\xaa" * 8
    assert base.snapshot() == before  # the base was never written
    assert base.read_u64(0x5008) == 0x2222
    assert ov.written() == [0x5000, 0x6000]
    assert (0x5008, 0x2222, 0x3333) in ov.changes()
    assert len([c for c in ov.changes() if c[0] == 0x5008]) == 1
    ov.discard()
    assert ov.read_u64(0x5008) == 0x2222 and ov.written() == []


def test_table_reads_see_overlay_writes() -> None:
    base = SparseMemory(1 << 32)
    base.write_table(0x7000, np.arange(512, dtype=np.uint64))
    ov = OverlayMemory(base)
    assert (ov.read_table(0x7000, 512) == np.arange(512)).all()
    ov.write_u64(0x7000 + 8 * 100, 0xDEAD)
    t = ov.read_table(0x7000, 512)
    assert int(t[100]) == 0xDEAD and int(t[99]) == 99 and int(t[101]) == 101
    assert int(ov.read_table(0x7000 + 8 * 100, 2)[0]) == 0xDEAD
    assert int(base.read_table(0x7000, 512)[100]) == 100


def test_scratch_is_zero_and_bounds_are_checked() -> None:
    b, base = guest()
    ov = OverlayMemory(base, [SCRATCH])
    assert ov.contains(SCRATCH[0], 4096) and not base.contains(SCRATCH[0], 8)
    assert ov.read_u64(SCRATCH[0] + 8) == 0
    assert not ov.read_table(SCRATCH[0], 512).any()
    with pytest.raises(OutOfRange):
        ov.read((1 << 32) + 0x1000, 8)
    with pytest.raises(OutOfRange):
        ov.write_u64(SCRATCH[1], 1)
    with pytest.raises(ValueError, match="overlaps"):
        OverlayMemory(base, [(0x1000, 0x3000)])
    with pytest.raises(ValueError, match="aligned"):
        OverlayMemory(base, [(SCRATCH[0] + 8, SCRATCH[1])])


def test_engine_on_overlay_never_writes_the_guest() -> None:
    """The scenario method's step 2: the engine edits a copy-on-write overlay of the
    'guest' at the guest's own root; the guest's RAM stays byte for byte the same."""
    b, base = guest()
    fmt = b.fmt
    before = b.mem.snapshot()
    ov = OverlayMemory(base, [SCRATCH])
    alloc = NormalAllocator(PhysPool(ov, SCRATCH[0], SCRATCH[1] - SCRATCH[0]))
    pt = PageTable(fmt, ov, root=b.root, alloc=alloc)
    pt.protect(DM + 0x3000, 0x1000, clear={"present", "writable", "global_"})
    pt.unmap(DM + (4 << 20), 2 << 20)
    assert b.mem.snapshot() == before
    real = Walker(fmt, base, b.root).run_table(DM, DM + (8 << 20))
    model = Walker(fmt, ov, b.root).run_table(DM, DM + (8 << 20))
    assert [(r.va, r.size, r.page_size) for r in real] == [(DM, 8 << 20, 2 << 20)]
    # the model's view: 3 present 4K pages, the hole, 509 pages, one 2M leaf, the unmapped
    # 2M, one 2M leaf (runs split where the page size changes)
    assert [(r.va - DM, r.size, r.page_size) for r in model] == [
        (0, 0x3000, 4096), (0x4000, 0x1FC000, 4096), (2 << 20, 2 << 20, 2 << 20),
        (6 << 20, 2 << 20, 2 << 20)]
    # one new pte table, from the scratch pool, linked from a private copy of the pmd table
    assert alloc.pool.allocated == 1
    assert all(SCRATCH[0] <= pa < SCRATCH[1] or pa in b.tables for pa in ov.written())
    t = pt.translate(DM + 0x3000)
    assert t.fault is not None and t.steps[-1].entry.oa == 0x3000  # the PFN kept


def test_write_table_is_private_and_read_back() -> None:
    base = SparseMemory(1 << 32)
    base.write_table(0x9000, np.full(512, 7, dtype=np.uint64))
    ov = OverlayMemory(base)
    ov.write_table(0x9000 + 8 * 10, np.array([1, 2, 3], dtype=np.uint64))
    t = ov.read_table(0x9000, 512)
    assert t[9:14].tolist() == [7, 1, 2, 3, 7]
    assert int(base.read_u64(0x9000 + 8 * 10)) == 7
    ov.write_table(0x9ff8, np.array([5, 6], dtype=np.uint64))  # crosses a frame
    assert ov.read_u64(0x9ff8) == 5 and ov.read_u64(0xA000) == 6 and base.read_u64(0xA000) == 0

"""The walker's replay of a batch walked before (x86's ESPFIX area: four pud entries point to
one pmd table, whose 512 entries all point to one pte table): runs, anomalies, work units and
tables read equal those of the walk that scans every copy, also clipped, with holes and when
the budget runs out midway."""

from __future__ import annotations

import pytest
from ptlab.formats.base import Attrs
from ptlab.formats.catalog import by_name
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Walker
from ptlab.walk import walker as walker_mod

F = by_name("x86_64-4level")
ROOT, PUD, PMD, PTE, STACK = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
ESPFIX = 0xFFFF_FF00_0000_0000  # ESPFIX_BASE_ADDR, the p4d slot -2
RW = Attrs(present=True, writable=True, accessed=True, dirty=True, global_=True)


def espfix_like(clones: int = 4, stride: int = 16) -> SparseMemory:
    mem = SparseMemory(1 << 20)
    mem.write_u64(ROOT + 8 * F.index(ESPFIX, 3), F.table(PUD, 3))
    for i in range(clones):
        mem.write_u64(PUD + 8 * i, F.table(PMD, 2))
    for i in range(512):
        mem.write_u64(PMD + 8 * i, F.table(PTE, 1))
    for i in range(0, 512, stride):
        mem.write_u64(PTE + 8 * i, F.leaf(STACK, F.normalize(RW), 0))
    return mem


def walk(mem: SparseMemory, replay: bool, start: int | None = None, end: int | None = None,
         **kw: object) -> tuple[list, list, int, int, bool]:
    mp = pytest.MonkeyPatch()
    if not replay:
        mp.setattr(walker_mod, "_REPLAY_MIN", 1 << 30)
    try:
        w = Walker(F, mem, ROOT, **kw)  # type: ignore[arg-type]
        rows = list(w.run_table(start, end).rows())
    finally:
        mp.undo()
    return rows, [(a.va, a.reason) for a in w.anomalies], w.work, w.tables_visited, w.complete


@pytest.mark.parametrize("kw", [{}, {"include_holes": True}, {"ignore_ad": True}],
                         ids=["plain", "holes", "ignore_ad"])
def test_replay_equals_scan(kw: dict) -> None:
    mem = espfix_like()
    got, want = walk(mem, True, **kw), walk(mem, False, **kw)
    assert got == want
    leaves = [r for r in got[0] if r[2] == STACK]
    assert len(leaves) == 4 * 512 * 512 // 16  # every alias of the stack page, at its own VA
    assert len({r[0] for r in leaves}) == len(leaves)


def test_replay_clipped() -> None:
    mem = espfix_like()
    start = ESPFIX + (1 << 30) + 5 * (2 << 20) + 0x3000  # inside the second pmd copy
    end = ESPFIX + 3 * (1 << 30) - (2 << 20) + 0x11000
    assert walk(mem, True, start, end) == walk(mem, False, start, end)


@pytest.mark.parametrize("max_work", [200_000, 700_000, 1_500_000])
def test_replay_budget(max_work: int) -> None:
    mem = espfix_like()
    got = walk(mem, True, max_work=max_work)
    assert got == walk(mem, False, max_work=max_work)
    assert not got[4] and "work budget" in got[1][-1][1]


def test_replay_not_across_different_tables() -> None:
    """A copy whose pte table differs (one more leaf) is scanned, not replayed."""
    mem = espfix_like(clones=2)
    other = 0x6000
    mem.write(other, mem.read(PTE, 4096))
    mem.write_u64(other + 8 * 3, F.leaf(STACK + 0x1000, F.normalize(RW), 0))
    mem.write_u64(PUD + 8 * 2, F.table(0x7000, 2))
    for i in range(512):
        mem.write_u64(0x7000 + 8 * i, F.table(other, 1))
    got = walk(mem, True)
    assert got == walk(mem, False)
    assert sum(r[2] == STACK + 0x1000 for r in got[0]) == 512

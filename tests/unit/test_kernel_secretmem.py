"""secretmem's per-page direct-map removal vs one batch: N flushes vs 1, same tables."""

from __future__ import annotations

import os
import random

import pytest
from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.arm64 import Arm64
from ptlab.formats.catalog import by_name
from ptlab.kernel.secretmem import remove_batched, remove_per_page, restore
from ptlab.memory.overlay import OverlayMemory
from ptlab.memory.sparse import SparseMemory
from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder
from ptlab.tlb import Gather
from ptlab.walk import Walker

G1, M2, K4 = 1 << 30, 1 << 21, 1 << 12
SCRATCH = (1 << 40, (1 << 40) + (64 << 20))
X86_DM, ARM_DM = 0xFFFF_8880_0000_0000, 0xFFFF_0000_0000_0000
SEED = int(os.environ.get("PTLAB_SEED", random.SystemRandom().randrange(1 << 32)))


class Guest:
    """A 'guest' direct map built without the engine, and fresh overlays of it."""

    def __init__(self, arch: str) -> None:
        if arch == "x86_64":  # [0, 2G): two 1G leaves, [2G, 2G+64M) 2M leaves
            self.fmt, self.dm, pk = by_name("x86_64-4level"), X86_DM, X86_PAGE_KERNEL
            self.b = TableBuilder(self.fmt, SparseMemory(1 << 34))
            self.b.map(self.dm, 0, 2 * G1, self.fmt.normalize(pk), level=2)
            self.b.map(self.dm + 2 * G1, 2 * G1, 64 << 20, self.fmt.normalize(pk), level=1)
            self.size = 2 * G1 + (64 << 20)
        else:  # arm64 rodata=full: 256 MiB of 4K pages
            self.fmt, self.dm, pk = Arm64(4096, 48, upper=True), ARM_DM, ARM64_PAGE_KERNEL
            self.b = TableBuilder(self.fmt, SparseMemory(1 << 34))
            self.b.map(self.dm, 0, 256 << 20, self.fmt.normalize(pk), level=0)
            self.size = 256 << 20

    def table(self) -> PageTable:
        ov = OverlayMemory(self.b.mem, [SCRATCH])
        pool = PhysPool(ov, SCRATCH[0], SCRATCH[1] - SCRATCH[0])
        return PageTable(self.fmt, ov, root=self.b.root, alloc=NormalAllocator(pool),
                         gather=Gather())

    def pages(self, n: int) -> list[int]:
        rng = random.Random(SEED * 1000 + n)
        return [self.dm + pfn * K4 for pfn in sorted(rng.sample(range(self.size // K4), n))]

    def runs(self, pt: PageTable) -> list[tuple]:
        w = Walker(self.fmt, pt.mem, pt.root, ignore_ad=True)
        return [(r.va, r.pa, r.size, r.page_size, r.attrs)
                for r in w.run_table(self.dm, self.dm + self.size)]

    def raws(self, pt: PageTable, vas: list[int]) -> list[tuple[int, int]]:
        return [(pt.translate(v).steps[-1].level, pt.translate(v).steps[-1].raw) for v in vas]


def expected_splits(g: Guest, vas: list[int]) -> dict[int, int]:
    """The kernel's rule, independently: every 1G leaf touched splits once into 2M leaves,
    every 2M leaf touched (original or from a 1G split) splits once into ptes."""
    if g.fmt.arch == "arm64":
        return {}
    off = [v - g.dm for v in vas]
    out = {2: len({o // G1 for o in off if o < 2 * G1}), 1: len({o // M2 for o in off})}
    return {lvl: n for lvl, n in out.items() if n}


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize("n", [1, 16, 512])
def test_per_page_n_flushes_batch_one_same_tables(arch: str, n: int) -> None:
    print(f"PTLAB_SEED={SEED}")
    g = Guest(arch)
    vas = g.pages(n)
    one, many = g.table(), g.table()
    per = remove_per_page(one, vas)
    bat = remove_batched(many, vas)
    assert per.flushes == n and bat.flushes == 1
    assert dict(per.result.splits) == dict(bat.result.splits) == expected_splits(g, vas)
    assert per.split_flushes == sum(expected_splits(g, vas).values())
    assert g.runs(one) == g.runs(many)
    assert g.raws(one, vas) == g.raws(many, vas)
    assert all(one.translate(v).fault is not None for v in vas)
    assert all(one.translate(v).steps[-1].entry.oa == v - g.dm for v in vas)  # PFN kept
    print(f"{arch} n={n}: per-page {per.flushes} flushes {per.seconds * 1e3:.1f} ms, batched "
          f"{bat.flushes} flush {bat.seconds * 1e3:.1f} ms, splits {dict(bat.result.splits)}")
    # release: both paths end equal again, present, no flush; x86 splits stay
    r1, r2 = restore(one, vas), restore(many, vas)
    assert r1.flushes == r2.flushes == 0 and not r1.result.splits
    assert g.runs(one) == g.runs(many)
    assert all(one.translate(v).pa == v - g.dm for v in vas)
    if arch == "x86_64":
        assert {one.translate(v).level for v in vas} == {0}


def test_the_guest_is_never_written() -> None:
    g = Guest("x86_64")
    before = g.b.mem.snapshot()
    pt = g.table()
    remove_batched(pt, g.pages(64))
    assert g.b.mem.snapshot() == before
    assert len(pt.mem.changes()) > 64  # the model did write: in its overlay


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_fused_batch_equals_the_per_page_calls_clustered_and_with_holes(arch: str) -> None:
    """The batch fuses the pages of a 2M window into one engine apply: clustered pages (one
    window, a 1G leaf on x86), scattered ones, a page twice and a hole give the same tables
    and the same CpaResult (changed, splits, preserved, holes) as one call per page."""
    g = Guest(arch)
    rng = random.Random(SEED)
    base = g.dm + (g.size // 2 // M2) * M2
    vas = sorted({base + K4 * i for i in rng.sample(range(512), 200)} | set(g.pages(16)))
    vas.append(g.dm + g.size + 5 * K4)  # not mapped: a hole, skipped
    one, many = g.table(), g.table()
    per, bat = remove_per_page(one, vas), remove_batched(many, vas)
    assert bat.flushes == 1 and per.flushes == len(vas)
    for f in ("changed", "splits", "preserved", "holes"):
        assert getattr(per.result, f) == getattr(bat.result, f), f
    assert len(bat.result.changed) == len(vas) - 1
    assert bat.result.holes == (arch == "x86_64")  # arm64's model does not count them
    assert g.runs(one) == g.runs(many)
    assert g.raws(one, vas[:-1]) == g.raws(many, vas[:-1])


def test_page_runs_merge_adjacent_and_repeated_pages():
    from ptlab.kernel.cpa import PAGE_SIZE, page_runs

    p = PAGE_SIZE
    assert page_runs([5 * p, 3 * p, 4 * p, 4 * p, 9 * p]) == [(3 * p, 6 * p), (9 * p, 10 * p)]
    assert page_runs([]) == []

"""Engine benchmark: prints one ``name: value unit`` line per figure.

Usage: python bench/engine.py [--quick]

Times are the best of ``--repeat`` runs (default 3) on fresh tables; per-operation figures
are medians. Targets (issue 2): map_1GiB_4K_s <= 0.1, walk_260k_leaves_s <= 0.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from ptlab.alloc import NoAllocAllocator, NormalAllocator, PhysPool
from ptlab.arch import arch_for
from ptlab.engine import PageTable
from ptlab.formats.arm64 import Arm64
from ptlab.formats.base import Attrs, Format
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.tlb import Gather
from ptlab.walk import Walker

GIB = 1 << 30
POOL = 1 << 40


def kernel_attrs(fmt: Format) -> Attrs:
    """The architecture's PAGE_KERNEL (ptlab.arch), as the format stores it."""
    return fmt.normalize(arch_for(fmt).page_kernel)


def fresh(fmt: Format) -> tuple[PageTable, PhysPool]:
    mem = SparseMemory()
    pool = PhysPool(mem, POOL, 1 << 32, fmt.table_bytes)
    return PageTable(fmt, mem, alloc=NormalAllocator(pool), gather=Gather()), pool


def base_va(fmt: Format) -> int:
    return fmt.va_ranges()[-1][0] + GIB  # a 1 GiB-aligned VA in the kernel half


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def timed(fn: Callable[..., object], *args: object, **kw: object) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def bench_bulk(fmt: Format, repeat: int) -> dict[str, float]:
    va, a = base_va(fmt), kernel_attrs(fmt)
    out: dict[str, list[float]] = {"map": [], "protect": [], "unmap": []}
    for _ in range(repeat):
        pt, pool = fresh(fmt)
        out["map"].append(timed(pt.map, va, 0, GIB, a, page_sizes=[4096]))
        out["protect"].append(timed(pt.protect, va, GIB, clear=["writable"]))
        out["unmap"].append(timed(pt.unmap, va, GIB))
        assert pool.allocated == 1, "tables left after unmapping everything"
    return {k: min(v) for k, v in out.items()}


def bench_single(fmt: Format, n: int) -> dict[str, float]:
    """Median cost of one 4 KiB map / protect / unmap inside an existing pte table."""
    pt, _ = fresh(fmt)
    va, a = base_va(fmt), kernel_attrs(fmt)
    pt.preallocate(va, n * 4096, 0)
    res: dict[str, list[float]] = {"map": [], "protect": [], "unmap": []}
    clock = time.perf_counter
    for i in range(n):
        v = va + i * 4096
        t0 = clock()
        pt.map(v, i * 4096, 4096, a)
        t1 = clock()
        pt.protect(v, 4096, clear=["writable"])
        t2 = clock()
        pt.unmap(v, 4096)
        t3 = clock()
        res["map"].append(t1 - t0)
        res["protect"].append(t2 - t1)
        res["unmap"].append(t3 - t2)
    return {k: statistics.median(v) * 1e6 for k, v in res.items()}


def linear_map(fmt: Format) -> PageTable:
    """~260k 4 KiB leaves (1 GiB + 16 MiB) with attribute variety: every 64th page
    read-only, every 1000th invalid, a 2 MiB executable text range -> thousands of runs."""
    pt, _ = fresh(fmt)
    va, a = base_va(fmt), kernel_attrs(fmt)
    size = GIB + (16 << 20)
    pt.map(va, 0, size, a, page_sizes=[4096])
    with pt.gather.batch():
        for i in range(0, size // 4096, 64):
            pt.protect(va + i * 4096, 4096, clear=["writable"])
        for i in range(0, size // 4096, 1000):
            pt.protect(va + i * 4096 + 4096, 4096, clear=["present"])
        pt.protect(va, 2 << 20, set={"exec": True}, clear=["writable"])
    return pt


def bench_walk(fmt: Format, repeat: int) -> tuple[float, int, int]:
    pt = linear_map(fmt)
    w = Walker(fmt, pt.mem, pt.root)
    runs: list = []

    def go() -> float:
        nonlocal runs
        t = time.perf_counter()
        runs = list(w.runs())
        return time.perf_counter() - t

    elapsed = best(go, repeat)
    return elapsed, sum(r.count for r in runs), len(runs)


def bench_batch(fmt: Format, n: int) -> tuple[int, int, float]:
    """secretmem-style: n scattered 4 KiB direct-map pages made invalid in one batch."""
    pt, _ = fresh(fmt)
    va, a = base_va(fmt), kernel_attrs(fmt)
    pt.map(va, 0, GIB, a, page_sizes=[4096])
    g = pt.gather
    before = g.stats.flushes
    t = time.perf_counter()
    with g.batch():
        for i in range(n):
            pt.protect(va + (i * 7919 % (GIB // 4096)) * 4096, 4096, clear=["present"])
    elapsed = time.perf_counter() - t
    return g.stats.flushes - before, g.stats.ranges_flushed, elapsed


def bench_noalloc(fmt: Format, n: int) -> float:
    """Median µs of a 4 KiB map into preallocated tables with a no-allocation allocator."""
    pt, _ = fresh(fmt)
    va, a = base_va(fmt), kernel_attrs(fmt)
    pt.preallocate(va, 2 << 20, 0)
    pt.alloc = NoAllocAllocator(fmt.table_bytes)
    times = []
    for i in range(n):
        v = va + (i % 512) * 4096
        t = time.perf_counter()
        pt.map(v, 0, 4096, a)
        times.append(time.perf_counter() - t)
        pt.unmap(v, 4096)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repeat, fewer single ops")
    args = p.parse_args(argv)
    repeat = 1 if args.quick else max(1, args.repeat)
    n_single = 200 if args.quick else 2000
    x86, arm = X86_64(4), Arm64(4096, 48)
    for fmt, tag in ((x86, ""), (arm, "_arm64")):
        bulk = bench_bulk(fmt, repeat)
        print(f"map_1GiB_4K_s{tag}: {bulk['map']:.4f} s")
        print(f"unmap_1GiB_4K_s{tag}: {bulk['unmap']:.4f} s")
        print(f"protect_1GiB_4K_s{tag}: {bulk['protect']:.4f} s")
        single = bench_single(fmt, n_single)
        print(f"map_4K_us{tag}: {single['map']:.1f} us")
        print(f"protect_4K_us{tag}: {single['protect']:.1f} us")
        print(f"unmap_4K_us{tag}: {single['unmap']:.1f} us")
    print(f"map_4K_noalloc_us: {bench_noalloc(x86, n_single):.1f} us")
    for fmt, name in ((x86, "x86_64-4level"), (arm, "arm64-4k-48")):
        elapsed, leaves, runs = bench_walk(fmt, repeat)
        tag = "" if fmt is x86 else "_arm64"
        print(f"walk_260k_leaves_s{tag}: {elapsed:.4f} s")
        print(f"walk_260k_leaves{tag}: {leaves} leaves in {runs} runs ({name})")
    flushes, ranges, elapsed = bench_batch(x86, 1000)
    print(f"batch_invalidate_1000_flushes: {flushes} flushes")
    print(f"batch_invalidate_1000_s: {elapsed:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The walk budget bounds work and memory whatever the memory holds (issue 6, part 7): table
cycles, dense table pointers and random garbage, up to a 1 GiB-sized memory, end in about a
second of CPU with at most ``max_anomalies`` anomalies kept and the rest counted.

Random memories come from one seed: ``PTLAB_SEED`` (decimal) replays a run, else a fresh one;
it is printed and named in every failure message.
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np
import pytest
from ptlab.formats.arm64 import Arm64
from ptlab.formats.base import Format, Kind
from ptlab.formats.x86 import X86_64
from ptlab.memory import SparseMemory
from ptlab.memory.base import OutOfRange, PhysMemory
from ptlab.walk import Walker, translate
from ptlab.walk import walker as walker_module
from ptlab.walk.runs import RunTable

SEED = int(os.environ.get("PTLAB_SEED") or secrets.randbits(63))
WHY = f"(PTLAB_SEED={SEED} replays)"
GIB = 1 << 30
TABLE_BITS = 0x3  # x86 P|RW; arm64 valid|table
CPU_S = 1.0  # "about a second": the default budget's worst case measured at ~0.5 s of CPU


def cpu_walk(w: Walker, **kw: object) -> tuple[float, RunTable]:
    """The runs of ``w`` and the CPU seconds the walk took (CPU time: other processes sharing
    the cores do not count; Run objects are made later, on access)."""
    t = time.process_time()
    runs = w.run_table(**kw)
    return time.process_time() - t, runs


def check_bounded(w: Walker, runs: RunTable, fmt: Format) -> None:
    """What every walk keeps to, whatever the memory holds."""
    assert w.tables_visited <= w.max_tables, WHY
    assert 0 < w.work <= w.max_work, WHY
    assert len(w.anomalies) <= w.max_anomalies + 1, WHY  # +1: the budget's own note
    assert w.anomaly_count == len(w.anomalies) + w.anomalies_dropped, WHY
    assert w.anomalies_dropped >= 0, WHY
    assert len(runs) <= w.work // walker_module.RUN, WHY  # each run was paid for
    end, ranges = 0, fmt.va_ranges()
    for va, size, _pa, page_size, _level, _attrs, count, _kind, _own in runs.rows():
        assert end <= va and size == count * page_size > 0, WHY
        end = va + size
        assert any(s <= va and end <= e for s, e in ranges), WHY


def ring(fmt: Format, k: int) -> tuple[SparseMemory, int]:
    """``k`` tables whose entries all point to the next: T0 -> T1 -> ... -> T0."""
    mem = SparseMemory(GIB)
    n = fmt.entries(0)
    pas = [0x10_0000 + i * fmt.table_bytes for i in range(k)]
    for i, pa in enumerate(pas):
        mem.write_table(pa, np.full(n, pas[(i + 1) % k] | TABLE_BITS, dtype=np.uint64))
    return mem, pas[0]


@pytest.mark.parametrize("fmt", [X86_64(4), Arm64(4096, 48)], ids=lambda f: f.name)
def test_three_table_cycle_ends_fast_with_bounded_anomalies(fmt):
    """A -> B -> C -> A, 512 entries each: 512**3 cycle entries. Unbounded, this recorded
    ~134 M anomalies (minutes, tens of GB); the budget stops it."""
    mem, root = ring(fmt, 3)
    w = Walker(fmt, mem, root)
    secs, runs = cpu_walk(w)
    print(f"{fmt.name}: {secs:.3f} s CPU, {w.tables_visited} tables, work {w.work}, "
          f"{w.anomaly_count} anomalies ({w.anomalies_dropped} dropped)")
    assert secs < CPU_S
    assert len(runs) == 0  # no leaf anywhere
    check_bounded(w, runs, fmt)
    kept = walker_module.DEFAULT_MAX_ANOMALIES
    assert len(w.anomalies) == kept + 1
    assert w.anomalies_dropped > 1_000_000  # counted, not kept
    cycles = [a for a in w.anomalies if "cycle" in a.reason]
    assert len(cycles) == kept
    # every C entry points to A, the root: the first cycle found is C's entry 0
    c = 0x10_0000 + 2 * fmt.table_bytes
    assert cycles[0].entry_pa == c and cycles[0].level == fmt.top_level - 2
    assert cycles[0].raw == root | TABLE_BITS
    assert w.anomalies[-1].reason.startswith(
        f"work budget of {walker_module.DEFAULT_MAX_WORK} units")


@pytest.mark.parametrize("fmt", [X86_64(4), Arm64(4096, 48)], ids=lambda f: f.name)
def test_two_table_cycle_counts_every_cycle_entry(fmt):
    """A -> B -> A fits in the budget: every one of the 512 * 512 cycle entries is counted,
    the first max_anomalies are kept, in VA order."""
    mem, root = ring(fmt, 2)
    w = Walker(fmt, mem, root, max_anomalies=100)
    secs, runs = cpu_walk(w)
    n = fmt.entries(0)
    assert secs < CPU_S and len(runs) == 0
    assert w.anomaly_count == n * n and len(w.anomalies) == 100
    assert w.tables_visited == len(fmt.va_ranges()) + n  # the root once per VA range
    assert [a.va for a in w.anomalies] == sorted(a.va for a in w.anomalies)
    assert all("cycle" in a.reason for a in w.anomalies)


def test_budget_note_is_kept_when_the_anomaly_list_is_full():
    fmt = X86_64(4)
    mem, root = ring(fmt, 3)
    w = Walker(fmt, mem, root, max_anomalies=0, max_work=1 << 20)
    cpu_walk(w)
    assert [a.reason for a in w.anomalies] == [
        "work budget of 1048576 units exhausted: the rest of the walk is skipped"]
    assert w.anomaly_count > 1000 and w.work <= 1 << 20


def test_work_budget_is_spent_proportionally():
    """Half the budget: about half the work and half the table reads, and the holes mode
    covers the whole range up to the VA where the budget ran out and after it."""
    fmt = X86_64(4)
    mem, root = ring(fmt, 3)
    full, half = (Walker(fmt, mem, root, max_work=m, include_holes=True)
                  for m in (1 << 22, 1 << 21))
    _, runs_full = cpu_walk(full)
    _, runs_half = cpu_walk(half)
    assert half.tables_visited < full.tables_visited
    assert abs(half.tables_visited * 2 - full.tables_visited) < full.tables_visited // 8
    for runs in (runs_full, runs_half):  # holes tile every VA range
        assert all(r.kind is Kind.EMPTY for r in runs)
        assert sum(r.size for r in runs) == sum(e - s for s, e in fmt.va_ranges())


class PatternMemory(PhysMemory):
    """``size`` bytes whose every 4K page reads as one of ``pages`` (chosen by a hash of its
    frame number): a memory of that size full of garbage, built cheaply."""

    def __init__(self, pages: list[np.ndarray], size: int) -> None:
        self.pages, self.size = pages, size

    def contains(self, pa: int, size: int = 8) -> bool:
        return 0 <= pa and pa + size <= self.size

    def read(self, pa: int, size: int) -> bytes:
        if not self.contains(pa, size):
            raise OutOfRange(f"{pa:#x}+{size:#x} outside {self.size:#x}")
        out = bytearray()
        while size > 0:
            off = pa & 0xFFF
            n = min(size, 0x1000 - off)
            out += self.read_table(pa - off, 512).tobytes()[off:off + n]
            pa, size = pa + n, size - n
        return bytes(out)

    def read_table(self, pa: int, n: int) -> np.ndarray:
        if pa & 0xFFF or n > 512 or not self.contains(pa, n * 8):
            return super().read_table(pa, n)
        return self.pages[(pa >> 12) * 2654435761 % len(self.pages)][:n]


def garbage_pages(rng: np.random.Generator, kind: str, size: int, count: int = 64) -> list:
    """``count`` pages of one kind of garbage for a memory of ``size`` bytes."""
    frames = size >> 12
    u64 = np.uint64
    out = []
    for _ in range(count):
        ptr = (rng.integers(0, frames, 512, dtype=np.uint64) << u64(12)) | u64(TABLE_BITS)
        noise = rng.integers(0, 1 << 63, 512, dtype=np.uint64) * u64(2) + u64(1)
        if kind == "pointers":  # every entry a table pointer into memory: 512-way fan-out
            page = ptr
        elif kind == "flagged":  # pointers with random attribute bits: no two runs alike
            page = ptr | (noise & u64(0xFFF0_0000_0000_0FFC))
        elif kind == "random":
            page = noise
        else:  # "mixed": half pointers, half random
            page = np.where(rng.integers(0, 2, 512).astype(bool), ptr, noise)
        out.append(page)
    return out


@pytest.mark.parametrize("kind", ["pointers", "flagged", "mixed", "random"])
@pytest.mark.parametrize("holes", [False, True], ids=["runs", "holes"])
def test_1gib_garbage_memory_walks_in_about_a_second(kind, holes):
    fmt = X86_64(4)
    rng = np.random.default_rng([SEED, hash(kind) & 0xFFFF])
    mem = PatternMemory(garbage_pages(rng, kind, GIB), GIB)
    w = Walker(fmt, mem, 0, include_holes=holes, include_nonpresent=holes)
    secs, runs = cpu_walk(w)
    print(f"{kind}: {secs:.3f} s CPU, {len(runs)} runs, {w.tables_visited} tables, work "
          f"{w.work}, {w.anomaly_count} anomalies {WHY}")
    assert secs < CPU_S, WHY
    check_bounded(w, runs, fmt)
    if holes:  # the walk covers the whole VA range, budget or not
        assert sum(r.size for r in runs) == sum(e - s for s, e in fmt.va_ranges()), WHY
    for r in [r for r in runs if r.kind is Kind.LEAF][:20]:  # runs are real translations
        t = translate(fmt, mem, 0, r.va)
        assert t.pa == r.pa and t.level == r.level, WHY


FUZZ_FORMATS = [X86_64(4), X86_64(5), Arm64(4096, 48), Arm64(16384, 47), Arm64(65536, 42)]


def fuzz_memory(rng: np.random.Generator, fmt: Format) -> tuple[SparseMemory, int]:
    """A few tables of random garbage in a 1 GiB memory: random words, pointers to the
    other tables (chains, fan-out, cycles), pointers anywhere, with random flags."""
    mem = SparseMemory(GIB)
    tb = fmt.table_bytes
    ntables = int(rng.integers(2, 12))
    pas = [int(p) * tb for p in rng.choice(GIB // tb, ntables, replace=False)]
    u64 = np.uint64
    for pa in pas:
        n = tb // 8
        style = rng.integers(0, 4)
        to_tables = np.array(pas, dtype=np.uint64)[rng.integers(0, ntables, n)]
        if style == 0:  # dense pointers to the set: fan-out chains and cycles
            raws = to_tables | u64(TABLE_BITS)
        elif style == 1:  # the same with random attribute bits
            raws = to_tables | (rng.integers(0, 1 << 63, n, dtype=np.uint64)
                                & u64(0xFFF0_0000_0000_0FFF)) | u64(1)
        elif style == 2:
            raws = rng.integers(0, 1 << 63, n, dtype=np.uint64) * u64(2) + rng.integers(
                0, 2, n, dtype=np.uint64)
        else:  # sparse: a few pointers in an empty table
            raws = np.zeros(n, dtype=np.uint64)
            at = rng.integers(0, n, 8)
            raws[at] = to_tables[:8] | u64(TABLE_BITS)
        mem.write_table(pa, raws)
    return mem, pas[0]


def test_random_garbage_walks_are_bounded():
    """Many random garbage memories: every walk ends within a bound proportional to its budget
    and keeps at most max_anomalies anomalies."""
    rng = np.random.default_rng(SEED)
    print(f"PTLAB_SEED={SEED}")
    worst = 0.0
    for k in range(60):
        fmt = FUZZ_FORMATS[int(rng.integers(0, len(FUZZ_FORMATS)))]
        mem, root = fuzz_memory(rng, fmt)
        holes = bool(rng.integers(0, 2))
        w = Walker(fmt, mem, root, max_work=1 << 20, max_anomalies=50, include_holes=holes,
                   include_nonpresent=holes, ignore_ad=bool(rng.integers(0, 2)))
        secs, runs = cpu_walk(w)
        worst = max(worst, secs)
        assert secs < CPU_S / 4, f"memory {k} ({fmt.name}): {secs:.2f} s {WHY}"
        check_bounded(w, runs, fmt)
        assert len(w.anomalies) <= 51, WHY
    print(f"slowest walk {worst:.3f} s CPU (budget 2**20: ~1/16 of the default)")

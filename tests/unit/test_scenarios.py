"""ptharness.scenarios helpers on model tables (no QEMU)."""

from __future__ import annotations

import random

import pytest
from ptharness import scenarios
from ptharness.scenarios import DirectMap, RunIndex, ScenarioError
from ptlab.formats.base import Attrs
from ptlab.formats.x86 import X86_64
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Run

K = 0xFFFF_8880_0000_0000
RW = Attrs(writable=True, global_=True, accessed=True, dirty=True)


def run(va: int, size: int, pa: int, ps: int = 4096) -> Run:
    return Run(va, size, pa, ps, 0 if ps == 4096 else 1, RW, size // ps)


RUNS = [run(K, 0x3000, 0x1000), run(K + 0x5000, 0x1000, 0x9000), run(K + 0x200000, 0x200000,
                                                                      0x400000, 0x200000)]


def test_run_index_lookup_and_gaps():
    idx = RunIndex(list(reversed(RUNS)))
    assert idx.pa(K) == 0x1000 and idx.pa(K + 0x2FFF) == 0x3FFF
    assert idx.pa(K + 0x3000) is None and idx.pa(K - 1) is None
    assert idx.pa(K + 0x3FFFFF) == 0x5FFFFF and idx.pa(K + 0x400000) is None
    assert idx.gaps(K, K + 0x400000) == [(K + 0x3000, K + 0x5000), (K + 0x6000, K + 0x200000)]
    assert idx.gaps(K + 0x1000, K + 0x2000) == []
    assert idx.gaps(K - 0x1000, K + 0x1000) == [(K - 0x1000, K)]
    with pytest.raises(ScenarioError, match="overlap"):
        RunIndex([run(K, 0x2000, 0), run(K + 0x1000, 0x1000, 0)])


def test_samples_fall_where_they_should():
    rng = random.Random(1)
    idx = RunIndex(RUNS)
    mapped = scenarios.sample_mapped(idx.runs, 500, rng)
    assert all(idx.pa(va) is not None for va in mapped)
    assert len({idx.run_at(va).va for va in mapped}) == 3  # every run is hit
    lo, hi = K - (1 << 30), K + (1 << 30)
    unmapped = scenarios.sample_unmapped(idx, lo, hi, 300, rng)
    assert all(lo <= va < hi and idx.pa(va) is None for va in unmapped)
    near = [va for va in unmapped if any(0 <= va - r.end < 4096 for r in RUNS)]
    assert len(near) > 50  # half of them sit just past a run
    with pytest.raises(ScenarioError):
        scenarios.sample_mapped([], 1, rng)
    with pytest.raises(ScenarioError):
        scenarios.sample_unmapped(RunIndex([run(K, 0x1000, 0)]), K, K + 0x1000, 1, rng)


def test_system_ram_from_agent_info():
    ram = [{"start": 0x100000, "end": 0x3FFE0000}, {"start": 0x1000, "end": 0x9FC00}]
    assert scenarios.system_ram({"system_ram": ram}) == [(0x1000, 0x9FC00),
                                                         (0x100000, 0x3FFE0000)]
    with pytest.raises(ScenarioError, match="no System RAM"):
        scenarios.system_ram({"system_ram": []})


def test_agent_symbol_and_direct_map():
    info = {"kallsyms": {"linux_banner": 0xFFFFFFFF82000100, "page_offset_base": 0x10}}
    assert scenarios.agent_symbol(info, "linux_banner") == 0xFFFFFFFF82000100
    assert scenarios.agent_symbol(info, "page_offset_base") == 0x10
    with pytest.raises(ScenarioError, match="no symbol 'nope'"):
        scenarios.agent_symbol(info, "nope")
    arm = DirectMap((1 << 64) - (1 << 48), 0x4000_0000)
    assert arm.va(0x4000_0000) == 0xFFFF_0000_0000_0000
    assert arm.va(0x4123_4000) == 0xFFFF_0000_0123_4000
    kaslr = DirectMap((1 << 64) - (1 << 48), (1 << 64) - (1 << 33) + 0x4000_0000)  # negative
    assert kaslr.va(0x4000_0000) == 0xFFFF_0002_0000_0000


def build_process(mem: SparseMemory, fmt: X86_64, root: int, next_table: list[int],
                  maps: dict[int, int]) -> None:
    user = Attrs(writable=True, user=True, exec=False, uexec=False)
    for va, pa in maps.items():
        table = root
        for level in range(fmt.top_level, 0, -1):
            slot = table + fmt.index(va, level) * 8
            raw = mem.read_u64(slot)
            if raw == 0:
                child = next_table[0]
                next_table[0] += 4096
                mem.write_u64(slot, fmt.table(child, level,
                                              fmt.table_attrs().with_(user=True)))
                table = child
            else:
                table = fmt.decode(raw, level).oa
        mem.write_u64(table + fmt.index(va, 0) * 8, fmt.leaf(pa, user, 0))


def test_find_user_roots():
    fmt = X86_64(4)
    mem = SparseMemory(size=16 << 20)
    nxt = [0x200000]
    want = {0x7F00_0000_1000: 0x50_0000, 0x7F00_0000_2000: 0x3F_F000}
    build_process(mem, fmt, 0x100000, nxt, want)
    build_process(mem, fmt, 0x180000, nxt, {0x7F00_0000_1000: 0x60_0000})  # another process
    ranges = [(0, 16 << 20)]
    assert scenarios.find_user_roots(fmt, mem, want, ranges) == [0x100000]
    assert scenarios.find_user_roots(fmt, mem, {0x7F00_0000_1000: 0x60_0000}, ranges) == [
        0x180000
    ]
    assert scenarios.find_user_roots(fmt, mem, {0x7F00_0000_1000: 0x70_0000}, ranges) == []
    with pytest.raises(ScenarioError):
        scenarios.find_user_roots(fmt, mem, {}, ranges)


def test_find_user_roots_of_lpa2_pgd_cache_objects():
    """arm64 5-level LPA2 (Linux 6.12): a process's pgd is a 128-byte pgd_cache object, so
    roots sit at any 128-byte boundary, several to a page."""
    from ptlab.formats.arm64 import Arm64

    fmt = Arm64(4096, 52, upper=False)
    assert fmt.entries(fmt.top_level) * 8 == 128
    mem = SparseMemory(size=16 << 20)
    nxt = [0x200000]
    want = {0x7F00_0000_1000: 0x50_0000}
    build_process(mem, fmt, 0x100080, nxt, want)  # type: ignore[arg-type]
    build_process(mem, fmt, 0x100100, nxt, {0x7F00_0000_1000: 0x60_0000})  # type: ignore[arg-type]
    assert scenarios.find_user_roots(fmt, mem, want, [(0, 16 << 20)]) == [0x100080]


def test_kernel_half():
    assert scenarios.kernel_half(X86_64(4)) == (0xFFFF_8000_0000_0000, 1 << 64)
    assert scenarios.kernel_half(X86_64(5)) == (0xFF00_0000_0000_0000, 1 << 64)

"""The boot direct map's page-size policy (x86 init_memory_mapping, arm64 map_mem).

Expected layouts are derived by hand from the kernel's rules, case by case (comments)."""

from __future__ import annotations

from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.arch import arm64, x86_64
from ptlab.engine import PageTable
from ptlab.formats.catalog import by_name
from ptlab.kernel.direct_map import MapRange, arm64_map_mem, init_mem_mapping, split_mem_range
from ptlab.memory.sparse import SparseMemory
from ptlab.walk import Walker

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
DM = x86_64.PAGE_OFFSET[4]
NONE, TWO, BOTH = frozenset(), frozenset({M2}), frozenset({M2, G1})
# QEMU pc, -m 1G: e820 RAM [0, 0x9fc00) and [1M, 0x3ffe0000), trimmed to pages
QEMU_1G = [(0, 0x9F000), (0x10_0000, 0x3FFE_0000)]
# QEMU pc, -m 4G: 3G below 4G, 1G above
QEMU_4G = [(0, 0x9F000), (0x10_0000, 0xBFFE_0000), (4 * G1, 5 * G1)]


def table(name: str) -> PageTable:
    mem = SparseMemory()
    return PageTable(by_name(name), mem,
                     alloc=NormalAllocator(PhysPool(mem, 1 << 40, 64 << 20)))


def layout(pt: PageTable, base: int, pa_offset: int = 0) -> list[tuple[int, int, int]]:
    """(PA start, PA end, page size) of the mapped runs, merged across attributes."""
    out: list[tuple[int, int, int]] = []
    for r in Walker(pt.fmt, pt.mem, pt.root, ignore_ad=True).run_table(base, base + (8 << 30)):
        s, e = r.va - base + pa_offset, r.va - base + pa_offset + r.size
        if out and out[-1][1] == s and out[-1][2] == r.page_size:
            out[-1] = (out[-1][0], e, r.page_size)
        else:
            out.append((s, e, r.page_size))
    return out


def test_split_mem_range_cases() -> None:
    # 1 GiB guest, [1M, end): 4K head to 2M; 2M to the last 2M boundary; 4K tail. No
    # aligned 2M/1G region around the head or tail is all memory, so adjust adds nothing.
    assert split_mem_range(0x10_0000, 0x3FFE_0000, BOTH, QEMU_1G) == [
        MapRange(0x10_0000, M2, NONE), MapRange(M2, 0x3FE0_0000, TWO),
        MapRange(0x3FE0_0000, 0x3FFE_0000, NONE)]
    # [0, 5G+2M+12K) in 8G of memory: 1G [0,5G), 2M tail [5G,5G+2M), 4K tail; adjust gives
    # the tails 2M and 1G (their aligned surroundings are memory): all merge into one range
    mem8 = [(0, 8 * G1)]
    assert split_mem_range(0, 5 * G1 + M2 + 3 * K4, BOTH, mem8) == [
        MapRange(0, 5 * G1 + M2 + 3 * K4, BOTH)]
    assert split_mem_range(0, 5 * G1 + M2 + 3 * K4, TWO, mem8) == [
        MapRange(0, 5 * G1 + M2 + 3 * K4, TWO)]
    # a range inside one 2M page that is not all memory stays 4K
    assert split_mem_range(0x1000, 0x9F000, BOTH, QEMU_1G) == [MapRange(0x1000, 0x9F000, NONE)]


def test_x86_boot_direct_map_1g_guest() -> None:
    pt = table("x86_64-4level")
    init_mem_mapping(pt, DM, QEMU_1G, x86_64.PAGE_KERNEL)
    # the ISA range is mapped whole; [1M,2M) 4K; 2M leaves; 4K tail to the end of RAM
    assert layout(pt, DM) == [(0, M2, K4), (M2, 0x3FE0_0000, M2),
                              (0x3FE0_0000, 0x3FFE_0000, K4)]


def test_x86_boot_direct_map_4g_guest_with_gbpages() -> None:
    pt = table("x86_64-4level")
    init_mem_mapping(pt, DM, QEMU_4G, x86_64.PAGE_KERNEL)
    # [4G,5G): the first top-down step maps a 2M piece whose 1G surroundings are memory,
    # so a whole 1G leaf; below 4G: 4K head, 2M to 1G, one 1G leaf, 2M, 4K tail
    assert layout(pt, DM) == [
        (0, M2, K4), (M2, G1, M2), (G1, 2 * G1, G1), (2 * G1, 0xBFE0_0000, M2),
        (0xBFE0_0000, 0xBFFE_0000, K4), (4 * G1, 5 * G1, G1)]
    nogb = table("x86_64-4level")
    init_mem_mapping(nogb, DM, QEMU_4G, x86_64.PAGE_KERNEL, gbpages=False)
    assert layout(nogb, DM)[1] == (M2, 0xBFE0_0000, M2)
    assert layout(nogb, DM)[-1] == (4 * G1, 5 * G1, M2)


def test_arm64_map_mem_rodata_full_is_page_granular_except_text_alias() -> None:
    fmt = by_name("arm64-4k-48")
    po = arm64.layout()["PAGE_OFFSET"]
    mem, text = [(G1, 2 * G1)], (0x4021_0000, 0x4200_0000)
    pt = table("arm64-4k-48")
    arm64_map_mem(pt, po, G1, mem, fmt.normalize(arm64.PAGE_KERNEL), text)
    # everything 4K but the text alias, which may use blocks (NO_CONT_MAPPINGS only)
    assert layout(pt, po, G1) == [(G1, 0x4040_0000, K4), (0x4040_0000, 0x4200_0000, M2),
                                  (0x4200_0000, 2 * G1, K4)]
    assert pt.translate(po + 0x0100_0000).attrs.writable is False  # text alias RO
    assert pt.translate(po + 0x0300_0000).attrs.writable is True
    steps = pt.translate(po + 0x0300_0000).steps  # NO_EXEC_MAPPINGS: PXNTable above
    assert [s.entry.attrs.exec for s in steps[:-1]] == [False] * (fmt.levels - 1)
    assert steps[0].raw >> 59 & 1  # PXNTable is bit 59 of a table descriptor
    blocks = table("arm64-4k-48")
    arm64_map_mem(blocks, po, G1, mem, fmt.normalize(arm64.PAGE_KERNEL), text,
                  can_set_direct_map=False)
    leaves = list(blocks.leaves(po, G1))
    assert any(e.attrs.contiguous for _, _, e in leaves)  # CONT_PMD/CONT_PTE outside text
    assert not any(e.attrs.contiguous for v, _, e in leaves
                   if po + 0x21_0000 <= v < po + 0x200_0000)

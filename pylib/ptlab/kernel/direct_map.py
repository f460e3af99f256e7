"""The direct map at boot, from the memory map, with each architecture's page-size policy.

x86-64, arch/x86/mm/init.c and init_64.c (6.1): :func:`init_mem_mapping` maps the ISA
range, then RAM top-down in growing steps (``memory_map_top_down``,
``get_new_step_size``), each step through ``init_range_memory_mapping`` →
``init_memory_mapping`` → ``split_mem_range`` (4K head, 2M up to a 1G boundary, 1G, 2M,
4K tail) + ``adjust_range_page_size_mask`` (a range gets 2M/1G when its aligned
surroundings are all memblock memory) → ``kernel_physical_mapping_init`` (an existing
table is descended, an existing leaf of an allowed size kept, a large leaf where only
4K is allowed split; a 2M/1G leaf maps its whole aligned page).

arm64, arch/arm64/mm/mmu.c ``map_mem`` (6.1): every memblock range at
``__phys_to_virt``; ``can_set_direct_map()`` (rodata=full, DEBUG_PAGEALLOC, KFENCE)
sets NO_BLOCK_MAPPINGS | NO_CONT_MAPPINGS (4K only); the kernel image's alias is mapped
without contiguous hints; then ``mark_linear_text_alias_ro`` makes [_stext, __init_begin)
read-only. Not modelled: the boot-time CPA changes on x86 (mark_rodata_ro aliases,
free_init_pages), memory hot-add (same path, after_bootmem).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..engine import PageTable
from ..formats.base import Attrs, Kind

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
ISA_END_ADDRESS = 0x10_0000  # arch/x86/include/asm/e820/types.h
Ranges = Sequence[tuple[int, int]]  # [start, end) physical ranges (memblock.memory)


@dataclass(frozen=True)
class MapRange:
    """``struct map_range``: [start, end) and the page sizes allowed in it."""

    start: int
    end: int
    sizes: frozenset[int]  # subset of {M2, G1}; 4K is always allowed


def _is_memory(memory: Ranges, start: int, end: int) -> bool:
    """``memblock_is_region_memory``: [start, end) inside one memory range."""
    return any(s <= start and end <= e for s, e in memory)


def _up(a: int, s: int) -> int:
    return -(-a // s) * s


def _down(a: int, s: int) -> int:
    return a // s * s


def split_mem_range(start: int, end: int, sizes: frozenset[int],
                    memory: Ranges) -> list[MapRange]:
    """``split_mem_range`` (x86-64 branch) + ``adjust_range_page_size_mask`` + the merge of
    neighbours with equal page sizes."""
    pieces: list[tuple[int, int, frozenset[int]]] = []
    pos = start

    def save_mr(lo: int, hi: int, allow: frozenset[int]) -> None:
        nonlocal pos
        if lo < hi:
            pieces.append((lo, hi, allow))
            pos = hi

    save_mr(pos, min(_up(pos, M2), end), frozenset())  # head, to a 2M boundary
    save_mr(_up(pos, M2), min(_up(pos, G1), _down(end, M2)), sizes & {M2})  # 2M up to 1G
    save_mr(_up(pos, G1), _down(end, G1), sizes & {M2, G1})  # 1G
    save_mr(_up(pos, M2), _down(end, M2), sizes & {M2})  # tail not 1G-aligned
    save_mr(pos, end, frozenset())  # tail not 2M-aligned
    out: list[MapRange] = []
    for lo, hi, allow in pieces:
        for big in (M2, G1):  # adjust_range_page_size_mask
            if big in sizes and big not in allow and _is_memory(
                    memory, _down(lo, big), _up(hi, big)):
                allow = allow | {big}
        if out and out[-1].end == lo and out[-1].sizes == allow:
            out[-1] = MapRange(out[-1].start, hi, allow)
        else:
            out.append(MapRange(lo, hi, allow))
    return out


def kernel_physical_mapping_init(pt: PageTable, page_offset: int, mr: MapRange,
                                 prot: Attrs) -> None:
    """Map ``mr`` at ``page_offset`` + PA as phys_{pud,pmd,pte}_init do. (A large leaf
    where only smaller pages are allowed is split here; the kernel would remap only the
    range into a fresh table — a case boot never meets.)"""
    pa = mr.start
    while pa < mr.end:
        for size, level in ((G1, 2), (M2, 1)):
            blk = pa - pa % size
            nxt = min(blk + size, mr.end)
            step = next((s for s in pt.translate(page_offset + blk).steps
                         if s.level == level), None)
            kind = step.entry.kind if step is not None else Kind.EMPTY
            if kind is Kind.LEAF and size in mr.sizes:
                break  # an existing large page of an allowed size is reused
            if kind is Kind.LEAF:
                pt.split(page_offset + blk, level)
            elif kind is Kind.EMPTY and size in mr.sizes:
                pt.map(page_offset + blk, blk, size, prot, page_sizes=[size])
                break
        else:  # phys_pte_init: 4K pages wherever nothing is mapped yet
            gap = pa
            have = sorted(v - page_offset for v, _, _ in pt.leaves(page_offset + pa, nxt - pa))
            for h in [*have, nxt]:
                if gap < h:
                    pt.map(page_offset + gap, gap, h - gap, prot, page_sizes=[K4])
                gap = max(gap, h + K4)
        pa = nxt


def init_memory_mapping(pt: PageTable, page_offset: int, start: int, end: int,
                        memory: Ranges, prot: Attrs, sizes: frozenset[int]) -> None:
    for mr in split_mem_range(start, end, sizes, memory):
        kernel_physical_mapping_init(pt, page_offset, mr, prot)


def x86_default_kernel_prot(page_kernel: Attrs, pti: bool) -> Attrs:
    """PAGE_KERNEL masked by ``__default_kernel_pte_mask``: ``probe_page_size_mask`` clears
    ``_PAGE_GLOBAL`` in it when PTI is on (arch/x86/mm/init.c), so the direct map is built
    non-global then."""
    return page_kernel.with_(global_=page_kernel.global_ and not pti)


def init_mem_mapping(pt: PageTable, page_offset: int, memory: Ranges, prot: Attrs, *,
                     gbpages: bool = True, real_end: int | None = None) -> None:
    """The boot direct map of ``memory`` (memblock.memory). ``real_end``: end of the
    2M block ``memory_map_top_down`` allocated (default: the highest one in memory)."""
    sizes = frozenset({M2, G1} if gbpages else {M2})
    end = max(e for _, e in memory)
    init_memory_mapping(pt, page_offset, 0, ISA_END_ADDRESS, memory, prot, sizes)

    def init_range(lo: int, hi: int) -> int:  # init_range_memory_mapping
        done = 0
        for s, e in memory:
            s, e = max(s, lo), min(e, hi)
            if s < e:
                init_memory_mapping(pt, page_offset, s, e, memory, prot, sizes)
                done += e - s
        return done

    if real_end is None:
        real_end = max(e // M2 * M2 for s, e in memory if e // M2 * M2 - M2 >= s)
    step, mapped, last = M2, 0, real_end
    while last > ISA_END_ADDRESS:
        start = max((last - 1) // step * step, ISA_END_ADDRESS) if last > step else \
            ISA_END_ADDRESS
        mapped += init_range(start, last)
        last = start
        if mapped >= step:
            step <<= 8  # get_new_step_size: << (PMD_SHIFT - PAGE_SHIFT - 1)
    if real_end < end:
        init_range(real_end, end)


ARM64_MT_NORMAL_TAGGED = 1  # arch/arm64/include/asm/memory.h (6.1) AttrIndx


def arm64_linear_prot(page_kernel: Attrs, kpti: bool) -> Attrs:
    """``pgprot_tagged(PAGE_KERNEL)``, what ``map_mem`` maps RAM with (AttrIndx
    MT_NORMAL_TAGGED, a plain Normal MAIR slot without MTE); PTE_NG only with kpti
    (``PTE_MAYBE_NG``: ``arm64_use_ng_mappings``). The image alias gets it untagged."""
    return page_kernel.with_(cache=ARM64_MT_NORMAL_TAGGED, global_=not kpti)


def arm64_map_mem(pt: PageTable, page_offset: int, phys_offset: int, memory: Ranges,
                  prot: Attrs, text: tuple[int, int], *,
                  can_set_direct_map: bool = True, text_prot: Attrs | None = None) -> None:
    """``map_mem`` + ``mark_linear_text_alias_ro``: ``text`` is [__pa_symbol(_stext),
    __pa_symbol(__init_begin)), NOMAP while the memory is mapped, then mapped without
    contiguous hints (blocks allowed) with ``text_prot`` (6.1: plain PAGE_KERNEL, RAM gets
    ``pgprot_tagged``; default ``prot``) and made read-only. Every table entry created gets
    PXNTable (``NO_EXEC_MAPPINGS``)."""
    sizes = pt.page_sizes()
    nocont = [s for s in sorted(sizes) if not sizes[s][1]]
    blocks = [K4] if can_set_direct_map else sorted(sizes)
    lm = PageTable(pt.fmt, pt.mem, root=pt.root, alloc=pt.alloc, gather=pt.gather,
                   table_attrs=pt.fmt.table_attrs().with_(exec=False))
    va = lambda p: page_offset + (p - phys_offset)  # noqa: E731  __phys_to_virt
    for s, e in memory:
        for lo, hi in ((s, min(e, text[0])), (max(s, text[1]), e)):
            if lo < hi:
                lm.map(va(lo), lo, hi - lo, prot, page_sizes=blocks)
    lm.map(va(text[0]), text[0], text[1] - text[0], text_prot or prot, page_sizes=nocont)
    lm.protect(va(text[0]), text[1] - text[0], set={"writable": False}, clear={"dbm"})

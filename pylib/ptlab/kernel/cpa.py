"""x86 change_page_attr (CPA) on the engine: arch/x86/mm/pat/set_memory.c, Linux 6.1.

Models ``__change_page_attr_set_clr`` → ``__change_page_attr`` page by page:

* a 4K pte gets ``(old & ~mask_clr) | mask_set``, then ``pgprot_clear_protnone_bits``
  (a non-present entry loses ``_PAGE_GLOBAL``, which means PROTNONE there); ``pfn_pte``
  keeps the PFN, inverted when not present (L1TF: the x86 format encodes that);
* a 2M/1G leaf (``__should_split_large_page``): kept when the new prot equals the old one
  (the rest of the large page is skipped); changed in place when the request covers the
  whole aligned large page; otherwise split (``split_large_page``: 1G → 512 2M leaves,
  2M → 512 4K ptes, same prot, one table page, one ``flush_tlb_all``) and retried;
* a hole (``pte_none``) inside the direct map is skipped (``__cpa_process_fault``),
  elsewhere it is an error (-EFAULT).

Masks are :class:`~ptlab.formats.base.Attrs` field values (``_PAGE_PRESENT`` → present,
``_PAGE_RW`` → writable, ``_PAGE_NX`` → exec/uexec False, ``_PAGE_GLOBAL`` → global_,
``_PAGE_DIRTY`` → dirty). Not modelled: ``static_protections`` (text/rodata/BIOS rules,
which only bite on kernel-image aliases), ``cpa_process_alias`` (the set_direct_map_* calls
use CPA_NO_CHECK_ALIAS), the cache-mode flush (clflush).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..engine import PageTable
from ..formats.base import Attrs, Entry, Kind

PAGE_SIZE = 4096


def page_runs(vas: Iterable[int]) -> list[tuple[int, int]]:
    """The pages at ``vas`` (any order, repeats allowed) as sorted maximal [lo, hi) runs."""
    out: list[tuple[int, int]] = []
    for va in sorted(vas):
        if out and out[-1][1] >= va:
            out[-1] = (out[-1][0], max(out[-1][1], va + PAGE_SIZE))
        else:
            out.append((va, va + PAGE_SIZE))
    return out
Mask = Mapping[str, object]


class CpaError(Exception):
    """A change the kernel refuses (-EFAULT on an unmapped page outside the direct map,
    -EINVAL on arm64 for a block mapping)."""


@dataclass
class CpaResult:
    """What one change did: huge leaves split per level (x86: each split costs one
    ``flush_tlb_all`` in ``__split_large_page``), large pages preserved, and the
    (va, size) of each leaf whose entry was rewritten."""

    splits: Counter[int] = field(default_factory=Counter)
    preserved: int = 0
    changed: list[tuple[int, int]] = field(default_factory=list)
    holes: int = 0

    @property
    def split_flushes(self) -> int:
        return sum(self.splits.values())

    def __iadd__(self, other: CpaResult) -> CpaResult:
        self.splits.update(other.splits)
        self.preserved += other.preserved
        self.changed += other.changed
        self.holes += other.holes
        return self


def new_prot(pt: PageTable, old: Attrs, mask_set: Mask, mask_clr: Mask) -> Attrs:
    """``(old & ~mask_clr) | mask_set`` then ``pgprot_clear_protnone_bits``."""
    a = old.with_(**{**dict(mask_clr), **dict(mask_set)})
    if not a.present:
        a = a.with_(global_=False)
    return pt.fmt.normalize(a, Kind.LEAF)


def leaf_at(pt: PageTable, va: int) -> tuple[int, int, Entry] | None:
    """(leaf VA, level, entry) of the leaf (present or not) covering ``va``: the kernel's
    ``lookup_address``; None for ``pte_none``."""
    return next(iter(pt.leaves(va, PAGE_SIZE)), None)


def change_page_attr_set_clr(pt: PageTable, va: int, numpages: int, mask_set: Mask,
                             mask_clr: Mask, *, holes_ok: bool = True) -> CpaResult:
    """``__change_page_attr_set_clr(cpa, primary=1)`` over [va, va + numpages pages).
    ``holes_ok``: the range is in the direct map, where holes are skipped one page at a
    time; else a hole is -EFAULT and nothing changes. Flushes go to ``pt.gather`` (wrap
    the call in ``noflush_mode`` / ``batch``).

    One engine ``apply`` per pass decides every leaf as ``__change_page_attr`` would; the
    large leaves that must split are split afterwards and their part is passed again."""
    if numpages < 0 or va % PAGE_SIZE:
        raise CpaError(f"CPA needs a page-aligned VA and numpages >= 0, got {va:#x}/{numpages}")
    res = CpaResult()
    if not numpages:
        return res
    if not holes_ok:
        mapped = sum(min(v + pt.fmt.entry_size(lvl), va + numpages * PAGE_SIZE) - max(v, va)
                     for v, lvl, _ in pt.leaves(va, numpages * PAGE_SIZE))
        if mapped != numpages * PAGE_SIZE:
            raise CpaError(f"CPA: called for zero pte in [{va:#x}, +{numpages} pages)")
    todo = [(va, va + numpages * PAGE_SIZE)]
    while todo:
        start, end = todo.pop()
        for lva, level, lo, hi in _cpa_pass(pt, start, end, mask_set, mask_clr, res):
            pt.split(lva, level)  # split_large_page, then `goto repeat` on its part
            res.splits[level] += 1
            todo.append((lo, hi))
    res.changed.sort()
    return res


def _cpa_pass(pt: PageTable, start: int, end: int, mask_set: Mask, mask_clr: Mask,
              res: CpaResult) -> list[tuple[int, int, int, int]]:
    """One ``apply`` over [start, end): changes what can change without a split, returns
    the large leaves that must split as (leaf VA, level, part start, part end)."""
    to_split: list[tuple[int, int, int, int]] = []
    covered = 0

    def decide(lva: int, level: int, ent: Entry) -> Entry | None:
        nonlocal covered
        lp_end = lva + pt.fmt.entry_size(level)
        lo, hi = max(lva, start), min(lp_end, end)
        covered += hi - lo
        want = new_prot(pt, ent.attrs, mask_set, mask_clr)
        if want == ent.attrs:  # nothing to do (cpa_inc_lp_sameprot for a large page)
            res.preserved += level > 0
            return None
        if level and (lo, hi) != (lva, lp_end):  # partly covered: must split
            to_split.append((lva, level, lo, hi))
            return None
        res.changed.append((lva, lp_end - lva))  # a pte, or a whole large page in place
        res.preserved += level > 0
        return Entry(Kind.LEAF, ent.oa, want)

    pt.apply(start, end - start, decide)
    res.holes += (end - start - covered) // PAGE_SIZE
    return to_split



FUSE_GAP = 8 * PAGE_SIZE  # pages further apart get their own apply


def change_pages(pt: PageTable, vas: list[int], prot: Callable[[Attrs], Attrs], *,
                 split: bool = True) -> CpaResult:
    """A one-page change of each direct-map page of ``vas`` (``prot``: old attrs -> new),
    fused: pages of one 2M window less than FUSE_GAP apart change in one engine ``apply``
    over their hull (an apply costs about as much as visiting ~10 leaves). A
    large leaf holding one of them is split first when ``split`` (x86: as the first
    per-page CPA call would; then the window is passed again), else it is an error (arm64
    ``apply_to_page_range``). Same tables and :class:`CpaResult` as the per-page loop; far
    fewer engine operations when pages cluster."""
    res = CpaResult()
    prot = functools.cache(prot)  # a direct map has few distinct attrs
    window = pt.fmt.entry_size(1)
    groups: list[list[int]] = []
    for va in sorted(set(vas)):
        if va % PAGE_SIZE:
            raise CpaError(f"CPA needs page-aligned VAs, got {va:#x}")
        last = groups[-1][-1] if groups else None
        if last is not None and last // window == va // window and va - last <= FUSE_GAP:
            groups[-1].append(va)
        else:
            groups.append([va])
    for members in groups:
        while True:
            to_split = _sparse_pass(pt, members, prot, res, split)
            if not to_split:
                break
            for lva, level in to_split:
                pt.split(lva, level)
                res.splits[level] += 1
    res.changed.sort()
    return res


def _sparse_pass(pt: PageTable, members: list[int], prot: Callable[[Attrs], Attrs],
                 res: CpaResult, split: bool) -> list[tuple[int, int]]:
    """One ``apply`` over the hull of ``members`` (one 2M window: one large leaf, or ptes
    of one table, or holes) changing their ptes; returns the large leaves to split."""
    want = set(members)
    to_split: list[tuple[int, int]] = []
    seen = 0

    def decide(lva: int, level: int, ent: Entry) -> Entry | None:
        nonlocal seen
        if level and not split:
            raise CpaError(f"apply_to_page_range: block mapping at {lva:#x} (level {level})")
        if level:
            n = sum(1 for v in members if lva <= v < lva + pt.fmt.entry_size(level))
            seen += n
            if prot(ent.attrs) == ent.attrs:
                res.preserved += n  # each page's call: cpa_inc_lp_sameprot
            else:
                to_split.append((lva, level))
            return None
        if lva not in want:
            return None
        seen += 1
        a = prot(ent.attrs)
        if a == ent.attrs:
            return None
        res.changed.append((lva, PAGE_SIZE))
        return Entry(Kind.LEAF, ent.oa, a)

    pt.apply(members[0], members[-1] + PAGE_SIZE - members[0], decide)
    if not to_split and split:  # x86 __cpa_process_fault skips a direct-map hole
        res.holes += len(members) - seen
    return to_split

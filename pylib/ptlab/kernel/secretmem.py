"""Direct-map removal of scattered pages: secretmem's per-page path and a batched one.

* :func:`secretmem_fault` — mm/secretmem.c ``secretmem_fault()`` (6.1): per page,
  ``set_direct_map_invalid_noflush(page)`` then ``flush_tlb_kernel_range(addr, addr +
  PAGE_SIZE)``: one flush per page (plus, on x86, the ``flush_tlb_all`` of each split).
* :func:`secretmem_free_folio` — ``secretmem_free_folio()``: ``set_direct_map_default_
  noflush()`` and no flush (a not-present entry is never cached, so making it present
  needs none); on x86 the split stays (6.1 CPA does not re-merge).
* :func:`remove_batched` — the guest_memfd NO_DIRECT_MAP idea (``folio_zap_direct_map``)
  applied to N scattered pages at once: every removal in one :meth:`Gather.batch`, so
  exactly one ``flush_tlb_kernel_range`` covers them all; the per-page changes are fused
  per 2M window (:func:`.cpa.change_pages`), with the per-page path's tables and result.

:func:`remove_per_page` / :func:`remove_batched` / :func:`restore` take direct-map VAs
(``page_address()``: the harness adds the guest's PAGE_OFFSET) and report what the
kernel would have cost: flushes, splits, seconds of model time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..engine import PageTable
from .cpa import PAGE_SIZE, CpaResult, page_runs
from .set_direct_map import (
    set_direct_map_default_noflush,
    set_direct_map_invalid_noflush,
    set_direct_map_noflush_pages,
)


@dataclass
class Removal:
    """What removing (or restoring) ``pages`` direct-map pages cost."""

    pages: int
    flushes: int  # TLB flushes of ranges (flush_tlb_kernel_range / the batch's one flush)
    result: CpaResult = field(default_factory=CpaResult)
    seconds: float = 0.0

    @property
    def split_flushes(self) -> int:
        """x86 ``flush_tlb_all`` calls made by ``__split_large_page`` (0 on arm64)."""
        return self.result.split_flushes


def secretmem_fault(pt: PageTable, va: int, **kw: object) -> CpaResult:
    """Take the page at direct-map ``va`` out of the direct map, then flush it."""
    res = set_direct_map_invalid_noflush(pt, va, **kw)
    flush_tlb_kernel_range(pt, va, va + PAGE_SIZE)
    return res


def secretmem_free_folio(pt: PageTable, va: int, **kw: object) -> CpaResult:
    """Give the page back to the direct map (no flush)."""
    return set_direct_map_default_noflush(pt, va, **kw)


def flush_tlb_kernel_range(pt: PageTable, start: int, end: int) -> None:
    """One kernel-range flush through the table's gather (with whatever it holds)."""
    pt.gather.add_range(start, end)
    pt.gather.flush()


def _run(pt: PageTable, vas: Iterable[int], one: object, batched: bool,
         kw: dict[str, object]) -> Removal:
    vas = list(vas)
    f0, res = pt.gather.flushes, CpaResult()
    t0 = time.perf_counter()
    if batched:  # the per-page removals, fused per 2M window; one flush for all
        with pt.gather.batch():
            res += set_direct_map_noflush_pages(pt, "invalid", vas, **kw)  # type: ignore[arg-type]
            for lo, hi in page_runs(vas):  # (add_range would merge them anyway)
                pt.gather.add_range(lo, hi)
    else:
        for va in vas:
            res += one(pt, va, **kw)  # type: ignore[operator]
    dt = time.perf_counter() - t0
    return Removal(len(vas), pt.gather.flushes - f0, res, dt)


def remove_per_page(pt: PageTable, vas: Iterable[int], **kw: object) -> Removal:
    """secretmem: each page removed and flushed on its own (N flushes)."""
    return _run(pt, vas, secretmem_fault, False, kw)


def remove_batched(pt: PageTable, vas: Iterable[int], **kw: object) -> Removal:
    """All pages removed in one gather batch: exactly one flush."""
    return _run(pt, vas, None, True, kw)


def restore(pt: PageTable, vas: Iterable[int], **kw: object) -> Removal:
    """secretmem release of each page: default protection back, no flush."""
    return _run(pt, vas, secretmem_free_folio, False, kw)

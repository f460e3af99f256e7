"""set_direct_map_* and set_memory_* on the engine, per architecture (Linux 6.1).

x86 (arch/x86/mm/pat/set_memory.c) goes through CPA (:mod:`.cpa`):
``set_direct_map_invalid_noflush`` = ``__set_pages_np`` (clear PRESENT|RW, no alias check),
``set_direct_map_default_noflush`` = ``__set_pages_p`` (set PRESENT|RW: ``_PAGE_GLOBAL``,
dropped when the page went non-present, does not come back, and the split stays — 6.1
never re-merges); ``set_memory_{ro,rw,nx,x,np,p}`` end in one ``cpa_flush``.

arm64 (arch/arm64/mm/pageattr.c) never splits: ``set_direct_map_*_noflush`` return 0
unless ``can_set_direct_map()`` (rodata=full, DEBUG_PAGEALLOC or KFENCE, which make
``map_mem`` page-granular), and ``apply_to_page_range`` refuses a block (-EINVAL, its
``WARN_ON_ONCE(pmd_leaf())``). invalid clears ``PTE_VALID`` only; default sets
``PTE_VALID | PTE_WRITE`` and clears ``PTE_RDONLY``. ``__change_memory_common`` (set_memory_*)
ends in one ``flush_tlb_kernel_range``.

Every call returns a :class:`~.cpa.CpaResult`; flush ranges go to ``pt.gather`` (the
``*_noflush`` calls run in its no-flush mode: the caller flushes, as secretmem does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engine import PageTable
from ..formats.arm64 import LEAF_SW_BITS
from ..formats.base import Entry, Kind
from .cpa import (
    PAGE_SIZE,
    CpaError,
    CpaResult,
    Mask,
    change_page_attr_set_clr,
    change_pages,
    new_prot,
)

Alias = Callable[[int], "int | None"]  # PA -> direct-map VA (x86 cpa_process_alias)
GP_SW = 1 << LEAF_SW_BITS.index(50)  # PTE_GP (bit 50) in the arm64 leaf's sw field
_GP = {"x": True, "nx": False}  # set_memory_x sets PTE_MAYBE_GP, set_memory_nx clears it

# set/clear masks as Attrs fields, per arch and call: (mask_set, mask_clr)
_X86: dict[str, tuple[Mask, Mask]] = {
    "invalid": ({}, {"present": False, "writable": False}),  # __set_pages_np
    "default": ({"present": True, "writable": True}, {}),  # __set_pages_p
    "ro": ({}, {"writable": False}),  # clear _PAGE_RW (6.1; _PAGE_DIRTY too from 6.6)
    "rw": ({"writable": True}, {}),
    "nx": ({"exec": False, "uexec": False}, {}),  # set _PAGE_NX
    "x": ({"exec": True, "uexec": True}, {}),  # clear _PAGE_NX
    "np": ({}, {"present": False}),
    "p": ({"present": True}, {}),
    "global": ({"global_": True}, {}),
    "nonglobal": ({}, {"global_": False}),
}
_ARM64: dict[str, tuple[Mask, Mask]] = {
    "invalid": ({}, {"present": False}),  # clear PTE_VALID
    "default": ({"present": True, "dbm": True}, {"writable": True}),  # VALID|WRITE, ~RDONLY
    "ro": ({"writable": False}, {"dbm": False}),  # set PTE_RDONLY, clear PTE_WRITE
    "rw": ({"dbm": True}, {"writable": True}),  # set PTE_WRITE, clear PTE_RDONLY
    "nx": ({"exec": False}, {}),  # set PTE_PXN
    "x": ({}, {"exec": True}),  # clear PTE_PXN
    "np": ({}, {"present": False}),  # set_memory_valid(.., 0)
    "p": ({"present": True}, {}),
}


@dataclass(frozen=True)
class Arm64Config:
    """The boot facts ``can_set_direct_map()`` reads (Debian 6.1: rodata=full by default)."""

    rodata_full: bool = True
    debug_pagealloc: bool = False
    kfence: bool = False
    bti: bool = False  # system_supports_bti(): PTE_MAYBE_GP is PTE_GP (sw bit GP_SW)

    def can_set_direct_map(self) -> bool:
        return self.rodata_full or self.debug_pagealloc or self.kfence


def _arm64_apply(pt: PageTable, va: int, numpages: int, masks: tuple[Mask, Mask],
                 gp: bool | None = None) -> CpaResult:
    """``apply_to_page_range`` + ``change_page_range``: every pte in the range gets the
    masks (``gp``: PTE_GP set or cleared as well); a block is an error and changes nothing.
    (The kernel would also fill holes with tables; the linear map has none, and this model
    never allocates.)"""
    mask_set, mask_clr = masks
    res = CpaResult()

    def change(lva: int, level: int, e: Entry) -> Entry:
        if level:
            raise CpaError(f"apply_to_page_range: block mapping at {lva:#x} (level {level})")
        a = e.attrs.with_(**{**dict(mask_clr), **dict(mask_set)})
        if gp is not None:
            a = a.with_(sw=a.sw | GP_SW if gp else a.sw & ~GP_SW)
        a = pt.fmt.normalize(a, Kind.LEAF)
        if a != e.attrs:
            res.changed.append((lva, PAGE_SIZE))
        return Entry(Kind.LEAF, e.oa, a)

    pt.apply(va, numpages * PAGE_SIZE, change)
    return res


def _x86_change(pt: PageTable, what: str, va: int, numpages: int, cfg: Arm64Config,
                direct_map: bool, alias: Alias | None = None,
                area: tuple[int, int] | None = None) -> CpaResult:
    mask_set, mask_clr = _X86[what]
    pages = [va + i * PAGE_SIZE for i in range(numpages)] if alias is not None else []
    pas = [pt.translate(v).pa for v in pages]
    res = change_page_attr_set_clr(pt, va, numpages, mask_set, mask_clr)
    if alias is None or what in ("nx", "x"):  # checkalias: none for an _PAGE_NX change
        return res
    for v, pa in zip(pages, pas, strict=True):
        lva = alias(pa) if pa is not None else None
        if lva is not None and lva != v:  # the primary call did not touch the direct map
            res += change_page_attr_set_clr(pt, lva, 1, mask_set, mask_clr)
    return res


def _arm64_change(pt: PageTable, what: str, va: int, numpages: int, cfg: Arm64Config,
                  direct_map: bool, alias: Alias | None = None,
                  area: tuple[int, int] | None = None) -> CpaResult:
    if direct_map and not cfg.can_set_direct_map():
        return CpaResult()  # the kernel returns 0 and changes nothing
    if what not in _ARM64:
        raise CpaError(f"arm64 has no set_memory_{what}")
    masks = _ARM64[what]
    res = CpaResult()
    if alias is not None and cfg.rodata_full and what in ("ro", "rw"):  # PTE_RDONLY change
        lo, hi = area if area is not None else (va, va + numpages * PAGE_SIZE)
        for page in range(lo, hi, PAGE_SIZE):  # every page of the vm area, not the range
            pa = pt.translate(page).pa
            lva = alias(pa) if pa is not None else None
            if lva is not None:
                res += _arm64_apply(pt, lva, 1, masks)
    res += _arm64_apply(pt, va, numpages, masks, gp=_GP.get(what) if cfg.bti else None)
    if not direct_map:  # __change_memory_common flushes the range unconditionally
        pt.gather.add_range(va, va + numpages * PAGE_SIZE)
    return res


_BY_ARCH = {"x86_64": _x86_change, "arm64": _arm64_change}  # Format.arch -> implementation


def _change(pt: PageTable, what: str, va: int, numpages: int, *,
            arm64: Arm64Config | None = None, direct_map: bool = False,
            alias: Alias | None = None, area: tuple[int, int] | None = None) -> CpaResult:
    impl = _BY_ARCH.get(pt.fmt.arch)
    if impl is None:
        raise CpaError(f"no set_memory model for architecture {pt.fmt.arch!r}")
    return impl(pt, what, va, numpages, arm64 or Arm64Config(), direct_map, alias, area)


def set_direct_map_invalid_noflush(pt: PageTable, va: int, **kw: object) -> CpaResult:
    """Remove the direct-map page at ``va`` (no flush: the caller flushes)."""
    with pt.gather.noflush_mode():
        return _change(pt, "invalid", va, 1, direct_map=True, **kw)  # type: ignore[arg-type]


def set_direct_map_default_noflush(pt: PageTable, va: int, **kw: object) -> CpaResult:
    """Restore the direct-map page at ``va`` to the default protection (no flush)."""
    with pt.gather.noflush_mode():
        return _change(pt, "default", va, 1, direct_map=True, **kw)  # type: ignore[arg-type]


def set_memory(pt: PageTable, what: str, va: int, numpages: int, **kw: object) -> CpaResult:
    """``set_memory_<what>(va, numpages)`` for ``what`` in ro, rw, nx, x, np, p (and on
    x86 global, nonglobal): the change, then one flush of the range (``cpa_flush`` /
    ``flush_tlb_kernel_range``). x86 ``alias=`` (PA -> its direct-map VA, None when
    ``pfn_range_is_mapped`` is false): ``cpa_process_alias`` — each page's direct-map alias
    gets the same masks, except for an _PAGE_NX-only change (``checkalias``) and a page
    that is its own alias; holes there are skipped (``primary`` 0). The high kernel-image
    alias (``__cpa_pfn_in_highmap``) is not modelled. arm64 ``alias=`` with ``area=``
    ([start, end) of the vm area holding the range; default the range): with rodata_full,
    a PTE_RDONLY change (ro, rw) goes to the linear alias of every page of the area
    (``change_memory_common``); ``Arm64Config.bti``: x sets and nx clears PTE_GP."""
    if what not in _X86 or what in ("invalid", "default"):
        raise CpaError(f"no set_memory_{what}; known: ro, rw, nx, x, np, p, global, nonglobal")
    with pt.gather.batch():
        return _change(pt, what, va, numpages, **kw)  # type: ignore[arg-type]


def _x86_pages(pt: PageTable, what: str, vas: list[int], cfg: Arm64Config) -> CpaResult:
    mask_set, mask_clr = _X86[what]
    return change_pages(pt, vas, lambda a: new_prot(pt, a, mask_set, mask_clr))


def _arm64_pages(pt: PageTable, what: str, vas: list[int], cfg: Arm64Config) -> CpaResult:
    if not cfg.can_set_direct_map():
        return CpaResult()
    mask_set, mask_clr = _ARM64[what]
    return change_pages(pt, vas, lambda a: pt.fmt.normalize(
        a.with_(**{**dict(mask_clr), **dict(mask_set)}), Kind.LEAF), split=False)


_PAGES_BY_ARCH = {"x86_64": _x86_pages, "arm64": _arm64_pages}


def set_direct_map_noflush_pages(pt: PageTable, what: str, vas: list[int],
                                 arm64: Arm64Config | None = None) -> CpaResult:
    """``set_direct_map_{what}_noflush(page)`` (``what``: invalid or default) for each
    direct-map page of ``vas``, fused per 2M window (:func:`.cpa.change_pages`): the same
    tables and result as the per-page calls, no flush."""
    impl = _PAGES_BY_ARCH.get(pt.fmt.arch)
    if impl is None:
        raise CpaError(f"no set_direct_map model for architecture {pt.fmt.arch!r}")
    if what not in ("invalid", "default"):
        raise CpaError(f"no set_direct_map_{what}_noflush; known: invalid, default")
    with pt.gather.noflush_mode():
        return impl(pt, what, list(vas), arm64 or Arm64Config())

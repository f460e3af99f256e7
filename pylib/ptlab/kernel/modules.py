"""A loadable module's core mapping in the modules area: ``load_module`` then ``delete_module``.

Models (Linux 6.1, x86-64 and arm64):

* kernel/module/main.c ``layout_sections``: the core layout is four page-aligned groups in
  order, text (SHF_EXECINSTR), rodata, ro_after_init (``.data..ro_after_init`` and
  ``__jump_table``, flagged SHF_RO_AFTER_INIT by ``layout_and_allocate``), data (writable,
  then the core symtab/strtab of ``layout_symtab``); ``/sys/module/NAME/coresize`` is its size.
* ``module_alloc`` (arch/x86/kernel/module.c, arch/arm64/kernel/module.c) -> mm/vmalloc.c
  ``__vmalloc_node_range`` (PAGE_KERNEL, 4 KiB pages, ``vmap_pages_range``) in the modules
  area, with one unmapped guard page after the area (no VM_NO_GUARD).
* kernel/module/strict_rwx.c ``module_enable_ro`` / ``module_enable_nx`` /
  ``module_enable_x`` through set_memory_* (x86 CPA, arm64 pageattr.c): text RO+X, rodata RO+NX,
  ro_after_init RO+NX (after init, ``do_init_module``), data RW+NX.
* ``free_module`` -> ``module_memfree`` -> ``vfree`` -> ``vunmap_range_noflush``: the PTEs
  cleared, the page tables kept.
* the direct-map aliases of the core pages: x86 ``set_memory_ro`` makes the alias of each
  page it touches read-only (``cpa_process_alias``), arm64 with rodata=full the linear alias
  of every page of the area (``change_memory_common``); vfree's ``vm_remove_mappings``
  makes them writable again (x86: and non-global).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import PageTable
from ..formats.base import Attrs
from .set_direct_map import (
    Alias,
    Arm64Config,
    set_direct_map_default_noflush,
    set_direct_map_invalid_noflush,
    set_memory,
)

PAGE = 4096
RO_AFTER_INIT = (".data..ro_after_init", "__jump_table")  # layout_and_allocate
DATA_ANCHORS = (".data", ".bss", ".gnu.linkonce.this_module")  # always writable


class ModuleLayoutError(ValueError):
    """Sections that cannot be a 6.1 core layout."""


def _floor(a: int) -> int:
    return a & ~(PAGE - 1)


def _is_text(name: str) -> bool:
    """SHF_EXECINSTR sections: .text*, x86 .altinstr_replacement, arm64 .plt."""
    return "text" in name or name in (".altinstr_replacement", ".plt")


@dataclass(frozen=True)
class CoreLayout:
    """[base, base+size) split at page boundaries: text | rodata | ro_after_init | data."""

    base: int
    size: int
    ro: int  # rodata start (text end)
    ro_after_init: int
    data: int

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def guard(self) -> int:
        """The vmalloc guard page's VA (unmapped)."""
        return self.end

    @classmethod
    def of(cls, sections: Mapping[str, int], coresize: int) -> CoreLayout:
        """From ``/sys/module/NAME/sections/*`` addresses and ``coresize``; sections outside
        the core (the freed init layout) are ignored."""
        if coresize <= 0 or coresize % PAGE:
            raise ModuleLayoutError(f"coresize {coresize:#x} is not a positive page multiple")
        if ".text" not in sections:
            raise ModuleLayoutError("no .text section")
        base = _floor(sections[".text"])
        core = {n: a for n, a in sections.items() if base <= a < base + coresize}
        ro = [a for n, a in core.items() if not _is_text(n)]
        data = [a for n, a in core.items() if n in DATA_ANCHORS]
        if not ro or not data:
            raise ModuleLayoutError(f"core sections {sorted(core)} lack rodata or data")
        d = _floor(min(data))
        roai = [a for n, a in core.items() if n in RO_AFTER_INIT]
        out = cls(base, coresize, _floor(min(ro)), _floor(min(roai)) if roai else d, d)
        if not base < out.ro <= out.ro_after_init <= out.data < out.end:
            raise ModuleLayoutError(f"groups out of order: {out}")
        return out

    def attrs(self, va: int, page_kernel: Attrs) -> Attrs:
        """The page at ``va``'s final protection (after ``do_init_module``)."""
        if not self.base <= va < self.end:
            raise ModuleLayoutError(f"{va:#x} is outside the core [{self.base:#x}, {self.end:#x})")
        if va < self.ro:
            return page_kernel.with_(writable=False, exec=True)  # set_memory_ro + _x
        if va < self.data:
            return page_kernel.with_(writable=False, exec=False)  # set_memory_ro + _nx
        return page_kernel.with_(exec=False)  # module_enable_nx


def _pages(a: int, b: int) -> int:
    return (b - a) // PAGE


def load(pt: PageTable, lay: CoreLayout, pa_of: Callable[[int], int],
         page_kernel: Attrs, alias: Alias | None = None,
         arm64: Arm64Config | None = None) -> int:
    """``load_module``'s core mapping: ``vmap_pages_range`` maps each core page at the PA
    the kernel gave it (``pa_of(va)``; vmalloc picks any free pages) with PAGE_KERNEL, the
    guard page left unmapped; then ``complete_formation``'s ``module_enable_ro(mod, false)``,
    ``module_enable_nx``, ``module_enable_x`` and ``do_init_module``'s
    ``module_enable_ro(mod, true)`` through set_memory_*. ``alias`` (PA -> direct-map VA):
    x86 ``cpa_process_alias`` also makes the direct-map alias of each page set_memory_ro
    touches read-only (NX changes have no alias check); arm64 (rodata_full) makes the
    linear alias of every page of the core read-only (``change_memory_common``).
    Returns the pages mapped."""
    n = 0
    for va in range(lay.base, lay.end, PAGE):
        pt.map(va, pa_of(va), PAGE, page_kernel, page_sizes=[PAGE])
        n += 1
    kw: dict[str, Any] = {"arm64": arm64} if arm64 is not None else {}
    akw = {**kw, "alias": alias, "area": (lay.base, lay.end)} if alias is not None else kw
    set_memory(pt, "ro", lay.base, _pages(lay.base, lay.ro_after_init), **akw)  # text, rodata
    set_memory(pt, "nx", lay.ro, _pages(lay.ro, lay.end), **kw)
    set_memory(pt, "x", lay.base, _pages(lay.base, lay.ro), **kw)
    set_memory(pt, "ro", lay.ro_after_init, _pages(lay.ro_after_init, lay.data), **akw)
    return n


def free_init(pt: PageTable, base: int, pas: list[int], page_kernel: Attrs,
              alias: Alias | None = None) -> None:
    """The init layout's life, seen from after ``do_free_init``: ``module_alloc`` maps its
    pages (``pas``, from ``base``) with PAGE_KERNEL, ``module_memfree`` clears the PTEs
    (tables kept) and, with ``alias``, ``vm_remove_mappings`` resets each page's direct-map
    alias as for the core (so the init text's RO alias, set in between, does not survive
    and is not modelled)."""
    for i, pa in enumerate(pas):
        pt.map(base + i * PAGE, pa, PAGE, page_kernel, page_sizes=[PAGE])
    size = len(pas) * PAGE
    _vfree(pt, base, size, alias)


def unload(pt: PageTable, lay: CoreLayout, alias: Alias | None = None) -> None:
    """``free_module``'s vfree of the core: ``remove_vm_area`` clears the PTEs (page tables
    kept); with ``alias``, VM_FLUSH_RESET_PERMS (``set_vm_flush_reset_perms`` in
    ``module_enable_ro``) then runs ``vm_remove_mappings``: each page's direct-map alias
    ``set_direct_map_invalid_noflush`` then ``_default_noflush`` (RW, and on x86 no longer
    global: CPA drops _PAGE_GLOBAL on the non-present step)."""
    _vfree(pt, lay.base, lay.size, alias)


def _vfree(pt: PageTable, base: int, size: int, alias: Alias | None) -> None:
    """vfree of a VM_FLUSH_RESET_PERMS area: PTEs cleared, then ``vm_remove_mappings``."""
    pas = [pt.translate(va).pa for va in range(base, base + size, PAGE)]
    pt.unmap(base, size, free_tables=False)
    if alias is None:
        return
    lvas = [alias(pa) for pa in pas if pa is not None]
    for step in (set_direct_map_invalid_noflush, set_direct_map_default_noflush):
        for lva in lvas:
            if lva is not None:
                step(pt, lva)

"""A loadable module's core mapping in the modules area: ``load_module`` then ``delete_module``.

Models (Linux 6.1, x86-64 first):

* kernel/module/main.c ``layout_sections``: the core layout is four page-aligned groups in
  order, text (SHF_EXECINSTR), rodata, ro_after_init (``.data..ro_after_init`` and
  ``__jump_table``, flagged SHF_RO_AFTER_INIT by ``layout_and_allocate``), data (writable,
  then the core symtab/strtab of ``layout_symtab``); ``/sys/module/NAME/coresize`` is its size.
* ``module_alloc`` (arch/x86/kernel/module.c) -> mm/vmalloc.c ``__vmalloc_node_range``
  (PAGE_KERNEL, 4 KiB pages, ``vmap_pages_range``) in [MODULES_VADDR, MODULES_END), with
  one unmapped guard page after the area (no VM_NO_GUARD).
* kernel/module/strict_rwx.c ``module_enable_ro`` / ``module_enable_nx`` /
  ``module_enable_x`` through arch/x86/mm/pat/set_memory.c: text RO+X, rodata RO+NX,
  ro_after_init RO+NX (after init, ``do_init_module``), data RW+NX.
* ``free_module`` -> ``module_memfree`` -> ``vfree`` -> ``vunmap_range_noflush``: the PTEs
  cleared, the page tables kept.

The direct-map aliases of the module's pages (``cpa_process_alias``; reset by
VM_FLUSH_RESET_PERMS on vfree) are not modelled here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ptlab.engine import PageTable
from ptlab.formats.base import Attrs

PAGE = 4096
RO_AFTER_INIT = (".data..ro_after_init", "__jump_table")  # layout_and_allocate
DATA_ANCHORS = (".data", ".bss", ".gnu.linkonce.this_module")  # always writable


class ModuleLayoutError(ValueError):
    """Sections that cannot be a 6.1 core layout."""


def _floor(a: int) -> int:
    return a & ~(PAGE - 1)


def _is_text(name: str) -> bool:
    return "text" in name or name == ".altinstr_replacement"


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


def load(pt: PageTable, lay: CoreLayout, pa_of: Callable[[int], int],
         page_kernel: Attrs) -> int:
    """``load_module``'s final core mapping: each core page at the PA the kernel gave it
    (``pa_of(va)``; vmalloc picks any free pages) with its group's protection; the guard
    page stays unmapped. Returns the pages mapped."""
    n = 0
    for va in range(lay.base, lay.end, PAGE):
        pt.map(va, pa_of(va), PAGE, lay.attrs(va, page_kernel), page_sizes=[PAGE])
        n += 1
    return n


def unload(pt: PageTable, lay: CoreLayout) -> None:
    """``free_module``'s vfree of the core: PTEs cleared, page tables kept."""
    pt.unmap(lay.base, lay.size, free_tables=False)

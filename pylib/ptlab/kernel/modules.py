"""A loadable module's core mapping in the modules area: ``load_module`` then ``delete_module``.

Models Linux 6.1 (:class:`CoreLayout`, :func:`load`, :func:`unload`) and 6.12
(:class:`ModuleMemory`, :func:`load_areas`, :func:`unload_areas`), x86-64 and arm64.

6.1:

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

6.12 (kernel/module/main.c ``move_module`` / ``module_memory_alloc``, mm/execmem.c): each
non-empty ``mod->mem[type]`` (MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT and the three
init types) is its own ``execmem_alloc`` -> ``__vmalloc_node_range`` area in the modules area
(PAGE_KERNEL, 4 KiB pages, a guard page after each, VM_FLUSH_RESET_PERMS on every one);
``coresize`` is the sum of the four core areas. strict_rwx.c: ``module_enable_rodata_ro``
(rodata, then ro_after_init after init), ``module_enable_data_nx``,
``module_enable_text_rox`` (x86 ``set_memory_rox``, elsewhere ro then x), each on its own
area only, so an arm64 rodata_full alias change covers that area's pages and not the data's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    """Sections that cannot be a core layout of the kernel's series."""


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

    @property
    def guards(self) -> list[int]:
        return [self.end]

    def pages(self) -> list[int]:
        return list(range(self.base, self.end, PAGE))

    def contains(self, va: int) -> bool:
        return self.base <= va < self.end

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
    def change(what: str, lo: int, hi: int) -> None:  # (the alias only follows ro / rw)
        set_memory(pt, what, lo, _pages(lo, hi), arm64=arm64, alias=alias,
                   area=(lay.base, lay.end))

    change("ro", lay.base, lay.ro_after_init)  # text, rodata
    change("nx", lay.ro, lay.end)
    change("x", lay.base, lay.ro)
    change("ro", lay.ro_after_init, lay.data)
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


# --- Linux 6.12: one vm area per memory type -------------------------------------------------

MOD_TEXT, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT = "text", "data", "rodata", "ro_after_init"
THIS_MODULE = ".gnu.linkonce.this_module"  # always in MOD_DATA


@dataclass(frozen=True)
class Area:
    """One ``mod->mem[type]``: [base, base+size), the guard page at ``end``."""

    kind: str
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


def mapped_area(va: int, mapped: Callable[[int], bool]) -> tuple[int, int]:
    """[start, end) of the vmalloc area holding ``va``: the maximal run of mapped pages
    around it (every area ends at its unmapped guard page, so two never touch)."""
    if not mapped(_floor(va)):
        raise ModuleLayoutError(f"{va:#x} is not mapped")
    lo = hi = _floor(va)
    while mapped(lo - PAGE):
        lo -= PAGE
    while mapped(hi):
        hi += PAGE
    return lo, hi


def _kind(names: set[str], text: bool) -> str:
    """An area's memory type from the sections in it (layout_sections' masks)."""
    if text:
        return MOD_TEXT
    if THIS_MODULE in names:
        return MOD_DATA
    if names & set(RO_AFTER_INIT):
        return MOD_RO_AFTER_INIT
    return MOD_RODATA


@dataclass(frozen=True)
class ModuleMemory:
    """A 6.12 module's core: one :class:`Area` per non-empty core memory type."""

    areas: tuple[Area, ...]

    @property
    def size(self) -> int:
        return sum(a.size for a in self.areas)

    @property
    def guards(self) -> list[int]:
        return [a.end for a in self.areas]

    def pages(self) -> list[int]:
        return [va for a in self.areas for va in range(a.base, a.end, PAGE)]

    def area(self, kind: str) -> Area | None:
        return next((a for a in self.areas if a.kind == kind), None)

    def area_of(self, va: int) -> Area:
        for a in self.areas:
            if a.base <= va < a.end:
                return a
        raise ModuleLayoutError(f"{va:#x} is outside the module's core areas")

    def contains(self, va: int) -> bool:
        return any(a.base <= va < a.end for a in self.areas)

    @classmethod
    def of(cls, sections: Mapping[str, int], coresize: int,
           mapped: Callable[[int], bool]) -> ModuleMemory:
        """From ``/sys/module/NAME/sections/*`` addresses, ``coresize`` and the modules
        area's mapped pages (``mapped(va)``, read while the core is mapped): each core
        section's area is the mapped run around it; sections on unmapped pages (the freed
        init areas) are ignored. Checks: one area per type, .text and
        .gnu.linkonce.this_module present, the areas' sizes adding up to ``coresize``."""
        if coresize <= 0 or coresize % PAGE:
            raise ModuleLayoutError(f"coresize {coresize:#x} is not a positive page multiple")
        for need in (".text", THIS_MODULE):
            if need not in sections:
                raise ModuleLayoutError(f"no {need} section")
        groups: dict[tuple[int, int], set[str]] = {}
        for name, va in sections.items():
            if mapped(_floor(va)):
                groups.setdefault(mapped_area(va, mapped), set()).add(name)
        areas = []
        for (lo, hi), names in sorted(groups.items()):
            text = any(_is_text(n) for n in names)
            if text and ".text" not in names:
                raise ModuleLayoutError(f"text sections {sorted(names)} outside .text's area")
            areas.append(Area(_kind(names, text), lo, hi - lo))
        kinds = [a.kind for a in areas]
        if len(set(kinds)) != len(kinds):
            raise ModuleLayoutError(f"two areas of one type: {areas}")
        out = cls(tuple(areas))
        if out.size != coresize:
            raise ModuleLayoutError(f"core areas {out.size:#x} bytes, coresize {coresize:#x}")
        return out

    def attrs(self, va: int, page_kernel: Attrs) -> Attrs:
        """The page at ``va``'s final protection (after ``do_init_module``)."""
        kind = self.area_of(va).kind
        if kind == MOD_TEXT:
            return page_kernel.with_(writable=False, exec=True)  # set_memory_rox
        if kind == MOD_DATA:
            return page_kernel.with_(exec=False)
        return page_kernel.with_(writable=False, exec=False)  # set_memory_ro (+ nx)


def load_areas(pt: PageTable, mm: ModuleMemory, pa_of: Callable[[int], int],
               page_kernel: Attrs, alias: Alias | None = None,
               arm64: Arm64Config | None = None) -> int:
    """6.12 ``load_module``: each area ``vmap_pages_range``'d with PAGE_KERNEL at the PAs
    the kernel chose, then ``complete_formation``'s ``module_enable_rodata_ro(mod, false)``,
    ``module_enable_data_nx``, ``module_enable_text_rox`` and ``do_init_module``'s
    ``module_enable_rodata_ro(mod, true)``, each set_memory_* on one area (with its alias:
    x86 ``cpa_process_alias``, arm64 rodata_full over that area). Returns the pages mapped."""
    n = 0
    for a in mm.areas:
        for va in range(a.base, a.end, PAGE):
            pt.map(va, pa_of(va), PAGE, page_kernel, page_sizes=[PAGE])
            n += 1
    def change(what: str, a: Area | None) -> None:  # (the alias only follows ro / rw)
        if a is not None:
            set_memory(pt, what, a.base, _pages(a.base, a.end), arm64=arm64, alias=alias,
                       area=(a.base, a.end))

    change("ro", mm.area(MOD_RODATA))
    for kind in (MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT):
        change("nx", mm.area(kind))
    change("ro", mm.area(MOD_TEXT))  # set_memory_rox: RW cleared (alias too), NX cleared
    change("x", mm.area(MOD_TEXT))
    change("ro", mm.area(MOD_RODATA))
    change("ro", mm.area(MOD_RO_AFTER_INIT))
    return n


def unload_areas(pt: PageTable, mm: ModuleMemory, alias: Alias | None = None) -> None:
    """6.12 ``free_module`` -> ``module_memory_free``: ``execmem_free`` (vfree) of each area,
    PTEs cleared (tables kept), then ``vm_reset_perms`` on its pages' aliases."""
    for a in mm.areas:
        _vfree(pt, a.base, a.size, alias)

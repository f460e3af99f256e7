"""Module load and unload (issue 9 items 6, 7): the modules area predicted page for page.

``rmmod`` / ``insmod`` of a module of the image (agent ``rmmod NAME``, ``insmod PATH``);
the layout from ``/sys/module/NAME/sections/*`` and ``coresize`` (:mod:`ptlab.kernel.modules`;
6.1 one core layout, 6.12 one vm area per memory type, chosen by the image's kernel series);
the model on a copy-on-write overlay of the "before" tables; compared with the real tables
(:mod:`.kernel_compare`) as two scenarios: ``vmalloc``, the whole modules area
[MODULES_VADDR, MODULES_END) with the guard page, and ``set_memory``, the core's protections
and the whole direct map, where x86 ``cpa_process_alias`` and ``vm_remove_mappings`` change the
core pages' aliases.
"""

from __future__ import annotations

import time
from typing import Any

from ptlab.formats.base import Attrs
from ptlab.kernel.cpa import page_runs
from ptlab.kernel.modules import (
    CoreLayout,
    ModuleMemory,
    free_init,
    load,
    load_areas,
    unload,
    unload_areas,
)
from ptlab.kernel.set_direct_map import Alias, Arm64Config
from ptlab.walk import Run

from .kernel_compare import (
    TableSnapshot,
    compare_entries,
    compare_runs,
    mapped_pa,
    model_table,
    walk_runs,
)
from .kernel_scenarios import Outcome, Target
from .module_init_watch import init_layout, watch_free_init

Layout = CoreLayout | ModuleMemory  # 6.1: one core layout; 6.12: one area per memory type

ARM64_MODULES_VSIZE = 128 << 20  # arch/arm64/include/asm/memory.h MODULES_VSIZE (6.1)


def modules_area(t: Target) -> tuple[int, int]:
    """Where module_alloc allocates: x86 [MODULES_VADDR, MODULES_END); arm64
    [module_alloc_base, + MODULES_VSIZE), randomised by ``kaslr_init``
    (arch/arm64/kernel/kaslr.c). ``module_alloc_base`` is a data symbol Debian's arm64
    kallsyms lacks; the lowest module in /proc/modules (the first loaded at boot: vmalloc is
    first fit) stands for it. Read once per guest."""
    from ptlab.arch import x86_64

    cached = _AREAS.get(str(t.g.rundir))
    if cached is None:
        areas = {"x86_64": lambda: (x86_64.MODULES_VADDR, x86_64.MODULES_END),
                 "arm64": lambda: _lowest_module(t)}
        if t.fmt.arch not in areas:
            raise NotImplementedError(f"module scenarios: no modules area for {t.fmt.arch}")
        cached = _AREAS[str(t.g.rundir)] = areas[t.fmt.arch]()
    return cached


_AREAS: dict[str, tuple[int, int]] = {}  # the guest's run directory -> its modules area


def _lowest_module(t: Target) -> tuple[int, int]:
    t.resume()
    _, text, _ = t.g.ssh("cat /proc/modules")
    bases = [int(ln.split()[5], 16) for ln in text.splitlines() if len(ln.split()) > 5]
    if not bases or 0 in bases:
        raise ValueError(f"/proc/modules gives no module addresses: {text[:200]!r}")
    lo = min(bases)
    return lo, lo + ARM64_MODULES_VSIZE


def page_kernel(t: Target) -> Attrs:
    """PAGE_KERNEL as vmalloc uses it: masked by ``__default_kernel_pte_mask`` (x86: no
    _PAGE_GLOBAL with PTI on, arch/x86/mm/init.c ``probe_page_size_mask``); arm64
    PROT_NORMAL with PTE_MAYBE_NG (nG with kpti)."""
    from ptlab.arch import arm64, x86_64
    from ptlab.kernel.direct_map import x86_default_kernel_prot

    kpti = t.g.profile.kpti
    kinds = {"x86_64": lambda: x86_default_kernel_prot(x86_64.PAGE_KERNEL, kpti),
             "arm64": lambda: arm64.PAGE_KERNEL.with_(global_=not kpti)}
    return kinds[t.fmt.arch]()


def arm64_config(t: Target) -> Arm64Config | None:
    """arm64: rodata=full (Debian's default) and whether the CPU and kernel use BTI
    (PTE_GP on the kernel's own text, ``_stext``); None elsewhere."""
    if t.fmt.arch not in _ARM64_ARCHES:
        return None
    from ptlab.walk import translate

    from . import scenarios

    stext = scenarios.kallsyms(t.g, ("_stext",))["_stext"]
    t.stop()
    raw = translate(t.fmt, t.g.memory, t.root, stext).steps[-1].raw
    return Arm64Config(bti=bool(raw >> 50 & 1))


_ARM64_ARCHES = {"arm64"}  # architectures with an Arm64Config (per-arch facts are tables)


def sysfs(t: Target, name: str) -> tuple[dict[str, int], int]:
    """The loaded module ``name``'s ``sections/*`` addresses and ``coresize`` (the guest
    runs)."""
    t.resume()
    code, text, err = t.g.ssh(f"cd /sys/module/{name} && cat coresize && grep . sections/.* "
                              "sections/*")
    if code != 0:
        raise ValueError(f"/sys/module/{name}: {err.strip()}")
    lines = text.split()
    sections = {}
    for line in lines[1:]:
        path, _, addr = line.partition(":")
        sections[path.removeprefix("sections/")] = int(addr, 16)
    return sections, int(lines[0])


def layout(t: Target, sections: dict[str, int], coresize: int, runs: list[Run]) -> Layout:
    """The module's core as the running kernel's series lays it out: 6.1 one core layout
    from the sections and coresize; 6.12 one area per memory type, each the mapped run of
    the modules area (``runs``, walked while the core is mapped) around its sections."""
    if t.g.kernel_series == "6.1":
        return CoreLayout.of(sections, coresize)

    return ModuleMemory.of(sections, coresize, lambda va: mapped_pa(runs, va) is not None)


def ko_path(t: Target, name: str) -> str:
    """The module's .ko in the image."""
    t.resume()
    _, text, _ = t.g.ssh(f"find /lib/modules -name {name}.ko")
    paths = text.split()
    if len(paths) != 1:
        raise ValueError(f"{name}.ko: found {paths}")
    return paths[0]


def _snapshot(t: Target) -> tuple[TableSnapshot, list[Run], list[Run]]:
    """Stop; one snapshot walked over the modules area and the direct map (where the core
    pages' aliases are); returns it frozen and the runs of each."""
    lo, hi = modules_area(t)  # (may ask the running guest)
    t.stop()
    snap = TableSnapshot(t.g.memory)
    area = walk_runs(t.fmt, snap, t.root, lo, hi)
    dmap = walk_runs(t.fmt, snap, t.root, *t.span)
    return snap.freeze(), area, dmap


def alias_of(t: Target) -> Alias:
    """x86 ``__va(pfn << PAGE_SHIFT)`` for a PA the direct map covers, else None
    (``pfn_range_is_mapped``)."""
    lo, hi = t.span

    def alias(pa: int) -> int | None:
        va = t.dm.va(pa)
        return va if lo <= va < hi else None
    return alias


def _compare(t: Target, scenario: str, pt: Any, real: TableSnapshot,
             real_area: list[Run], real_dmap: list[Run], lay: Layout, pas: list[int],
             seconds: float) -> Outcome:
    """vmalloc: the whole modules area (guard page included), raw entries of the core's
    and the guard's table; set_memory: the core pages and the whole direct map (the
    aliases), raw entries of the core's and the aliases' tables. The set_memory Outcome
    is ``extra["set_memory"]``."""
    lo, hi = modules_area(t)
    core = lay.pages()
    vm = compare_runs(f"vmalloc {scenario}", walk_runs(t.fmt, pt.mem, t.root, lo, hi),
                      real_area)
    compare_entries(vm, t.fmt, pt.mem, t.root, real, t.root, [*core, *lay.guards])
    spans = page_runs(core)
    sm = compare_runs(f"set_memory {scenario}",  # runs in VA order: direct map, then core
                      walk_runs(t.fmt, pt.mem, t.root, *t.span)
                      + [r for s in spans for r in walk_runs(t.fmt, pt.mem, t.root, *s)],
                      real_dmap + [r for s in spans for r in walk_runs(t.fmt, real, t.root, *s)])
    aliases = [a for a in map(alias_of(t), pas) if a is not None]  # in core order
    compare_entries(sm, t.fmt, pt.mem, t.root, real, t.root, [*core, *aliases])
    tables = pt.alloc.pool.allocated
    return Outcome(vm, tables=tables, model_seconds=seconds,
                   extra={"layout": lay, "aliases": aliases,
                          "set_memory": Outcome(sm, tables=tables, model_seconds=seconds)})


def rmmod(t: Target, name: str) -> Outcome:
    """Real: ``ptagent rmmod name``. Model: :func:`~ptlab.kernel.modules.unload` (with
    ``vm_remove_mappings`` on the aliases)."""
    sections, coresize = sysfs(t, name)
    before, before_area, _ = _snapshot(t)
    lay = layout(t, sections, coresize, before_area)
    pas = [pa for va in lay.pages() if (pa := mapped_pa(before_area, va)) is not None]
    t.resume()
    t.g.agent("rmmod", name)
    after, after_area, after_dmap = _snapshot(t)
    t0 = time.perf_counter()
    pt = model_table(t.fmt, before, t.root)
    if isinstance(lay, CoreLayout):
        unload(pt, lay, alias_of(t))
    else:
        unload_areas(pt, lay, alias_of(t))
    return _compare(t, f"rmmod {name}", pt, after, after_area, after_dmap, lay, pas,
                    time.perf_counter() - t0)


def insmod(t: Target, name: str, path: str, settle_s: float = 30.0) -> Outcome:
    """Real: ``ptagent insmod path`` (:func:`watch_free_init` catches the init layout's
    PAs); waits until its deferred free has left /proc/vmallocinfo. Model:
    :func:`~ptlab.kernel.modules.load` at the PAs the kernel chose (read from the real
    "after" tables), then :func:`~ptlab.kernel.modules.free_init`, aliases included."""
    cfg = arm64_config(t)
    before, _, _ = _snapshot(t)
    at_free = watch_free_init(t, path, modules_area(t))
    deadline = time.monotonic() + settle_s
    while not _init_freed(t, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: init layout not freed within {settle_s} s")
        time.sleep(0.2)
    sections, coresize = sysfs(t, name)
    after, after_area, after_dmap = _snapshot(t)
    lay = layout(t, sections, coresize, after_area)
    inits = init_layout(sections, lay.contains, at_free)
    t0 = time.perf_counter()
    pt = model_table(t.fmt, before, t.root)

    def pa_of(va: int) -> int:
        pa = mapped_pa(after_area, va)
        if pa is None:
            raise ValueError(f"{name}: core page {va:#x} not mapped by the kernel")
        return pa

    alias = alias_of(t)
    if isinstance(lay, CoreLayout):
        load(pt, lay, pa_of, page_kernel(t), alias, arm64=cfg)
    else:
        load_areas(pt, lay, pa_of, page_kernel(t), alias, arm64=cfg)
    for init_base, pas in inits:
        free_init(pt, init_base, pas, page_kernel(t), alias)
    seconds = time.perf_counter() - t0
    init_pas = [pa for _, pas in inits for pa in pas]
    pas = [pa_of(va) for va in lay.pages()]
    out = _compare(t, f"insmod {name}", pt, after, after_area, after_dmap, lay,
                   pas + init_pas, seconds)
    out.extra["aliases"] = out.extra["aliases"][:len(pas)]
    out.extra["init"] = inits
    return out


def _init_freed(t: Target, name: str) -> bool:
    """``name`` is live and /proc/vmallocinfo lists one ``load_module`` area per loaded
    module (the init layout's is freed by a work item, ``do_free_init``; the addresses there
    are hashed, so areas are counted by their caller)."""
    _, state, _ = t.g.ssh(f"cat /sys/module/{name}/initstate")
    _, mods, _ = t.g.ssh("cat /proc/modules")
    _, info, _ = t.g.ssh("cat /proc/vmallocinfo")
    areas = [ln for ln in info.splitlines() if " load_module+" in ln]
    if t.g.kernel_series == "6.1":
        return state.strip() == "live" and len(areas) == len(mods.splitlines())
    # 6.12: a module has one area per non-empty memory type; wait for the pages of its
    # .init* sections (MOD_INIT_*; module_init_layout_section) to be unmapped instead
    from ptlab.walk import translate

    sections, _ = sysfs(t, name)
    init = [va for n, va in sections.items() if n.startswith(".init")]
    return state.strip() == "live" and all(
        translate(t.fmt, t.g.memory, t.root, va).pa is None for va in init)

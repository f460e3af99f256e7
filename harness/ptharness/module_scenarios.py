"""Module load and unload (issue 9 items 6, 7): the modules area predicted page for page.

``rmmod`` / ``insmod`` of a module of the image (agent ``rmmod NAME``, ``insmod PATH``);
the layout from ``/sys/module/NAME/sections/*`` and ``coresize`` (:mod:`ptlab.kernel.modules`);
the model on a copy-on-write overlay of the "before" tables; compared with the real tables
over the whole modules area [MODULES_VADDR, MODULES_END) (:mod:`.kernel_compare`).
"""

from __future__ import annotations

import time
from typing import Any

from ptlab.formats.base import Attrs
from ptlab.kernel.modules import CoreLayout, load, unload

from .kernel_compare import compare_entries, compare_runs, model_table, walk_runs
from .kernel_scenarios import Outcome, Target


def modules_area(t: Target) -> tuple[int, int]:
    """[MODULES_VADDR, MODULES_END) of the guest's architecture (x86-64 only so far)."""
    from ptlab.arch import x86_64

    areas = {"x86_64": (x86_64.MODULES_VADDR, x86_64.MODULES_END)}
    if t.fmt.arch not in areas:
        raise NotImplementedError(f"module scenarios: no modules area for {t.fmt.arch}")
    return areas[t.fmt.arch]


def page_kernel(t: Target) -> Attrs:
    """PAGE_KERNEL as vmalloc uses it: masked by ``__default_kernel_pte_mask`` (x86: no
    _PAGE_GLOBAL with PTI on, arch/x86/mm/init.c ``probe_page_size_mask``)."""
    from ptlab.arch import x86_64
    from ptlab.kernel.direct_map import x86_default_kernel_prot

    kinds = {"x86_64": lambda: x86_default_kernel_prot(x86_64.PAGE_KERNEL, t.g.profile.kpti)}
    return kinds[t.fmt.arch]()


def layout(t: Target, name: str) -> CoreLayout:
    """The loaded module ``name``'s core layout, from sysfs (the guest runs)."""
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
    return CoreLayout.of(sections, int(lines[0]))


def ko_path(t: Target, name: str) -> str:
    """The module's .ko in the image."""
    t.resume()
    _, text, _ = t.g.ssh(f"find /lib/modules -name {name}.ko")
    paths = text.split()
    if len(paths) != 1:
        raise ValueError(f"{name}.ko: found {paths}")
    return paths[0]


def _compare(t: Target, scenario: str, pt: Any, real: Any, real_runs: Any,
             lay: CoreLayout, seconds: float) -> Outcome:
    lo, hi = modules_area(t)
    cmp = compare_runs(scenario, walk_runs(t.fmt, pt.mem, t.root, lo, hi), real_runs)
    compare_entries(cmp, t.fmt, pt.mem, t.root, real, t.root, range(lay.base, lay.end, 4096))
    return Outcome(cmp, tables=pt.alloc.pool.allocated, model_seconds=seconds,
                   extra={"layout": lay})


def rmmod(t: Target, name: str) -> Outcome:
    """Real: ``ptagent rmmod name``. Model: :func:`~ptlab.kernel.modules.unload`."""
    lay = layout(t, name)
    before, _ = t.snapshot(*modules_area(t))
    t.resume()
    t.g.agent("rmmod", name)
    after, after_runs = t.snapshot(*modules_area(t))
    t0 = time.perf_counter()
    pt = model_table(t.fmt, before, t.root)
    unload(pt, lay)
    return _compare(t, f"rmmod {name}", pt, after, after_runs, lay, time.perf_counter() - t0)


def insmod(t: Target, name: str, path: str, settle_s: float = 30.0) -> Outcome:
    """Real: ``ptagent insmod path``; waits until the init layout's deferred free
    (``do_free_init``) has left /proc/vmallocinfo. Model: :func:`~ptlab.kernel.modules.load`
    at the PAs the kernel chose (read from the real "after" tables)."""
    before, _ = t.snapshot(*modules_area(t))
    t.resume()
    t.g.agent("insmod", path)
    deadline = time.monotonic() + settle_s
    while not _init_freed(t, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: init layout not freed within {settle_s} s")
        time.sleep(0.2)
    lay = layout(t, name)
    after, after_runs = t.snapshot(*modules_area(t))
    t0 = time.perf_counter()
    pt = model_table(t.fmt, before, t.root)

    def pa_of(va: int) -> int:
        r = [x for x in after_runs if x.va <= va < x.va + x.size and x.attrs.present]
        if not r:
            raise ValueError(f"{name}: core page {va:#x} not mapped by the kernel")
        return r[0].pa + (va - r[0].va)

    load(pt, lay, pa_of, page_kernel(t))
    return _compare(t, f"insmod {name}", pt, after, after_runs, lay, time.perf_counter() - t0)


def _init_freed(t: Target, name: str) -> bool:
    """``name`` is live and /proc/vmallocinfo lists one ``load_module`` area per loaded
    module (the init layout's is freed by a work item, ``do_free_init``; the addresses there
    are hashed, so areas are counted by their caller)."""
    _, state, _ = t.g.ssh(f"cat /sys/module/{name}/initstate")
    _, mods, _ = t.g.ssh("cat /proc/modules")
    _, info, _ = t.g.ssh("cat /proc/vmallocinfo")
    areas = [ln for ln in info.splitlines() if " load_module+" in ln]
    return state.strip() == "live" and len(areas) == len(mods.splitlines())

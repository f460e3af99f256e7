"""Memory hotplug predicted page for page (issue 9, item 4), by the method of
:mod:`.kernel_scenarios`: snapshot the direct map and vmemmap of the hot-plugged range,
let the real kernel act (QMP device_add / virtio-mem requested-size, sysfs online /
offline), snapshot again; the model (:mod:`ptlab.kernel.hotplug`) on a copy-on-write
overlay of "before"; model-after vs real-after page for page, and the tables the real
kernel freed (table frames the "before" walk read that the "after" walk no longer
reaches) vs the model's count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ptlab.kernel.direct_map import M2
from ptlab.kernel.hotplug import STRUCT_PAGE, HotplugCost, vmemmap_range
from ptlab.walk import Run, translate

from . import oracle
from .kernel_compare import (
    Comparison,
    TableSnapshot,
    compare_entries,
    compare_runs,
    model_table,
    walk_runs,
)
from .kernel_scenarios import Target, new_tables
from .scenarios import ScenarioError

BLOCK = 128 << 20  # memory_block_size_bytes() of these guests (x86 and arm64, 1G RAM)
ONLINE_MODES = ("online", "online_kernel", "online_movable")


@dataclass
class Step:
    """One hotplug step: model vs real, and table pages (model, real)."""

    name: str
    comparison: Comparison
    qemu: list[str]  # where QEMU's own MMU (gva2gpa) disagrees with the model
    cost: HotplugCost | None = None
    real_tables: tuple[int, int] = (0, 0)  # (added, freed) by the real kernel
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # add / remove: stop, walk, model, compare (not the kernel's work)


@dataclass
class Window:
    """The VA ranges compared: the linear map and the vmemmap of [0, end of the range)."""

    ranges: list[tuple[int, int]]

    def walk(self, t: Target) -> tuple[TableSnapshot, list[Run]]:
        t.stop()
        snap = TableSnapshot(t.g.memory)
        runs = [r for lo, hi in sorted(self.ranges) for r in walk_runs(t.fmt, snap, t.root,
                                                                        lo, hi)]
        return snap.freeze(), runs

    def model_runs(self, t: Target, mem: Any) -> list[Run]:
        return [r for lo, hi in sorted(self.ranges) for r in walk_runs(t.fmt, mem, t.root,
                                                                        lo, hi)]


def _window(t: Target, vmemmap: int, start: int, end: int) -> Window:
    v0, v1 = vmemmap_range(vmemmap, start, end)
    return Window([(t.dm.va(start), t.dm.va(end)), (v0 - v0 % M2, -(-v1 // M2) * M2)])


def _compare(t: Target, name: str, win: Window, model: Any, real: TableSnapshot,
             real_runs: list[Run], vmemmap: int, start: int, end: int
             ) -> tuple[Comparison, list[str]]:
    """Runs over the window, and raw entries of the tables ending the walks of the range's
    linear map and vmemmap (one VA per 2M); and, as a witness ptlab did not write, QEMU's
    gva2gpa of those VAs (the guest is still stopped where it was walked) against the
    model's translation: the mismatches."""
    cmp = compare_runs(name, win.model_runs(t, model), real_runs)
    v0, v1 = vmemmap_range(vmemmap, start, end)
    vas = [*range(t.dm.va(start), t.dm.va(end), M2), *range(v0 - v0 % M2, v1, M2)]
    compare_entries(cmp, t.fmt, model, t.root, real, t.root, vas)
    gpas = oracle.gva2gpa_many(t.g.hmp, vas).gpas
    return cmp, [f"{va:#x}: QEMU {q}, model {m}" for va, q in zip(vas, gpas, strict=True)
                 if q != (m := translate(t.fmt, model, t.root, va).pa)]


def _blocks(real: list[Run], vmemmap: int, start: int, end: int) -> dict[int, int]:
    """The PA the real kernel gave each 2M vmemmap block of [start, end) (its allocator's
    choice, an input of the model)."""
    v0, v1 = vmemmap_range(vmemmap, start, end)
    out: dict[int, int] = {}
    for r in real:
        for va in range(max(r.va, v0 - v0 % M2), min(r.end, v1), M2):
            if va % M2 == 0:
                out[va] = r.pa + (va - r.va)
    return out


def _wait(g: Any, cmd: str, want: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, out, _ = g.ssh(cmd)
        if out.strip() == want or time.monotonic() > deadline:
            return out.strip()
        time.sleep(0.2)


def set_state(t: Target, block: int, state: str, tries: int = 20) -> str:
    """Write ``state`` to /sys/devices/system/memory/memoryN/state (retrying EBUSY, as
    offline_pages may find pages still migrating); returns the block's valid_zones after
    (an online block: the zone it is in, e.g. "Normal", "Movable")."""
    t.resume()
    path = f"/sys/devices/system/memory/memory{block}/state"
    for _ in range(tries):
        rc, _, err = t.g.ssh(f"echo {state} > {path}")
        if rc == 0:
            break
        time.sleep(0.3)
    else:
        raise ScenarioError(f"{path} <- {state}: {err.strip()}")
    _, now, _ = t.g.ssh(f"cat {path}")
    want = "offline" if state == "offline" else "online"
    if now.strip() != want:
        raise ScenarioError(f"{path} is {now.strip()!r} after {state}")
    _, zones, _ = t.g.ssh(f"cat /sys/devices/system/memory/memory{block}/valid_zones")
    return zones.strip()


def _x86_vmemmap(t: Target) -> int:
    from . import scenarios

    t.resume()
    sym = scenarios.kallsyms(t.g, ("vmemmap_base",))
    if "vmemmap_base" not in sym:
        raise ScenarioError("kallsyms has no vmemmap_base")
    t.stop()
    return oracle.read_virt_u64(t.g.hmp, sym["vmemmap_base"])


def x86_pc_dimm(t: Target, size_mb: int = 384, modes: tuple[str, ...] = ONLINE_MODES,
                remove: bool = False) -> list[Step]:
    """pc-dimm add, block i onlined with ``modes[i]``; with ``remove`` all offlined and
    device_del: model vs real after add, after each online, after remove."""
    from ptlab.arch import x86_64
    from ptlab.kernel.direct_map import x86_default_kernel_prot
    from ptlab.kernel.hotplug import arch_remove_memory, x86_arch_add_memory

    from . import scenarios

    g = t.g
    vmemmap = _x86_vmemmap(t)
    t.resume()
    ram = scenarios.system_ram(g.info)
    _, flags, _ = g.ssh("grep -m1 ^flags /proc/cpuinfo")
    prot = x86_default_kernel_prot(x86_64.PAGE_KERNEL, g.profile.kpti)
    t.stop()
    q = [d["data"] for d in g.qmp("query-memory-devices")]
    start = max([d["addr"] + d["size"] for d in q] + [1 << 32])  # where QEMU puts the DIMM
    end = start + (size_mb << 20)
    blocks = list(range(start // BLOCK, end // BLOCK))
    if len(modes) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks, {len(modes)} online modes")
    win = _window(t, vmemmap, 0, end)
    before, _ = win.walk(t)
    mem0 = t.meminfo_direct_map()  # the kernel's direct_pages_count, a witness of its own
    dev = g.plug_dimm(size_mb)
    if g.dimm_address(dev) != start:
        raise ScenarioError(f"DIMM at {g.dimm_address(dev):#x}, expected {start:#x}")
    last = f"/sys/devices/system/memory/memory{blocks[-1]}/state"
    if _wait(g, f"cat {last} 2>/dev/null", "offline") != "offline":
        raise ScenarioError(f"{last} did not appear offline")
    t0 = time.perf_counter()  # stop, walk, model, compare: the scenario's own time
    added, real = win.walk(t)
    pt = model_table(t.fmt, before, t.root)
    cost = x86_arch_add_memory(pt, t.dm.base, start, end - start, [*ram, (start, end)], prot,
                               gbpages="pdpe1gb" in flags.split(), vmemmap=vmemmap,
                               blocks=_blocks(real, vmemmap, start, end))
    steps = [Step(f"hotplug add {size_mb}M", *_compare(t, "hotplug add", win, pt.mem, added, real,
                                                      vmemmap, start, end),
                  cost, new_tables(before, added), {"start": start, "vmemmap": vmemmap})]
    steps[0].seconds = time.perf_counter() - t0
    steps[0].extra["meminfo"] = (mem0, t.meminfo_direct_map())
    snap = added
    for block, mode in zip(blocks, modes, strict=True):
        zone = set_state(t, block, mode)
        snap, now = win.walk(t)
        steps.append(Step(f"hotplug {mode} memory{block}",
                          *_compare(t, mode, win, pt.mem, snap, now, vmemmap, start, end),
                          real_tables=new_tables(added, snap), extra={"zone": zone}))
    if not remove:
        return steps
    for block in blocks:
        set_state(t, block, "offline")
    t.resume()
    g.unplug_dimm(dev)
    t0 = time.perf_counter()
    removed, real = win.walk(t)
    pt = model_table(t.fmt, snap, t.root)
    cost = arch_remove_memory(pt, t.dm.base, start, end - start, vmemmap)
    steps.append(Step("hotplug remove", *_compare(t, "hotplug remove", win, pt.mem, removed, real,
                                                 vmemmap, start, end),
                      cost, new_tables(snap, removed)))
    steps[-1].seconds = time.perf_counter() - t0
    steps[-1].extra["meminfo"] = (steps[0].extra["meminfo"][1], t.meminfo_direct_map())
    return steps


def arm64_virtio_mem(t: Target, size_mb: int = 256) -> list[Step]:
    """virtio-mem plug of ``size_mb`` (memhp_default_state=online_movable onlines it), then
    unplug to 0: model vs real after each."""
    from ptlab.arch import arm64
    from ptlab.kernel.direct_map import arm64_linear_prot
    from ptlab.kernel.hotplug import arch_remove_memory, arm64_arch_add_memory

    g = t.g
    t.stop()
    dev = next(d["data"] for d in g.qmp("query-memory-devices") if d["type"] == "virtio-mem")
    start, end = dev["memaddr"], dev["memaddr"] + (size_mb << 20)
    lay = arm64.layout(t.fmt.va_bits, 12)
    vmemmap = (lay["VMEMMAP_START"] - t.dm.phys_offset // 4096 * STRUCT_PAGE) % (1 << 64)
    linear = (t.dm.base - t.dm.phys_offset) % (1 << 64)
    win = _window(t, vmemmap, t.dm.phys_offset, end)
    before, _ = win.walk(t)
    t.resume()
    g.virtio_mem_resize(size_mb)
    blocks = list(range(start // BLOCK, end // BLOCK))
    last = f"/sys/devices/system/memory/memory{blocks[-1]}/state"
    if _wait(g, f"cat {last} 2>/dev/null", "online") != "online":
        raise ScenarioError(f"{last} did not come online")
    t0 = time.perf_counter()  # stop, walk, model, compare: the scenario's own time
    added, real = win.walk(t)
    pt = model_table(t.fmt, before, t.root)
    prot = arm64_linear_prot(arm64.PAGE_KERNEL, g.profile.kpti)
    cost = arm64_arch_add_memory(pt, linear, start, end - start, prot,
                                 can_set_direct_map=True, vmemmap=vmemmap,
                                 blocks=_blocks(real, vmemmap, start, end),
                                 vmemmap_prot=arm64_vmemmap_prot(
                                     g.profile.kpti,
                                     g.kernel_series != "6.1"))
    steps = [Step(f"virtio-mem plug {size_mb}M",
                  *_compare(t, "virtio-mem plug", win, pt.mem, added, real, vmemmap, start, end),
                  cost, new_tables(before, added), {"start": start, "vmemmap": vmemmap})]
    steps[0].seconds = time.perf_counter() - t0
    t.resume()
    g.virtio_mem_resize(0)
    for block in blocks:  # virtio-mem offlines and removes each block after unplugging it
        path = f"/sys/devices/system/memory/memory{block}"
        if _wait(g, f"test -e {path} && echo there || echo gone", "gone") != "gone":
            raise ScenarioError(f"{path} still there after unplug")
    t0 = time.perf_counter()
    removed, real = win.walk(t)
    pt = model_table(t.fmt, added, t.root)
    cost = arch_remove_memory(pt, linear, start, end - start, vmemmap)
    steps.append(Step("virtio-mem unplug",
                      *_compare(t, "virtio-mem unplug", win, pt.mem, removed, real, vmemmap,
                               start, end),
                      cost, new_tables(added, removed)))
    steps[-1].seconds = time.perf_counter() - t0
    return steps


def x86_hotplug(t: Target) -> list[Step]:
    """A movable DIMM onlined, offlined and removed; then one onlined in each of
    ONLINE_MODES (its kernel-zone blocks soon hold unmovable kernel pages, so offlining
    them fails with EBUSY: it stays)."""
    return [*x86_pc_dimm(t, 256, ("online_movable",) * 2, remove=True), *x86_pc_dimm(t)]


def arm64_vmemmap_prot(kpti: bool, write: bool = False) -> Any:
    """PROT_SECT_NORMAL (arch/arm64/include/asm/pgtable-prot.h 6.1): PROT_SECT_DEFAULT
    (AF, SH inner, PMD_MAYBE_NG: nG with kpti) | PXN | UXN | MT_NORMAL — no PTE_WRITE (DBM),
    no PTE_DIRTY. ``write``: 6.12's vmemmap blocks carry PTE_WRITE too (seen on the real
    guest: bit 51 set in every vmemmap pmd)."""
    from ptlab.arch import arm64

    return arm64.PAGE_KERNEL.with_(dbm=write, dirty=False, global_=not kpti, cache=0)


HOTPLUG = {"pc-dimm": x86_hotplug, "virtio-mem": arm64_virtio_mem}  # board.hotplug -> scenario


def hotplug(t: Target) -> list[Step]:
    return HOTPLUG[t.g.profile.board.hotplug](t)

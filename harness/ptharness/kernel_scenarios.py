"""One harness for every kernel page-table user: the model's prediction vs the real kernel.

Each scenario: stop the guest, snapshot and walk the real tables ("before"); the real kernel
acts (agent); stop, snapshot and walk ("after"); the kernel user's model operation
(:mod:`ptlab.kernel`) runs on a copy-on-write overlay of "before" rooted at the real root;
model-after vs real-after page for page and entry for entry (:mod:`.kernel_compare`). Each
returns an :class:`Outcome`: ``N pages agree, M differ``, every difference listed, and what
the model's operation cost (flushes, splits, table pages, seconds).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ptlab.alloc import NormalAllocator, PhysPool
from ptlab.engine import PageTable
from ptlab.formats.base import Format
from ptlab.memory.base import PhysMemory
from ptlab.walk import Run, translate

from .kernel_compare import (
    PAGE,
    SCRATCH,
    Comparison,
    TableSnapshot,
    compare_entries,
    compare_runs,
    later_cpa_change,
    model_table,
    walk_runs,
)
from .scenarios import ScenarioError

X86_CR3_PGD_MASK = 0x000F_FFFF_FFFF_F000  # CR3 without the PCID (bits 11:0)

__all__ = ["Comparison", "Outcome", "Scattered", "Secretmem", "Target", "direct_map_boot",
           "iomem_resources", "kpti", "kpti_arm64", "kpti_x86", "meminfo_delta", "new_tables",
           "pti_layout", "secretmem", "secretmem_release", "secretmem_scattered"]


# --- a booted guest, stopped ---------------------------------------------------------------------
@dataclass
class Target:
    """What every scenario needs of one booted guest: its kernel root and format, where the
    direct map lies (``span``: [start, end) over all System RAM, from the agent and kallsyms /
    VMCOREINFO, never from the walk) and the direct-map VA of a PA."""

    g: Any
    fmt: Format
    root: int
    dm: Any  # scenarios.DirectMap
    span: tuple[int, int]
    rng: random.Random

    @classmethod
    def of(cls, g: Any, rng: random.Random) -> Target:
        """Of the running guest ``g`` (left stopped in the kernel regime: the direct map's
        base is read through QEMU's translation); ``rng`` times the stops."""
        from . import scenarios

        if not g.running:
            g.cont()
        _ = g.info  # the agent answers only while the guest runs
        g.stop()
        fmt, root = g.kernel_format(), g.kernel_root()
        g.cont()
        scenarios.stop_where(g, lambda r: scenarios.in_kernel_regime(g, r, root), rng)
        dm = scenarios.direct_map(g)
        ram = scenarios.system_ram(g.info)
        lo, hi = ram[0][0] & ~(PAGE - 1), -(-ram[-1][1] // PAGE) * PAGE
        return cls(g, fmt, root, dm, (dm.va(lo), dm.va(hi)), rng)

    def stop(self) -> None:
        """Stop with QEMU's debug translation on the kernel tables (so that QEMU's gva2gpa
        of kernel VAs is a witness): x86 not on a PTI user PGD, arm64 at EL1 on swapper."""
        from . import scenarios

        if not self.g.running:
            self.g.cont()
        scenarios.stop_where(self.g, lambda r: scenarios.in_kernel_regime(self.g, r, self.root),
                             self.rng)

    def pa(self, va: int) -> int:
        """The PA of direct-map VA ``va``."""
        return va - self.dm.base + self.dm.phys_offset

    def snapshot(self, start: int | None = None, end: int | None = None
                 ) -> tuple[TableSnapshot, list[Run]]:
        """Stop; walk [start, end) (default: the direct map) through a fresh snapshot of the
        guest's RAM; returns the frozen snapshot and the runs."""
        self.stop()
        lo, hi = (start, end) if start is not None and end is not None else self.span
        snap = TableSnapshot(self.g.memory)
        runs = walk_runs(self.fmt, snap, self.root, lo, hi)
        return snap.freeze(), runs

    def resume(self) -> None:
        if not self.g.running:
            self.g.cont()

    def meminfo_direct_map(self) -> dict[int, int]:
        """x86 /proc/meminfo DirectMap4k/2M/1G in bytes by page size (the kernel's own
        ``direct_pages_count``, which ``split_large_page`` updates); {} elsewhere."""
        self.resume()
        code, text, err = self.g.ssh("grep ^DirectMap /proc/meminfo")
        out: dict[int, int] = {}
        for line in text.splitlines():
            name, kb = line.split(":")[0], int(line.split()[1])
            size = {"DirectMap4k": 1 << 12, "DirectMap2M": 1 << 21, "DirectMap1G": 1 << 30}
            if name in size:
                out[size[name]] = kb * 1024
        return out


# --- scenarios: secretmem, its release, the batched removal ---------------------------------------
@dataclass
class Outcome:
    """One scenario on one guest: the comparison and what the model's operation cost."""

    comparison: Comparison
    flushes: int = 0  # the model's flushes (per-page: one per page; batched: one)
    splits: dict[int, int] = field(default_factory=dict)  # level -> huge leaves split
    tables: int = 0  # table pages the model allocated
    model_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Secretmem:
    """A real ``ptagent secretmem N`` and the model's predictions of it."""

    ident: int
    vas: list[int]  # direct-map VAs of the secret pages
    before: TableSnapshot
    after: TableSnapshot  # real, after the faults (the release's "before")
    after_runs: list[Run]
    per_page: Outcome
    batched: Outcome


def _predict(t: Target, base: PhysMemory, real: TableSnapshot, real_runs: list[Run],
             scenario: str, op: Any, vas: list[int]) -> Outcome:
    pt = model_table(t.fmt, base, t.root)
    rem = op(pt, vas)
    model_runs = walk_runs(t.fmt, pt.mem, t.root, *t.span)
    cmp = compare_runs(scenario, model_runs, real_runs)
    compare_entries(cmp, t.fmt, pt.mem, t.root, real, t.root, vas)
    return Outcome(cmp, flushes=rem.flushes, splits=dict(rem.result.splits),
                   tables=pt.alloc.pool.allocated,  # type: ignore[attr-defined]
                   model_seconds=rem.seconds)


def secretmem(t: Target, n: int) -> Secretmem:
    """Real: ``ptagent secretmem n`` (secretmem_fault per page). Model, on the tables as
    they were: ``remove_per_page`` and ``remove_batched`` of the same pages; each compared
    with the real tables after. The object stays held (see :func:`secretmem_release`)."""
    from ptlab.kernel.secretmem import remove_batched, remove_per_page

    before, _ = t.snapshot()
    mem0 = t.meminfo_direct_map()
    t.resume()
    reply = t.g.agent("secretmem", str(n))
    pfns = reply["pfns"]
    if None in pfns or len(set(pfns)) != n:
        raise ValueError(f"secretmem {n}: pagemap gave {pfns[:8]}...")
    mem1 = t.meminfo_direct_map()
    vas = sorted(t.dm.va(p * PAGE) for p in pfns)
    after, after_runs = t.snapshot()
    per = _predict(t, before, after, after_runs, f"secretmem {n}", remove_per_page, vas)
    bat = _predict(t, before, after, after_runs, f"batched_unmap {n}", remove_batched, vas)
    per.extra["meminfo"] = (mem0, mem1)
    per.extra["real_tables"] = new_tables(before, after)
    return Secretmem(reply["id"], vas, before, after, after_runs, per, bat)


def new_tables(before: TableSnapshot, after: TableSnapshot) -> tuple[int, int]:
    """(table pages the real kernel added, removed) between two snapshots of the same walk
    (a walk reads table pages only, so each snapshot's frames are its tables)."""
    return len(after.frames.keys() - before.frames.keys()), \
        len(before.frames.keys() - after.frames.keys())


def secretmem_release(t: Target, sm: Secretmem) -> Outcome:
    """Real: ``ptagent release ID`` (secretmem_free_folio per page). Model: ``restore`` on
    the tables as the faults left them; compared with the real tables after."""
    from ptlab.kernel.secretmem import restore

    t.resume()
    t.g.agent("release", str(sm.ident))
    after, after_runs = t.snapshot()
    out = _predict(t, sm.after, after, after_runs, f"release {len(sm.vas)}", restore, sm.vas)
    out.extra["real_tables"] = new_tables(sm.after, after)
    return out


@dataclass
class Scattered:
    """Secret pages spread over many 2M regions (:func:`secretmem_scattered`): each step
    the real kernel took, and the model's prediction of it."""

    vas: list[int]  # the one-page secrets, about 2 MiB apart
    spacers: list[int]  # the spacers' pages
    fault: Outcome  # every page faulted (per-page in the kernel), model: remove_per_page
    batched: Outcome  # the same, model: remove_batched
    spacers_released: Outcome  # model: restore of the spacers' pages
    released: Outcome  # the scattered secrets released, model: restore of them


def secretmem_scattered(t: Target, n: int = 4, spacer: int = 511, tries: int = 3) -> Scattered:
    """Real: ``n`` times ``ptagent secretmem 1`` then ``secretmem spacer`` (same
    unmovable free lists, so the spacer's pages follow the secret page and the next
    secret page lands about 1 + spacer pages further: one per 2 MiB region with 511);
    then the spacers are released, leaving ``n`` scattered non-present pages in split
    regions; then those. Each step is predicted on the tables the previous one left
    (secretmem's ``remove_per_page`` / ``remove_batched``, ``restore``). ``n`` = 4: 8 MiB
    of secretmem (the agent daemon lifts RLIMIT_MEMLOCK, whose default 8 MiB once made the
    kernel refuse the next page with SIGBUS and killed the daemon).

    The kernel does not always scatter them: pages other processes free between the
    agent's calls (each call is an SSH command) sit first on the per-CPU free lists, and
    once all four secrets came from such pages, in one 2 MiB region (la57, three test
    workers on two cores). Such an attempt is released and the allocation tried again
    (up to ``tries`` times) from a new "before" snapshot; then :class:`ScenarioError`."""
    from ptlab.kernel.secretmem import remove_batched, remove_per_page, restore

    singles: dict[int, int] = {}  # agent id -> VA
    spacers: dict[int, list[int]] = {}
    region = t.fmt.entry_size(1)
    try:
        for attempt in range(1, tries + 1):
            before, _ = t.snapshot()
            t.resume()
            for _ in range(n):
                for want, held in ((1, singles), (spacer, spacers)):
                    r = t.g.agent("secretmem", str(want))
                    if None in r["pfns"]:
                        raise ValueError(f"secretmem {want}: pagemap gave {r['pfns'][:8]}")
                    vas_r = [t.dm.va(p * PAGE) for p in r["pfns"]]
                    held[r["id"]] = vas_r[0] if held is singles else vas_r  # type: ignore[assignment]
            if len({va // region for va in singles.values()}) >= 2:
                break
            for ident in [*singles, *spacers]:
                t.g.agent("release", str(ident))
            singles.clear()
            spacers.clear()
            if attempt == tries:
                raise ScenarioError(
                    f"secretmem_scattered: {tries} attempts, each secret page in one "
                    f"{region >> 20} MiB region")
        vas = sorted(singles.values())
        pads = sorted(v for vs in spacers.values() for v in vs)
        every = sorted(vas + pads)
        faulted, faulted_runs = t.snapshot()
        fault = _predict(t, before, faulted, faulted_runs, f"secretmem_scattered {n}",
                         remove_per_page, every)
        batched = _predict(t, before, faulted, faulted_runs, f"batched_unmap_scattered {n}",
                           remove_batched, every)
        fault.extra["real_tables"] = new_tables(before, faulted)
        t.resume()
        for ident in list(spacers):
            t.g.agent("release", str(ident))
            del spacers[ident]
        padded, padded_runs = t.snapshot()
        pads_out = _predict(t, faulted, padded, padded_runs, f"release_spacers {n}", restore,
                            pads)
        t.resume()
        for ident in list(singles):
            t.g.agent("release", str(ident))
            del singles[ident]
        done, done_runs = t.snapshot()
        released = _predict(t, padded, done, done_runs, f"release_scattered {n}", restore, vas)
        return Scattered(vas, pads, fault, batched, pads_out, released)
    finally:
        t.resume()
        for ident in [*singles, *spacers]:
            t.g.agent("release", str(ident))


def meminfo_delta(splits: dict[int, int], fmt: Format) -> dict[int, int]:
    """What x86 ``split_large_page`` does to DirectMap*: each split leaf of size S moves S
    bytes from the S count to the next-smaller page size's."""
    out: dict[int, int] = {}
    for level, count in splits.items():
        size, smaller = fmt.entry_size(level), fmt.entry_size(level - 1)
        out[size] = out.get(size, 0) - count * size
        out[smaller] = out.get(smaller, 0) + count * size
    return out


# --- KPTI --------------------------------------------------------------------------------------
PTI_SYMBOLS = ("_text", "_etext", "_end", "__entry_text_start", "__entry_text_end",
               "__end_rodata_aligned", "cpu_tss_rw", "__per_cpu_offset")


def _cpu_list(text: str) -> list[int]:
    """A kernel cpu list ("0", "0-3,5") as CPU numbers."""
    out: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def pti_layout(t: Target) -> Any:
    """The :class:`~ptlab.kernel.kpti_x86.PtiLayout` of the guest: kallsyms (agent, else
    /proc/kallsyms), each possible CPU's ``&per_cpu(cpu_tss_rw, cpu)`` = its
    ``__per_cpu_offset[cpu]`` (read by QEMU) + the per-cpu symbol. Leaves the guest stopped
    in the kernel regime."""
    from ptlab.kernel.kpti_x86 import PtiLayout

    from . import oracle, scenarios

    t.resume()
    syms = scenarios.kallsyms(t.g, PTI_SYMBOLS)
    missing = [n for n in PTI_SYMBOLS if n not in syms]
    if missing:
        raise scenarios.ScenarioError(f"kallsyms has no {missing}")
    _, possible, _ = t.g.ssh("cat /sys/devices/system/cpu/possible")
    t.stop()
    tss = [oracle.read_virt_u64(t.g.hmp, syms["__per_cpu_offset"] + 8 * cpu) + syms["cpu_tss_rw"]
           for cpu in _cpu_list(possible)]
    return PtiLayout((syms["__entry_text_start"], syms["__entry_text_end"]), syms["_text"],
                     syms["_etext"], syms["__end_rodata_aligned"], syms["_end"], tss)


def kpti_x86(t: Target, process: bool = False) -> tuple[Outcome, Outcome]:
    """The user PGD ``pti_init`` + ``pti_finalize`` build from the real kernel PGD, against
    the real user PGD (kernel PGD + 4 KiB, what CR3 | 0x1000 selects), over the whole VA
    space; and the model's kernel PGD after them against the real one (pti's own changes
    to it, nonglobal image and global entry text, must already be there).

    ``process``: the PGDs of a user process (a busy loop, stopped in user mode: CR3 is its
    user PGD), whose user half ``pti_set_user_pgtbl`` copies (from the entries as
    ``pgd_populate`` wrote them, :func:`~ptlab.kernel.kpti_x86.as_populated`) and NXes in
    the kernel copy; else init_mm's (``init_top_pgt``)."""
    from ptlab.arch import x86_64
    from ptlab.kernel.kpti_x86 import as_populated, pti_finalize, pti_init, pti_set_user_pgtbl

    from . import scenarios

    lay = pti_layout(t)
    user_bit = x86_64.PTI_USER_PGTABLE_MASK
    snap = TableSnapshot(t.g.memory)
    if process:
        t.resume()
        with scenarios.user_spinner(t.g):
            regs = scenarios.stop_where(
                t.g, lambda r: scenarios.in_user_regime(t.g, r, t.root), t.rng)
            kpgd = regs["cr3"] & X86_CR3_PGD_MASK & ~user_bit
            real_kernel = walk_runs(t.fmt, snap, kpgd, 0, 1 << 64)
            real_user = walk_runs(t.fmt, snap, kpgd + user_bit, 0, 1 << 64)
        t.stop()
    else:
        kpgd = t.root
        real_kernel = walk_runs(t.fmt, snap, kpgd, 0, 1 << 64)
        real_user = walk_runs(t.fmt, snap, kpgd + user_bit, 0, 1 << 64)
    snap.freeze()
    kernel = model_table(t.fmt, snap, kpgd)
    populated = as_populated(kernel)
    user = pti_init(kernel, lay, kernel.alloc)
    pti_finalize(kernel, user, lay, image_global_ok=False)
    copied = pti_set_user_pgtbl(kernel, user)
    what = "process" if process else "init_mm"
    cmp_user = compare_runs(f"kpti user PGD ({what})",
                            walk_runs(t.fmt, kernel.mem, user.root, 0, 1 << 64), real_user)
    entry = list(range(lay.entry_text[0] & ~(PAGE - 1), lay.entry_text[1], PAGE))
    compare_entries(cmp_user, t.fmt, kernel.mem, user.root, snap, kpgd + user_bit,
                    entry + list(lay.cpu_tss))
    cmp_kernel = compare_runs(f"kpti kernel PGD ({what})",
                              walk_runs(t.fmt, kernel.mem, kpgd, 0, 1 << 64), real_kernel)
    extra = {"tables": user.table_count(), "layout": lay, "user_entries": copied,
             "populated": populated}
    return Outcome(cmp_user, extra=extra), Outcome(cmp_kernel)


def kpti_arm64(t: Target) -> Outcome:
    """``tramp_pg_dir`` built by ``map_entry_trampoline`` against the real one
    (swapper_pg_dir - 2 pages), over the whole kernel half. The trampoline text (VA
    TRAMP_VALIAS, PA, size) is the one executable range of the real swapper's fixmap
    ([VMALLOC_END, FIXADDR_TOP): the FIX_ENTRY_TRAMP_TEXT* slots), as arm64 kallsyms has no
    __entry_tramp_text_* symbols; its PA must lie in the image's .rodata.text
    [_etext, __init_begin) (kallsyms)."""
    from ptlab.arch import arm64
    from ptlab.kernel.kpti_arm64 import map_entry_trampoline

    from . import scenarios

    t.resume()
    syms = scenarios.kallsyms(t.g, ("_etext", "__init_begin"))
    lo, hi = scenarios.kernel_half(t.fmt)
    lay = arm64.layout(t.fmt.va_bits, t.fmt.granule.bit_length() - 1)
    tramp_root = t.root - arm64.TRAMP_SWAPPER_OFFSET
    t.stop()
    snap = TableSnapshot(t.g.memory)
    kernel_runs = walk_runs(t.fmt, snap, t.root, lo, hi)
    real = walk_runs(t.fmt, snap, tramp_root, lo, hi)
    snap.freeze()
    fix = [r for r in kernel_runs if lay["VMALLOC_END"] <= r.va < lay["FIXADDR_TOP"]
           and r.attrs.present and r.attrs.exec]
    if len(fix) != 1:
        raise ValueError(f"{len(fix)} executable fixmap runs (want the trampoline text only)")
    text = fix[0]
    kernel = model_table(t.fmt, snap, t.root)
    image = [kernel.translate(v).pa for v in (syms["_etext"], syms["__init_begin"] - 1)]
    if None in image or not image[0] <= text.pa < text.pa + text.size <= image[1] + 1:
        raise ValueError(f"trampoline text PA {text.pa:#x} is not in .rodata.text {image}")
    tramp = map_entry_trampoline(kernel, text.pa, text.size, text.va, kernel.alloc)
    cmp = compare_runs("kpti tramp_pg_dir", walk_runs(t.fmt, kernel.mem, tramp.root, lo, hi),
                       real)
    compare_entries(cmp, t.fmt, kernel.mem, tramp.root, snap, tramp_root,
                    range(text.va, text.end, PAGE))
    return Outcome(cmp, extra={"valias": text.va, "tables": tramp.table_count()})


def kpti(t: Target) -> list[Outcome]:
    """The guest's KPTI table(s) predicted and compared: x86 the user PGD (and the kernel
    PGD after pti) of init_mm and of a user process, arm64 ``tramp_pg_dir``."""
    by_arch = {"x86_64": lambda: [*kpti_x86(t), *kpti_x86(t, process=True)],
               "arm64": lambda: [kpti_arm64(t)]}
    return by_arch[t.fmt.arch]()


# --- the direct map at boot ------------------------------------------------------------------
def _boot_x86(t: Target, pt: PageTable, ram: list[tuple[int, int]]) -> None:
    from ptlab.arch import x86_64
    from ptlab.kernel.direct_map import init_mem_mapping, x86_default_kernel_prot

    _, flags, _ = t.g.ssh("grep -m1 ^flags /proc/cpuinfo")
    prot = x86_default_kernel_prot(x86_64.PAGE_KERNEL, t.g.profile.kpti)
    init_mem_mapping(pt, t.dm.base, ram, prot,
                     gbpages="pdpe1gb" in flags.split())  # direct_gbpages


def _boot_arm64(t: Target, pt: PageTable, ram: list[tuple[int, int]]) -> None:
    from ptlab.arch import arm64
    from ptlab.kernel.direct_map import arm64_linear_prot, arm64_map_mem

    from . import scenarios

    syms = scenarios.kallsyms(t.g, ("_text", "_stext", "__init_begin"))
    t.stop()
    # __init_begin's own page is unmapped by free_initmem: take the byte before it
    first, last = (translate(t.fmt, t.g.memory, t.root, va).pa
                   for va in (syms["_stext"], syms["__init_begin"] - 1))
    if first is None or last is None:
        raise ValueError(f"kernel image not mapped at {syms}")
    if t.g.kernel_series != "6.1":
        # map_mem's image alias starts at __pa_symbol(_text) in 6.12 (at _stext in 6.1;
        # arch/arm64/mm/mmu.c map_mem, mark_linear_text_alias_ro); _text's page itself is
        # not in the kernel mapping, so its PA is _stext's minus the distance
        first -= syms["_stext"] - syms["_text"]
    prot = arm64_linear_prot(arm64.PAGE_KERNEL, t.g.profile.kpti)
    arm64_map_mem(pt, t.dm.base, t.dm.phys_offset, ram, prot, (first, last + 1),
                  text_prot=prot.with_(cache=arm64.PAGE_KERNEL.cache))


_BOOT = {"x86_64": _boot_x86, "arm64": _boot_arm64}  # Format.arch -> boot direct map


def direct_map_boot(t: Target) -> Outcome:
    """The direct map built from the guest's System RAM (/proc/iomem, the agent) with the
    architecture's boot policy (x86 ``init_mem_mapping``, the CPU's gbpages; arm64
    ``map_mem`` with rodata=full) on an empty model table, against the real direct map now.
    ``extra["later_cpa"]``: the differing pages that are later set_memory_* changes
    (:func:`later_cpa_change`); anything else is unexplained."""
    from ptlab.memory.sparse import SparseMemory

    from . import scenarios

    t.resume()
    ram = scenarios.system_ram(t.g.info)
    mem = SparseMemory()
    pt = PageTable(t.fmt, mem, alloc=NormalAllocator(PhysPool(mem, SCRATCH[0],
                                                              SCRATCH[1] - SCRATCH[0])))
    _BOOT[t.fmt.arch](t, pt, ram)
    _, real = t.snapshot()
    cmp = compare_runs("direct_map", walk_runs(t.fmt, mem, pt.root, *t.span), real)
    later = [d for d in cmp.differences if later_cpa_change(d)]
    return Outcome(cmp, extra={"later_cpa": later,
                               "unexplained": [d for d in cmp.differences if d not in later]})


def iomem_resources(t: Target, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """[start, end) of the named /proc/iomem resources (e.g. "Kernel code"), as the
    kernel reports them to root (the guest must run; first match per name)."""
    t.resume()
    _, text, _ = t.g.ssh("cat /proc/iomem")
    want, out = set(names), {}
    for line in text.splitlines():
        span, _, name = line.strip().partition(" : ")
        if name in want and name not in out:
            lo, hi = span.split("-")
            out[name] = (int(lo, 16), int(hi, 16) + 1)
    return out

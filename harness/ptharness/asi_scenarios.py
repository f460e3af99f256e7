"""ASI on a real x86-64 guest: the model's nonsensitive root built from the stopped kernel's
own tables (:mod:`ptlab.kernel.asi`), with the agent's canary page sensitive.

Stop; snapshot the kernel half of the real root; on a copy-on-write overlay rooted at it,
:class:`~ptlab.kernel.asi.Asi` builds the nonsensitive root (its own tables in a scratch
pool no guest RAM uses, charged to "asi"; what sharing makes the kernel add, to "init_mm")
and maps every 2M pageblock of the direct map but the canary's through the no-allocation
view. Checks: the canary's direct-map alias is reachable through the kernel root (QEMU's
gva2gpa on the real root, and the agent's pattern at that PA) and not through the
nonsensitive one; nonsensitive ⊆ unrestricted page for page (both walked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ptlab.alloc import (
    AccountingAllocator,
    Allocator,
    NormalAllocator,
    PageListAllocator,
    PhysPool,
)
from ptlab.engine import PageTable
from ptlab.kernel.asi import Asi, AsiError, x86_policy
from ptlab.memory.overlay import OverlayMemory
from ptlab.tlb import Gather
from ptlab.walk import Run

from .kernel_compare import PAGE, SCRATCH, Comparison, Difference, TableSnapshot, walk_runs
from .kernel_scenarios import Outcome, Target
from .qmp import parse_info_registers

M2 = 1 << 21


@dataclass
class AsiModel:
    """The model's two roots over one overlay, and what the build cost."""

    kernel: PageTable
    asi: Asi
    kalloc: AccountingAllocator
    aalloc: AccountingAllocator
    base: Any  # what the overlay is over (the real tables)
    canary_va: int
    canary_pa: int
    mapped_blocks: int
    skipped_blocks: int


def subset(scenario: str, nonsensitive: list[Run], kernel: list[Run]) -> Comparison:
    """Every present page of ``nonsensitive`` mapped the same way (PA, size, attributes)
    in ``kernel``: ``agree`` such pages, ``differ`` the others (listed)."""
    from .kernel_compare import compare_runs

    full = compare_runs(scenario, [r for r in nonsensitive if r.attrs.present],
                        [r for r in kernel if r.attrs.present])
    out = Comparison(scenario)
    for d in full.differences:
        if d.model is not None:  # the nonsensitive root maps it, and not as the kernel does
            out.differ += d.pages
            out.differences.append(d)
    nonsens_pages = sum(r.size for r in nonsensitive if r.attrs.present) // PAGE
    out.agree = nonsens_pages - out.differ
    return out


def build(t: Target, canary_pfn: int, asi_pages: Sequence[int] | None = None,
          base: Any = None) -> AsiModel:
    """The nonsensitive root for the stopped guest's kernel root, on an overlay of
    ``base`` (default: a frozen snapshot of the kernel half's tables). The ASI root's
    tables: ``asi_pages`` (e.g. guest pages the agent pinned), else the scratch range's
    upper half; the kernel's additions: the lower half."""
    from . import oracle, scenarios

    t.resume()
    syms = scenarios.kallsyms(t.g, ("vmemmap_base",))
    if "vmemmap_base" not in syms:
        raise scenarios.ScenarioError("kallsyms has no vmemmap_base")
    t.stop()
    vmemmap = oracle.read_virt_u64(t.g.hmp, syms["vmemmap_base"])
    if base is None:
        base = TableSnapshot(t.g.memory)
        walk_runs(t.fmt, base, t.root, *scenarios.kernel_half(t.fmt))
        base.freeze()
    half = (SCRATCH[1] - SCRATCH[0]) // 2
    ov = OverlayMemory(base, [SCRATCH])
    ainner: Allocator = NormalAllocator(PhysPool(ov, SCRATCH[0] + half, half)) \
        if asi_pages is None else PageListAllocator(ov, asi_pages)
    kalloc = AccountingAllocator(NormalAllocator(PhysPool(ov, SCRATCH[0], half)),
                                 owner="init_mm")
    aalloc = AccountingAllocator(ainner, owner="asi")
    kernel = PageTable(t.fmt, ov, root=t.root, alloc=kalloc, gather=Gather())
    dm_lo, dm_hi = t.span
    size = -(-(dm_hi - t.dm.base) // (1 << 30)) << 30
    asi = Asi(kernel, x86_policy(t.fmt.levels, size, t.dm.base, vmemmap), aalloc)
    canary_pa = canary_pfn * PAGE
    canary_va = t.dm.va(canary_pa)
    mapped = skipped = 0
    for blk in range(t.dm.base, t.dm.base + size, M2):
        if blk <= canary_va < blk + M2:
            continue  # the canary's pageblock stays sensitive
        try:
            asi.map(blk, M2)
            mapped += 1
        except AsiError:  # a hole of the direct map (or a leaf larger than a pageblock)
            skipped += 1
    return AsiModel(kernel, asi, kalloc, aalloc, base, canary_va, canary_pa, mapped, skipped)


def asi(t: Target) -> Outcome:
    """The ``asi`` scenario (x86-64): see the module docstring. ``comparison``: the subset
    check (``differ`` = pages the nonsensitive root maps that the kernel root does not, or
    not the same way); ``extra``: canary, translations, table pages per owner."""
    from . import oracle, scenarios

    t.resume()
    reply = t.g.agent("canary")
    try:
        m = build(t, reply["pfn"])
        lo, hi = scenarios.kernel_half(t.fmt)
        kruns = walk_runs(t.fmt, m.base, t.root, lo, hi)  # the real tables
        aruns = walk_runs(t.fmt, m.kernel.mem, m.asi.root.root, lo, hi)
        cmp = subset("asi", aruns, kruns)
        witness = oracle.gva2gpa(t.g.hmp, m.canary_va)
        pattern = t.g.memory.read(m.canary_pa, 64).hex()
        extra = {
            "canary_va": m.canary_va, "canary_pa": m.canary_pa, "qemu_canary": witness,
            "canary_pattern_ok": pattern == reply["pattern"],
            "kernel_canary": m.kernel.translate(m.canary_va).pa,
            "asi_canary": m.asi.root.translate(m.canary_va).pa,
            "refused": m.asi.noalloc.refused, "prepared": m.asi.prepared,
            "asi_tables": m.aalloc.charged("asi"), "kernel_tables": m.kalloc.charged("init_mm"),
            "owners": (m.kalloc.totals(), m.aalloc.totals()),
            "asi_table_count": m.asi.root.table_count(),
            "blocks": (m.mapped_blocks, m.skipped_blocks),
        }
        return Outcome(cmp, tables=extra["asi_tables"], extra=extra)
    finally:
        t.resume()
        t.g.agent("release", str(reply["id"]))


def control_register(g: Any, gdb: Any, name: str) -> Any:
    """The gdbstub's x86 control register ``name`` as QEMU's stub numbers it
    (:data:`~.gdbstub.X86_64_QEMU_CONTROL`), after checking that it and its neighbours
    read what HMP ``info registers`` shows (cr0, cr3, cr4, efer): never write a register
    whose number is not proven."""
    from .gdbstub import X86_64_QEMU_CONTROL, GdbError

    gdb.registers()  # QEMU serves registers once the target description was read
    hmp = parse_info_registers(g.hmp("info registers"))
    for n in ("cr0", "cr3", "cr4", "efer"):
        got = gdb.read_register(X86_64_QEMU_CONTROL[n])
        if got != hmp[n]:
            raise GdbError(f"gdbstub register {X86_64_QEMU_CONTROL[n].regnum} reads "
                           f"{got:#x}, HMP {n} is {hmp[n]:#x}: cannot locate {name}")
    return X86_64_QEMU_CONTROL[name]


def asi_cpu(t: Target, pin_pages: int = 16, probes: int = 512) -> Outcome:
    """The ``asi_cpu`` scenario (x86-64): the nonsensitive root built with its own tables
    in guest pages the agent pinned (``pin``), written into the stopped guest's RAM and
    loaded into the vCPU's CR3 through the gdbstub; QEMU's MMU (HMP gva2gpa) then
    translates, page for page, ``probes`` pages the model's root maps (kernel text among
    them) and the canary's pageblock, which it must not; CR3 is restored (always) and the
    guest must run on (the agent answers). ``comparison``: QEMU under the nonsensitive
    CR3 vs the model's nonsensitive root, per probed page."""
    import random

    from . import oracle, scenarios
    from .gdbstub import GdbClient
    from .profiles import RunPaths

    t.resume()
    syms = scenarios.kallsyms(t.g, ("_text", "_etext"))
    if len(syms) != 2:
        raise scenarios.ScenarioError(f"kallsyms has only {sorted(syms)} of _text, _etext")
    canary = t.g.agent("canary")
    held = [canary["id"]]
    try:
        pin = t.g.agent("pin", str(pin_pages))
        held.append(pin["id"])
        if None in pin["pfns"]:
            raise scenarios.ScenarioError(f"pin {pin_pages}: pagemap gave {pin['pfns']}")
        m = build(t, canary["pfn"], [p * PAGE for p in pin["pfns"]], base=t.g.memory)
        if m.kalloc.charged("init_mm"):
            raise scenarios.ScenarioError("sharing needed new kernel tables outside guest RAM")
        pinned = m.aalloc.inner
        if not isinstance(pinned, PageListAllocator):
            raise TypeError(f"ASI tables from {pinned!r}, not the pinned pages")
        own = pinned.in_use()
        for pa in own:  # the root's private tables into the pinned guest pages
            t.g.memory.write(pa, m.kernel.mem.read(pa, PAGE))
        root = m.asi.root.root
        lo, hi = scenarios.kernel_half(t.fmt)
        runs = [r for r in walk_runs(t.fmt, t.g.memory, root, lo, hi) if r.attrs.present]
        pages = [r.va + off for r in runs for off in range(0, r.size, PAGE)]
        rng = random.Random(t.rng.random())
        text = list(range(syms["_text"], syms["_etext"], PAGE))
        text = text[::max(1, len(text) // 64)]  # 64 pages of kernel text
        block = m.canary_va - m.canary_va % M2
        vas = sorted({*rng.sample(pages, min(probes, len(pages))), *text,
                      *range(block, block + M2, 64 * PAGE), m.canary_va})
        real = oracle.gva2gpa_many(t.g.hmp, [m.canary_va, *text]).gpas
        with GdbClient(RunPaths(t.g.rundir).gdb) as gdb:
            cr3 = control_register(t.g, gdb, "cr3")
            old = gdb.read_register(cr3)
            try:
                gdb.write_register(cr3, root | (old & 0xFFF))
                loaded = parse_info_registers(t.g.hmp("info registers"))["cr3"]
                seen = oracle.gva2gpa_many(t.g.hmp, vas).gpas
            finally:
                gdb.write_register(cr3, old)
            restored = parse_info_registers(t.g.hmp("info registers"))["cr3"]
        t.resume()
        pong = t.g.agent("ping")
        cmp = Comparison("asi_cpu")
        for va, gpa in zip(vas, seen, strict=True):
            want = m.asi.root.translate(va).pa
            if gpa == want:
                cmp.agree += 1
            else:
                cmp.differ += 1
                cmp.differences.append(Difference(va, va + PAGE, None if want is None else
                                                  (want, PAGE, "model"), None if gpa is None
                                                  else (gpa, PAGE, "qemu")))
        seen_at = dict(zip(vas, seen, strict=True))
        extra = {"cr3": (old, loaded, restored), "root": root, "own_tables": own,
                 "qemu_real_canary": real[0], "canary_pa": m.canary_pa,
                 "qemu_asi_canary": seen_at[m.canary_va],
                 "text_real": dict(zip(text, real[1:], strict=True)),
                 "text_asi": {va: seen_at[va] for va in vas if va in set(text)},
                 "block_asi": [seen_at[va] for va in range(block, block + M2, 64 * PAGE)],
                 "pong": pong, "refused": m.asi.noalloc.refused}
        return Outcome(cmp, tables=len(own), extra=extra)
    finally:
        t.resume()
        for ident in held:
            t.g.agent("release", str(ident))


__all__ = ["AsiModel", "asi", "asi_cpu", "build", "subset"]

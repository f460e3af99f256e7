"""Helpers the real-table tests share: walk the kernel half, find the direct map, sample VAs,
catch the vCPU in user mode, find a process's root table.

Every function takes plain values (format, memory, root, runs) or a started
:class:`~ptharness.guest.Guest`; none of them decides a test's verdict.
"""

from __future__ import annotations

import bisect
import itertools
import random
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ptlab.arch import arch_for
from ptlab.arch import arm64 as arch_arm64
from ptlab.arch import x86_64 as arch_x86
from ptlab.formats.base import Format, Kind
from ptlab.memory.base import PhysMemory
from ptlab.walk import Run, RunTable, Walker, translate

from . import agent_reply, oracle

PAGE = 4096
# Architecture facts the real-table tests name (ptlab.arch holds them):
X86_PTI_USER_BIT = arch_x86.PTI_USER_PGTABLE_MASK
ARM64_TTBR_BADDR = arch_arm64.TTBR_BADDR
ARM64_TRAMP_SWAPPER_OFFSET = arch_arm64.TRAMP_SWAPPER_OFFSET


class ScenarioError(RuntimeError):
    """A precondition of a scenario could not be established (not a walker verdict)."""


# --- walking -------------------------------------------------------------------------------------
def kernel_half(fmt: Format) -> tuple[int, int]:
    """[start, end) of the kernel (upper) half ``fmt`` translates."""
    for start, end in fmt.va_ranges():
        if start >> 63:
            return start, end
    raise ScenarioError(f"{fmt!r} has no upper half")


@dataclass
class KernelWalk:
    """The runs of one root's kernel half and what it took to get them."""

    fmt: Format
    root: int
    runs: RunTable
    anomalies: list[Any]
    tables: int
    seconds: float


def walk_kernel(fmt: Format, mem: PhysMemory, root: int, **kw: Any) -> KernelWalk:
    """Walk the whole kernel half of ``root`` into runs (timed)."""
    start, end = kernel_half(fmt)
    t0 = time.perf_counter()
    walker = Walker(fmt, mem, root, **kw)
    runs = walker.run_table(start, end)
    secs = time.perf_counter() - t0
    return KernelWalk(fmt, root, runs, walker.anomalies, walker.tables_visited, secs)


class RunIndex:
    """VA lookups over a VA-sorted, non-overlapping run list."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = sorted(runs, key=lambda r: r.va)
        self.starts = [r.va for r in self.runs]
        for a, b in zip(self.runs, self.runs[1:], strict=False):
            if a.end > b.va:
                raise ScenarioError(f"runs overlap at {b.va:#x}")

    def run_at(self, va: int) -> Run | None:
        i = bisect.bisect_right(self.starts, va) - 1
        if i >= 0 and va < self.runs[i].end:
            return self.runs[i]
        return None

    def pa(self, va: int) -> int | None:
        r = self.run_at(va)
        return None if r is None else r.pa + (va - r.va)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Sub-ranges of [start, end) no run covers."""
        out, cur = [], start
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while cur < end and i < len(self.runs):
            r = self.runs[i]
            i += 1
            if r.end <= cur:
                continue
            if r.va >= end:
                break
            if r.va > cur:
                out.append((cur, r.va))
            cur = max(cur, r.end)
        if cur < end:
            out.append((cur, end))
        return out


def sample_mapped(runs: Sequence[Run], n: int, rng: random.Random) -> list[int]:
    """``n`` VAs inside runs: half pick a run uniformly (every kind of mapping gets hit), half
    pick by size (what the address space is made of); the byte offset is random."""
    if not runs:
        raise ScenarioError("no mapped runs to sample")
    cum = list(itertools.accumulate(r.size for r in runs))  # choices(weights=) redoes this
    out = []
    for i in range(n):
        r = rng.choice(runs) if i % 2 else rng.choices(runs, cum_weights=cum)[0]
        out.append(r.va + rng.randrange(r.size))
    return out


def sample_unmapped(index: RunIndex, start: int, end: int, n: int,
                    rng: random.Random) -> list[int]:
    """``n`` VAs in [start, end) no run covers: half uniform over the range, half within a page
    after the end of a run (guard pages, partly mapped tables)."""
    out: list[int] = []
    ends = [r.end for r in index.runs if r.end < end]
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise ScenarioError(f"found only {len(out)} of {n} unmapped VAs")
        if len(out) % 2 and ends:
            va = rng.choice(ends) + rng.randrange(PAGE)
        else:
            va = rng.randrange(start, end)
        if start <= va < end and index.run_at(va) is None:
            out.append(va)
    return out


# --- the guest's own view ------------------------------------------------------------------------
def agent_symbol(info: dict[str, Any], name: str) -> int:
    """Address of kernel symbol ``name`` as ``ptagent info`` reported it (kallsyms)."""
    syms = agent_reply.kallsyms(info)
    if name not in syms:
        raise ScenarioError(f"ptagent info reports no symbol {name!r} (has {sorted(syms)})")
    return syms[name]


def grep_kallsyms(g: Any, names: Sequence[str]) -> dict[str, int]:
    """Addresses of ``names`` in the guest's /proc/kallsyms, read over SSH with busybox
    ``grep -F`` (fixed strings: a third of the guest time of an ``-E`` alternation, 0.4 s
    against 1.2 s under TCG) and kept where the name matches exactly on a core-kernel line
    (no ``[module]`` field); the first of duplicates."""
    if not names:
        return {}
    patterns = " ".join(f"-e {shlex.quote(' ' + n)}" for n in names)
    rc, text, err = g.ssh(f"grep -F {patterns} /proc/kallsyms")
    if rc not in (0, 1):  # 1: nothing matched
        raise ScenarioError(f"grep /proc/kallsyms: status {rc}: {err.strip()[:200]}")
    wanted, out = set(names), {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in wanted:
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def kallsyms(g: Any, names: Sequence[str]) -> dict[str, int]:
    """Addresses of ``names``: from ``ptagent info`` when it reports them, else from the
    guest's /proc/kallsyms over SSH (the guest must be running). Missing names are left out."""
    syms = agent_reply.kallsyms(g.info)
    out = {name: syms[name] for name in names if name in syms}
    rest = [n for n in names if n not in out]
    out.update((n, a) for n, a in grep_kallsyms(g, rest).items() if a)
    return out


def system_ram(info: dict[str, Any]) -> list[tuple[int, int]]:
    """System RAM ranges [start, end) from ``ptagent info`` (its ``system_ram``)."""
    out = agent_reply.system_ram(info)
    if not out:
        raise ScenarioError("ptagent info reports no System RAM range")
    return out


@dataclass(frozen=True)
class DirectMap:
    """The kernel's direct (linear) map: VA = base + (pa - phys_offset)."""

    base: int
    phys_offset: int

    def va(self, pa: int) -> int:
        return (self.base + pa - self.phys_offset) & ((1 << 64) - 1)


def direct_map(g: Any, syms: dict[str, int] | None = None) -> DirectMap:
    """Where ``g``'s kernel put its direct map, from sources the walker does not read
    (:meth:`ptlab.arch.ArchOps.direct_map`).

    x86: ``page_offset_base``'s value (kallsyms address from the agent, or ``syms``; the value
    read by QEMU through its own translation, HMP ``x``; the vCPU must be stopped in the kernel
    regime). arm64: PAGE_OFFSET = -(1 << VA_BITS) and PHYS_OFFSET (memstart_addr, randomised
    by KASLR) from VMCOREINFO.
    """
    def read_variable(name: str) -> int:
        addr = (syms or {}).get(name) or agent_symbol(g.info, name)
        return oracle.read_virt_u64(g.hmp, addr)

    base, phys_offset = arch_for(g.profile.arch).direct_map(g.vmcoreinfo, read_variable)
    return DirectMap(base, phys_offset)


# --- vCPU regime ---------------------------------------------------------------------------------
def in_user_regime(g: Any, regs: dict[str, int], kernel_root: int) -> bool:
    """Whether the stopped vCPU runs on the KPTI user tables: x86 CR3 with the PTI user bit;
    arm64 TTBR1_EL1 on the trampoline table (swapper_pg_dir - TRAMP_SWAPPER_OFFSET)."""
    return arch_for(g.profile.arch).user_regime(regs, kernel_root)


def arm64_el(g: Any) -> int:
    """The current exception level of ``g``'s (stopped) vCPU: CPSR.M[3:2] from the gdbstub."""
    from .gdbstub import GdbClient
    from .profiles import RunPaths

    with GdbClient(RunPaths(g.rundir).gdb) as gdb:
        return (gdb.read_register("cpsr") >> 2) & 3


def in_kernel_regime(g: Any, regs: dict[str, int], kernel_root: int) -> bool:
    """Whether QEMU's debug translation (gva2gpa, x) of kernel VAs now uses the kernel tables:
    x86 CR3 is not a PTI user PGD (x86 debug walks ignore CPL); arm64 TTBR1_EL1 is
    swapper_pg_dir and the vCPU is at EL1 (at EL0 QEMU checks EL0 permissions, so every
    kernel VA reads as unmapped)."""
    if in_user_regime(g, regs, kernel_root):
        return False
    return not g.profile.board.debug_walk_checks_el or arm64_el(g) == 1


def stop_where(g: Any, want: Callable[[dict[str, int]], bool], rng: random.Random,
               tries: int = 60) -> dict[str, int]:
    """Stop the guest at a moment ``want(registers)`` holds: stop, look, continue a random
    few ms (from ``rng``: a seeded one replays), retry. Leaves the guest stopped.
    ScenarioError after ``tries``."""
    for _ in range(tries):
        g.stop()
        regs = g.registers()
        if want(regs):
            return regs
        g.cont()
        time.sleep(rng.uniform(0.002, 0.03))
    raise ScenarioError(f"vCPU never in the wanted state in {tries} stops")


@contextmanager
def user_spinner(g: Any) -> Iterator[int]:
    """A busy user-mode loop in the guest (so that a stop lands in user mode); yields its PID
    and kills it on exit (the guest must be running then)."""
    # busybox has no nohup here: the loop ignores SIGHUP itself and lets go of the session
    status, out, err = g.ssh(
        "sh -c 'trap \"\" HUP; while :; do :; done' </dev/null >/dev/null 2>&1 & echo $!"
    )
    try:
        pid = int(out.split()[-1])
    except (ValueError, IndexError):
        raise ScenarioError(f"cannot start a spinner: {status} {out!r} {err!r}") from None
    try:
        yield pid
    finally:
        if not g.running:
            g.cont()
        g.ssh(f"kill {pid}")


# --- process roots -------------------------------------------------------------------------------
def find_user_roots(fmt: Format, mem: Any, expected: dict[int, int],
                    ranges: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """Root tables (PAs) through which every ``va -> pa`` of ``expected`` translates, present.

    Finds a process's page-table root without its CR3/TTBR0: candidates are the top-level
    tables (pages, or 128-byte ``pgd_cache`` objects of an arm64 LPA2 5-level pgd: pgd_alloc,
    arch/arm64/mm/pgd.c) whose entry for the first VA looks like a table entry (numpy scan
    over RAM), then each is translated with ptlab's walker. ``mem.view(pa, size)`` is used
    when there (SharedRAM: zero copy), else ``mem.read``."""
    if not expected:
        raise ScenarioError("nothing to look for")
    first = min(expected)
    idx = fmt.index(first & (fmt.va_span - 1), fmt.top_level)
    step = min(PAGE, fmt.entries(fmt.top_level) * 8)  # PGD_SIZE: alignment of a root
    roots: list[int] = []
    spans = list(ranges or mem.ranges())
    for start, end in spans:
        for base in range(start, end, 64 << 20):
            size = min(64 << 20, end - base)
            view = getattr(mem, "view", None)
            buf = view(base, size) if view is not None else mem.read(base, size)
            table = np.frombuffer(buf, dtype="<u8").reshape(-1, step // 8)
            col = np.ascontiguousarray(table[:, idx])
            ok = fmt.kinds(col, fmt.top_level) == int(Kind.TABLE)
            oas = fmt.oas(col, fmt.top_level)
            ok &= np.logical_or.reduce(
                [(oas >= np.uint64(s)) & (oas < np.uint64(e)) for s, e in spans]
            )
            for i in np.nonzero(ok)[0]:
                root = base + int(i) * step
                if all(_maps(fmt, mem, root, va, pa) for va, pa in expected.items()):
                    roots.append(root)
    return roots


def _maps(fmt: Format, mem: PhysMemory, root: int, va: int, pa: int) -> bool:
    t = translate(fmt, mem, root, va)
    return t.fault is None and t.pa == pa

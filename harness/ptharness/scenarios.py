"""Helpers the real-table tests share: walk the kernel half, find the direct map, sample VAs,
catch the vCPU in user mode, find a process's root table.

Every function takes plain values (format, memory, root, runs) or a started
:class:`~ptharness.guest.Guest`; none of them decides a test's verdict.
"""

from __future__ import annotations

import bisect
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ptlab.formats.base import Format, Kind
from ptlab.memory.base import PhysMemory
from ptlab.walk import Run, RunTable, Walker, translate

from . import oracle

PAGE = 4096
X86_CR3_ADDR = 0x000F_FFFF_FFFF_F000
X86_PTI_USER_BIT = 1 << 12  # arch/x86/include/asm/processor-flags.h PTI_USER_PGTABLE_MASK
ARM64_TTBR_BADDR = 0x0000_FFFF_FFFF_FFFE  # TTBRn_EL1.BADDR (bits 47:1; CnP is bit 0)
ARM64_TRAMP_SWAPPER_OFFSET = 2 * PAGE  # vmlinux.lds.S: tramp_pg_dir, reserved_pg_dir, swapper


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
    sizes = [r.size for r in runs]
    out = []
    for i in range(n):
        r = rng.choice(runs) if i % 2 else rng.choices(runs, weights=sizes)[0]
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
def _int(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 0) if v.lower().startswith("0x") else int(v, 16)
    raise ScenarioError(f"not an address: {v!r}")


def agent_symbol(info: dict[str, Any], name: str) -> int:
    """Address of kernel symbol ``name`` as ``ptagent info`` reported it (kallsyms)."""
    for key in ("kallsyms", "symbols", "syms"):
        table = info.get(key)
        if isinstance(table, dict) and name in table:
            return _int(table[name])
    if name in info:
        return _int(info[name])
    raise ScenarioError(f"ptagent info reports no symbol {name!r} (keys: {sorted(info)})")


def kallsyms(g: Any, names: Sequence[str]) -> dict[str, int]:
    """Addresses of ``names``: from ``ptagent info`` when it reports them, else from the
    guest's /proc/kallsyms over SSH (the guest must be running). Missing names are left out."""
    out: dict[str, int] = {}
    for name in names:
        try:
            out[name] = agent_symbol(g.info, name)
        except ScenarioError:
            pass
    rest = [n for n in names if n not in out]
    if rest:
        pattern = "|".join(re.escape(n) for n in rest)
        _, text, _ = g.ssh(f"grep -E ' ({pattern})$' /proc/kallsyms")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2] in rest and parts[2] not in out:
                addr = int(parts[0], 16)
                if addr:
                    out[parts[2]] = addr
    return out


def system_ram(info: dict[str, Any]) -> list[tuple[int, int]]:
    """System RAM ranges [start, end) from ``ptagent info``: its ``system_ram`` objects
    (``end`` exclusive), or /proc/iomem lines (inclusive ends)."""
    for key in ("system_ram", "iomem", "ram"):
        ranges = info.get(key)
        if ranges:
            break
    else:
        raise ScenarioError(f"ptagent info reports no System RAM (keys: {sorted(info)})")
    out = []
    for r in ranges:
        if isinstance(r, dict):
            if "name" in r and r["name"] != "System RAM":
                continue
            s, e = _int(r["start"]), _int(r["end"]) - 1
        elif isinstance(r, str):
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+)(?:\s*:\s*(.*))?", r)
            if m is None:
                raise ScenarioError(f"bad iomem line {r!r}")
            if m[3] and m[3].strip() != "System RAM":
                continue
            s, e = int(m[1], 16), int(m[2], 16)
        else:
            s, e = (_int(x) for x in r)
        out.append((s, e + 1))
    if not out:
        raise ScenarioError("no System RAM range reported")
    return sorted(out)


@dataclass(frozen=True)
class DirectMap:
    """The kernel's direct (linear) map: VA = base + (pa - phys_offset)."""

    base: int
    phys_offset: int

    def va(self, pa: int) -> int:
        return (self.base + pa - self.phys_offset) & ((1 << 64) - 1)


def direct_map(g: Any, syms: dict[str, int] | None = None) -> DirectMap:
    """Where ``g``'s kernel put its direct map, from sources the walker does not read.

    x86: ``page_offset_base`` (kallsyms address from the agent; its value read by QEMU through
    its own translation, HMP ``x``; the vCPU must be stopped in the kernel regime).
    arm64 (arch/arm64/include/asm/memory.h): PAGE_OFFSET = -(1 << VA_BITS) and
    __phys_to_virt(pa) = (pa - PHYS_OFFSET) | PAGE_OFFSET with VA_BITS and PHYS_OFFSET
    (memstart_addr, randomised by KASLR) from VMCOREINFO.
    """
    if g.profile.arch == "x86_64":
        addr = (syms or {}).get("page_offset_base") or agent_symbol(g.info, "page_offset_base")
        return DirectMap(oracle.read_virt_u64(g.hmp, addr), 0)
    vi = g.vmcoreinfo()
    va_bits = vi.number("VA_BITS")
    phys_offset = vi.number("PHYS_OFFSET")
    return DirectMap((1 << 64) - (1 << va_bits), phys_offset & ((1 << 64) - 1))


# --- vCPU regime ---------------------------------------------------------------------------------
def in_user_regime(g: Any, regs: dict[str, int], kernel_root: int) -> bool:
    """Whether the stopped vCPU runs on the KPTI user tables: x86 CR3 with the PTI user bit;
    arm64 TTBR1_EL1 on the trampoline table (swapper_pg_dir - TRAMP_SWAPPER_OFFSET)."""
    if g.profile.arch == "x86_64":
        return bool(regs["cr3"] & X86_PTI_USER_BIT)
    base = regs["ttbr1_el1"] & ARM64_TTBR_BADDR
    return base == kernel_root - ARM64_TRAMP_SWAPPER_OFFSET


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
    return g.profile.arch == "x86_64" or arm64_el(g) == 1


def stop_where(g: Any, want: Callable[[dict[str, int]], bool], tries: int = 60,
               rng: random.Random | None = None) -> dict[str, int]:
    """Stop the guest at a moment ``want(registers)`` holds: stop, look, continue a random
    few ms, retry. Leaves the guest stopped. ScenarioError after ``tries``."""
    rng = rng or random.Random()
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

    Finds a process's page-table root without its CR3/TTBR0: candidates are the pages whose
    top-level entry for the first VA looks like a table entry (numpy scan over RAM), then each
    is translated with ptlab's walker. ``mem.view(pa, size)`` is used when there (SharedRAM:
    zero copy), else ``mem.read``."""
    if not expected:
        raise ScenarioError("nothing to look for")
    first = min(expected)
    idx = fmt.index(first & (fmt.va_span - 1), fmt.top_level)
    roots: list[int] = []
    spans = list(ranges or mem.ranges())
    for start, end in spans:
        for base in range(start, end, 64 << 20):
            size = min(64 << 20, end - base)
            view = getattr(mem, "view", None)
            buf = view(base, size) if view is not None else mem.read(base, size)
            table = np.frombuffer(buf, dtype="<u8").reshape(-1, PAGE // 8)
            col = np.ascontiguousarray(table[:, idx])
            ok = fmt.kinds(col, fmt.top_level) == int(Kind.TABLE)
            oas = fmt.oas(col, fmt.top_level)
            ok &= np.logical_or.reduce(
                [(oas >= np.uint64(s)) & (oas < np.uint64(e)) for s, e in spans]
            )
            for i in np.nonzero(ok)[0]:
                root = base + int(i) * PAGE
                if all(_maps(fmt, mem, root, va, pa) for va, pa in expected.items()):
                    roots.append(root)
    return roots


def _maps(fmt: Format, mem: PhysMemory, root: int, va: int, pa: int) -> bool:
    t = translate(fmt, mem, root, va)
    return t.fault is None and t.pa == pa

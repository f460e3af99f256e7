"""W+X audit: mappings both writable and kernel-executable (what CONFIG_DEBUG_WX checks).

x86: ``note_wx()`` counts effective RW && !NX (arch/x86/mm/dump_pagetables.c); arm64:
``note_prot_wx()`` counts !PTE_RDONLY && !PTE_PXN, and ``note_prot_uxn()`` non-UXN pages
(arch/arm64/mm/ptdump.c). Works on walker runs or parsed ptdump lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..formats.base import Format, Kind
from ..walk import Run, Walker
from .render import DumpRun, kernel_ranges

__all__ = ["WXReport", "check_wx", "is_wx", "wx_runs"]


def is_wx(run: Run | DumpRun) -> bool:
    """Whether ``run`` is a present mapping that is writable and kernel-executable (runs
    carry effective attrs, so a table entry's restriction counts)."""
    if isinstance(run, DumpRun):
        f = set(run.flags)
        return run.mapped and "RW" in f and "x" in f
    a = run.attrs
    return run.kind is Kind.LEAF and a.present and a.writable and a.exec


def wx_runs(runs: Iterable[Run | DumpRun]) -> list[Run | DumpRun]:
    """The W+X runs of ``runs``, in order."""
    return [r for r in runs if is_wx(r)]


@dataclass(frozen=True, slots=True)
class WXReport:
    """Result of :func:`check_wx`: W+X runs, page counts and the kernel's boot-log line."""

    runs: list[Run]
    wx_pages: int
    uxn_pages: int  # arm64: kernel pages executable at EL0 (non-UXN); x86: 0
    message: str

    @property
    def passed(self) -> bool:
        return not self.wx_pages and not self.uxn_pages


def check_wx(fmt: Format, mem, root: int, page_size: int | None = None) -> WXReport:
    """ptdump_check_wx() / ptdump_walk_pgd_level_checkwx() over ``root``: the kernel's
    "Checked W+X mappings" verdict. Counted as the kernel counts: over the ranges its walk
    covers (x86 skips the hypervisor hole) and from the entries' bits whether or not they are
    present (the kernel reads a non-present entry's RW/NX too)."""
    walker = Walker(fmt, mem, root, include_nonpresent=True)
    runs = [r for s, e in kernel_ranges(fmt) for r in walker.runs(s, e)]
    unit = page_size or fmt.page_sizes()[0]
    wx = [r for r in runs if r.attrs.writable and r.attrs.exec]
    wx_pages = sum(r.size // unit for r in wx)
    if fmt.arch == "arm64":
        uxn = sum(r.size // unit for r in runs if r.attrs.uexec)
        if wx_pages or uxn:
            msg = (f"Checked W+X mappings: FAILED, {wx_pages} W+X pages found, "
                   f"{uxn} non-UXN pages found")
        else:
            msg = "Checked W+X mappings: passed, no W+X pages found"
        return WXReport(wx, wx_pages, uxn, msg)
    if wx_pages:
        msg = f"x86/mm: Checked W+X mappings: FAILED, {wx_pages} W+X pages found."
    else:
        msg = "x86/mm: Checked W+X mappings: passed, no W+X pages found."
    return WXReport(wx, wx_pages, 0, msg)

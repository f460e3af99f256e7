"""W+X audit: mappings both writable and kernel-executable (what CONFIG_DEBUG_WX checks).

The rule and the boot-log line are the architecture's (:meth:`ptlab.arch.ArchOps.wx_count`,
``wx_message``): x86 ``note_wx()`` counts effective RW && !NX; arm64 ``note_prot_wx()``
counts !PTE_RDONLY && !PTE_PXN and ``note_prot_uxn()`` non-UXN pages. Works on walker runs or
parsed ptdump lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..arch import arch_for
from ..formats.base import Format, Kind
from ..walk import Run, Walker
from .render import DumpRun

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
    complete: bool = True  # False: the walk ran out of budget (garbage); the verdict is partial

    @property
    def passed(self) -> bool:
        return not self.wx_pages and not self.uxn_pages


def check_wx(fmt: Format, mem, root: int, page_size: int | None = None,
             **walker_kw: int) -> WXReport:
    """ptdump_check_wx() / ptdump_walk_pgd_level_checkwx() over ``root``: the kernel's
    "Checked W+X mappings" verdict. Counted as the kernel counts: over the ranges its walk
    covers (x86 skips the hypervisor hole) and from the entries' bits whether or not they are
    present (the kernel reads a non-present entry's RW/NX too); x86 judges effective
    permissions, arm64 the leaves' own bits (``ArchOps.wx_count``). ``walker_kw``: the
    walk's budget (``max_work``, ``max_tables``)."""
    walker = Walker(fmt, mem, root, include_nonpresent=True, own_attrs=True,
                    **walker_kw)  # type: ignore[arg-type]
    ops = arch_for(fmt)
    runs, complete = [], True
    for s, e in ops.ptdump_ranges(fmt):
        runs.extend(walker.runs(s, e))
        complete = complete and walker.complete
    count = ops.wx_count(runs, page_size or fmt.page_sizes()[0])
    return WXReport(count.runs, count.wx_pages, count.uxn_pages, ops.wx_message(count),
                    complete)

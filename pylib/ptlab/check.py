"""``ptlab check``: security rules over a kernel's page tables, one :class:`Finding` per run.

Rules (the arch-specific parts are :class:`ptlab.arch.ArchOps` hooks):

* ``wx`` — writable and executable (the kernel's DEBUG_WX rule, ``ArchOps.wx_count``);
  ``text-writable`` when such a run lies in the kernel's text.
* ``user-kernel`` — a page of the kernel half (VA >= 2**63) user mode can access.
* ``data-exec`` — kernel-executable outside the kernel's text, unless the architecture names
  a reason (module text, a trampoline: ``ArchOps.exec_reason``).
* ``el0-exec`` — arm64 kernel pages without UXN (``ArchOps.el0_exec_runs``).
* ``user-root`` — the x86 PTI user PGD / arm64 KPTI trampoline table maps something the entry
  code does not need (``ArchOps.user_root_reasons``).

The kernel's text starts at VMCOREINFO's ``SYMBOL(_stext)`` and runs as long as the mapping
stays executable; without VMCOREINFO it is the longest executable stretch of the
architecture's kernel-image range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import arch_for
from .formats.base import Format
from .walk import Run, Walker

KERNEL_HALF = 1 << 63

RULES = ("wx", "text-writable", "user-kernel", "data-exec", "el0-exec", "user-root")


@dataclass(frozen=True)
class Finding:
    """One rule broken by one run of ``root``."""

    rule: str
    run: Run
    root: int
    why: str

    def as_dict(self) -> dict[str, Any]:
        r = self.run
        return {"rule": self.rule, "va": f"{r.va:#x}", "end": f"{r.va + r.size:#x}",
                "pa": f"{r.pa:#x}", "size": r.size, "page_size": r.page_size,
                "root": f"{self.root:#x}", "why": self.why}


@dataclass
class Report:
    findings: list[Finding]
    text: tuple[int, int] | None  # the kernel text's VA range, when found
    user_root: tuple[int, str] | None
    complete: bool  # False: a walk ran out of its budget


def kernel_text(runs: list[Run], fmt: Format, stext: int | None) -> tuple[int, int] | None:
    """[start, end) of the executable stretch holding ``stext`` (VMCOREINFO's _stext), else
    the longest executable stretch of the arch's kernel-image range."""
    stretches: list[tuple[int, int]] = []
    for r in runs:
        if not r.attrs.exec:
            continue
        if stretches and stretches[-1][1] == r.va:
            stretches[-1] = (stretches[-1][0], r.va + r.size)
        else:
            stretches.append((r.va, r.va + r.size))
    if stext is not None:
        return next(((s, e) for s, e in stretches if s <= stext < e), None)
    lo, hi = arch_for(fmt).image_range(fmt)
    inside = [(s, e) for s, e in stretches if lo <= s and e <= hi]
    return max(inside, key=lambda se: se[1] - se[0], default=None)


def check(fmt: Format, mem: Any, root: int, *, stext: int | None = None,
          user_root: int | None = None, **walker_kw: int) -> Report:
    """Every rule over the kernel half of ``root`` and (given, or found by
    ``ArchOps.user_root``) the user-side root's."""
    ops = arch_for(fmt)
    walker = Walker(fmt, mem, root, include_nonpresent=False, own_attrs=True, **walker_kw)
    runs: list[Run] = []
    complete = True
    for s, e in fmt.va_ranges():
        if e > KERNEL_HALF:
            runs.extend(walker.runs(max(s, KERNEL_HALF), e))
            complete = complete and walker.complete
    text = kernel_text(runs, fmt, stext)
    out: list[Finding] = []

    def in_text(r: Run) -> bool:
        return text is not None and r.va < text[1] and text[0] < r.va + r.size

    wx = {id(r) for r in ops.wx_count(runs, fmt.page_sizes()[0]).runs}
    for r in runs:
        a = r.attrs
        if id(r) in wx:
            out.append(Finding("text-writable" if in_text(r) else "wx", r, root,
                               "writable and executable" + (" kernel text" if in_text(r)
                                                            else "")))
        if a.user:
            out.append(Finding("user-kernel", r, root, "kernel-half page accessible from user "
                               "mode"))
        if a.exec and not in_text(r) and id(r) not in wx:
            reason = ops.exec_reason(fmt, r, text)
            if reason is None:
                out.append(Finding("data-exec", r, root, "executable outside the kernel text"))
    for r in ops.el0_exec_runs(runs):
        out.append(Finding("el0-exec", r, root, "kernel page executable at EL0 (no UXN)"))
    found = ((user_root, "--user-root") if user_root is not None
             else ops.user_root(fmt, mem, root))
    if found is not None:
        uw = Walker(fmt, mem, found[0], include_nonpresent=False, **walker_kw)
        for s, e in fmt.va_ranges():
            if e <= KERNEL_HALF:
                continue
            uruns = list(uw.runs(max(s, KERNEL_HALF), e))
            for r, why in zip(uruns, ops.user_root_reasons(fmt, uruns), strict=True):
                if why is None:
                    out.append(Finding("user-root", r, found[0], f"{found[1]} maps more than "
                                       "the entry code needs"))
            complete = complete and uw.complete
    out.sort(key=lambda f: (f.root != root, f.run.va, RULES.index(f.rule)))
    return Report(out, text, found, complete)

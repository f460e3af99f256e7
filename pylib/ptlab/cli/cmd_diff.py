"""``ptlab diff``: two dumps, or two roots of one, compared as runs."""

from __future__ import annotations

import argparse
from typing import IO

from .. import dump
from ..arch import arch_for
from ..formats.base import Format
from ..walk import Walker
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source, open_input
from .text import attrs_text, size_text
from .walking import _range, walk_budget


def _second_side(src: Source, args: argparse.Namespace,
                 fmt: Format) -> tuple[Source | None, int]:
    """(the other dump or None for ``src`` itself, its root) for ``diff``."""
    if args.b is None and args.root_b is None:
        raise CliError("diff needs a second dump B or --root-b PA")
    if args.b is None:
        return None, infer_root(src, argparse.Namespace(**{**vars(args), "root": args.root_b}),
                                fmt)
    other = argparse.Namespace(**{**vars(args), "dump": args.b, "elf": None, "raw": None,
                                  "region": None, "root": args.root_b,
                                  "vmcoreinfo": "scan" if args.vmcoreinfo == "scan" else None})
    srcb = open_input(other)
    try:
        fmtb = infer_format(srcb, other)
        if fmtb.name != fmt.name:
            raise CliError(f"{args.b} is {fmtb.name}, {src.path} is {fmt.name}: no diff")
        return srcb, infer_root(srcb, other, fmtb)
    except BaseException:
        srcb.mem.close()
        raise


def _kaslr_window(src: Source, fmt: Format) -> tuple[int, int, int] | None:
    """(KERNELOFFSET, [lo, hi) of the kernel image's VAs) from ``src``'s VMCOREINFO: the
    128 MiB from _stext's 2 MiB boundary, inside the architecture's image range."""
    vmci = src.vmcoreinfo
    if vmci is None or vmci.kernel_offset is None or not vmci.has("SYMBOL", "_stext"):
        return None
    lo, hi = arch_for(fmt).image_range(fmt)
    start = vmci.symbol("_stext") & ~((2 << 20) - 1)
    return vmci.kernel_offset, max(lo, start), min(hi, start + (128 << 20))


def cmd_diff(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.dump.diff` of the two sides' leaf runs (page sizes compared), one line
    (or JSON object) per change under its ptdump region header; status 1 on differences."""
    import json

    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    srcb, rootb = _second_side(src, args, fmt)
    try:
        memb = src.mem if srcb is None else srcb.mem
        kw = walk_budget(src.mem)
        wa = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad, **kw)
        wb = Walker(fmt, memb, rootb, ignore_ad=args.ignore_ad, **walk_budget(memb))
        runs_a, runs_b = list(wa.runs(start, end)), list(wb.runs(start, end))
        if not (wa.complete and wb.complete):
            raise CliError("a walk stopped at its work budget (garbage or cyclic tables?)")
        note = ""
        ka = _kaslr_window(src, fmt)
        kb = _kaslr_window(srcb, fmt) if srcb is not None else None
        if ka is not None and kb is not None and ka[0] != kb[0]:
            runs_b = dump.shifted(runs_b, kb[1], kb[2], ka[0] - kb[0])
            note = f", B's kernel image moved by {ka[0] - kb[0]:#x} (KERNELOFFSET)"
    finally:
        if srcb is not None:
            srcb.mem.close()
    changes = dump.diff(runs_a, runs_b, compare_pa=args.compare_pa, compare_page_size=True,
                        ignore_ad=args.ignore_ad)
    markers = [m for m in arch_for(fmt).ptdump_markers(fmt) if m.name is not None]
    counts: dict[str, int] = {}
    lines, region = [], None
    for ch in changes:
        counts[ch.kind] = counts.get(ch.kind, 0) + 1
        here = next((m.name for m in reversed(markers) if m.start <= ch.va), "")
        if args.json:
            lines.append(json.dumps({
                "kind": ch.kind, "va": f"{ch.va:#x}", "end": f"{ch.end:#x}", "size": ch.size,
                "region": here, "old": attrs_text(ch.old) if ch.old else None,
                "new": attrs_text(ch.new) if ch.new else None,
                "old_pa": None if ch.old_pa is None else f"{ch.old_pa:#x}",
                "new_pa": None if ch.new_pa is None else f"{ch.new_pa:#x}",
                "old_page_size": ch.old_page_size, "new_page_size": ch.new_page_size}))
            continue
        if here != region:
            lines.append(f"---[ {here} ]---")
            region = here
        sizes = "/".join(size_text(p) for p in (ch.old_page_size, ch.new_page_size) if p)
        lines.append(f"{ch.kind:<8} {ch.va:#018x}-{ch.end:#018x} {size_text(ch.size):>6}  "
                     f"{attrs_text(ch.old) if ch.old else '-'} -> "
                     f"{attrs_text(ch.new) if ch.new else '-'}  [{sizes}]")
    if lines:
        out.write("\n".join(lines) + "\n")
    if not args.json:
        what = args.b if args.b is not None else f"root {rootb:#x}"
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no differences"
        out.write(f"# {src.path} root {root:#x} vs {what}: {summary}{note}\n")
    return 1 if changes else 0

"""``ptlab ptdump``: the kernel's debugfs page-table dump text."""

from __future__ import annotations

import argparse
from typing import IO, Any

from .. import dump
from ..walk import Walker
from .infer import infer_format, infer_root
from .inputs import Source
from .text import write_lines
from .walking import _range, walk_budget


def ptdump_json(items: list[Any], out: IO[str]) -> int:
    """ptdump lines as objects: {"va", "end", "size", "level", "flags", "section"}; a capped
    section's "... N entries skipped ..." as {"skipped": N}."""
    import json

    def obj(it: Any) -> dict[str, Any] | None:
        if isinstance(it, dump.DumpRun):
            return {"va": f"{it.va:#x}", "end": f"{it.end:#x}", "size": it.size,
                    "level": it.level, "flags": list(it.flags), "section": it.section}
        if isinstance(it, dump.Skipped):
            return {"skipped": it.count}
        return None

    write_lines(out, (json.dumps(o) for o in map(obj, items) if o is not None))
    return 0


def cmd_ptdump(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    if start is None and end is None:
        if args.json:
            walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad, include_holes=True,
                            include_nonpresent=True, own_attrs=True, **walk_budget(src.mem))
            return ptdump_json(dump.note_runs(walker.run_table(), fmt), out)
        out.write(dump.dump(fmt, src.mem, root, ignore_ad=args.ignore_ad,
                            **walk_budget(src.mem)))
        return 0
    # the kernel's lines depend on the walk from the start (sections, coalescing): render the
    # whole root and keep the lines overlapping [start, end)
    walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad, include_holes=True,
                    include_nonpresent=True, **walk_budget(src.mem))
    lo = 0 if start is None else start
    hi = 1 << 64 if end is None else end
    lines = [it for it in dump.note_runs(walker.run_table(), fmt)
             if isinstance(it, dump.DumpRun) and it.va < hi and it.va + it.size > lo]
    if args.json:
        return ptdump_json(lines, out)
    out.write(dump.format_runs(lines, fmt.arch))
    return 0

"""``ptlab walk``: the leaf runs, one per line, then anomalies and a summary."""

from __future__ import annotations

import argparse
from typing import IO, Any

from ..formats.base import Format
from ..walk import Walker
from .infer import infer_format, infer_root
from .inputs import Source
from .runs import RunLines, anomaly_json
from .text import level_name, write_chunks
from .walking import _range, walk_budget


def cmd_walk(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad,
                    include_nonpresent=args.include_nonpresent, **walk_budget(src.mem))
    table = walker.run_table(start, end)
    if args.json:
        return walk_json(fmt, walker, table, out)
    n = write_chunks(out, RunLines(fmt).chunks(table.rows()))
    for a in walker.anomalies:
        out.write(f"# anomaly va {a.va:#x} {level_name(fmt, a.level)} entry @{a.entry_pa:#x} "
                  f"= {a.raw:#018x}: {a.reason}\n")
    kept = "" if not walker.anomalies_dropped else f" ({len(walker.anomalies)} listed)"
    out.write(f"# {n} runs, {walker.tables_visited} tables, {walker.anomaly_count} anomalies"
              f"{kept}\n")
    return 0


def walk_json(fmt: Format, walker: Walker, table: Any, out: IO[str]) -> int:
    import json

    n = write_chunks(out, RunLines(fmt).json_chunks(table.rows()))
    for a in walker.anomalies:
        out.write(json.dumps(anomaly_json(a)) + "\n")
    out.write(json.dumps({"runs": n, "tables": walker.tables_visited,
                          "anomalies": walker.anomaly_count}) + "\n")
    return 0

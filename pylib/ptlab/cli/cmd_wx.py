"""``ptlab wx``: the kernel's DEBUG_WX audit."""

from __future__ import annotations

import argparse
from typing import IO, Any

from .. import dump
from ..arch import arch_for
from ..formats.base import Format
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .runs import run_json, run_text
from .walking import _runs, walk_budget


def cmd_wx(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """The kernel's DEBUG_WX verdict (ptlab.dump.check_wx) over the whole root, or W+X runs
    (writable and kernel-executable) of [--start, --end)."""
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    if args.start is None and args.end is None:
        report = dump.check_wx(fmt, src.mem, root, **walk_budget(src.mem))
        if not report.complete:
            raise CliError(f"the W+X walk stopped at its work budget (garbage or cyclic "
                           f"tables?) after {len(report.runs)} W+X run(s): no verdict")
        _wx_out(fmt, report.runs, report.message, not report.passed, args.json, out)
        return 0 if report.passed else 1
    runs, _ = _runs(src, args, fmt, root)
    bad = dump.wx_runs(runs)
    count = arch_for(fmt).wx_count(bad, fmt.table_bytes)
    _wx_out(fmt, bad, arch_for(fmt).wx_message(count), bool(bad), args.json, out)
    return 1 if bad else 0


def _wx_out(fmt: Format, runs: list[Any], message: str, failed: bool, as_json: bool,
            out: IO[str]) -> None:
    """W+X runs, one line (or JSON object) each, then the verdict."""
    import json

    for r in runs:
        out.write((json.dumps({"wx": run_json(fmt, r)}) if as_json
                   else "W+X " + run_text(fmt, r)) + "\n")
    out.write((json.dumps({"verdict": message, "passed": not failed}) if as_json
               else message) + "\n")

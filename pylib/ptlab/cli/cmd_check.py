"""``ptlab check``: the security rules of :mod:`ptlab.check`."""

from __future__ import annotations

import argparse
from typing import IO

from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .numbers import parse_int
from .runs import run_text
from .text import attrs_text
from .walking import walk_budget


def cmd_check(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.check.check`: one line (or JSON object) per finding, a ``#`` summary;
    status 1 when anything is found."""
    import json

    from ..check import check

    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    user_root = None
    if args.user_root is not None:
        user_root = parse_int(args.user_root, "user root PA")
        if user_root % fmt.table_bytes or not src.mem.contains(user_root, fmt.table_bytes):
            raise CliError(f"user root {user_root:#x} is not a table-aligned PA inside the "
                           f"memory of {src.path}")
    vmci = src.vmcoreinfo
    stext = vmci.symbol("_stext") if vmci is not None and vmci.has("SYMBOL", "_stext") else None
    report = check(fmt, src.mem, root, stext=stext, user_root=user_root,
                   **walk_budget(src.mem))
    if not report.complete:
        raise CliError("a walk stopped at its work budget (garbage or cyclic tables?): no "
                       "verdict")
    lines = []
    for f in report.findings:
        if args.json:
            lines.append(json.dumps({**f.as_dict(), "attrs": attrs_text(f.run.attrs)}))
        else:
            lines.append(f"{f.rule:<13} {run_text(fmt, f.run)}  root {f.root:#x}: {f.why}")
    if lines:
        out.write("\n".join(lines) + "\n")
    if not args.json:
        text = (f"text {report.text[0]:#x}-{report.text[1]:#x}" if report.text
                else "text not found")
        user = (f"{report.user_root[1]} at {report.user_root[0]:#x}" if report.user_root
                else "no user-side root")
        out.write(f"# {len(report.findings)} finding(s); root {root:#x}, {text}, {user}\n")
    return 1 if report.findings else 0

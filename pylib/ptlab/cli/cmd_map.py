"""``ptlab map``: an SVG picture of the address space."""

from __future__ import annotations

import argparse
from typing import IO

from ..walk import Walker
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .walking import _range, walk_budget


def cmd_map(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.svgmap.render` of the root's runs into ``--svg FILE``."""
    from ..svgmap import render

    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    runs = list(Walker(fmt, src.mem, root, **walk_budget(src.mem)).runs(start, end))
    if not runs:
        raise CliError(f"root {root:#x} maps nothing in the range: no picture")
    text = render(fmt, runs, f"{src.path}: {fmt.name} root {root:#x}, {len(runs)} runs")
    try:
        with open(args.svg, "x", encoding="ascii") as f:
            f.write(text)
    except FileExistsError:
        raise CliError(f"{args.svg} exists: not overwriting it") from None
    out.write(f"# {args.svg}: {len(runs)} runs\n")
    return 0

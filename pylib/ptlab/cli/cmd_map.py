"""``ptlab map``: an SVG picture of the address space."""

from __future__ import annotations

import argparse
import os
from typing import IO

from ..walk import Walker
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .walking import _range, walk_budget


def cmd_map(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """The picture of the root's runs (:mod:`ptlab.svgmap`) into ``--svg`` and/or ``--png``."""
    from ..svgmap import layout, png, render

    if args.svg is None and args.png is None:
        raise CliError("give --svg FILE and/or --png FILE")
    if args.svg is not None and args.svg == args.png:
        raise CliError("--svg and --png name the same file")
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    runs = list(Walker(fmt, src.mem, root, **walk_budget(src.mem)).runs(start, end))
    if not runs:
        raise CliError(f"root {root:#x} maps nothing in the range: no picture")
    title = f"{src.path}: {fmt.name} root {root:#x}, {len(runs)} runs"
    files: list[tuple[str, bytes]] = []
    if args.svg is not None:
        files.append((args.svg, render(fmt, runs, title).encode("ascii", "xmlcharrefreplace")))
    if args.png is not None:
        files.append((args.png, png(*layout(fmt, runs, title))))
    for name in (n for n, _ in files):
        if os.path.lexists(name):
            raise CliError(f"{name} exists: not overwriting it")
    for name, data in files:
        try:
            with open(name, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise CliError(f"{name} exists: not overwriting it") from None
        except OSError as e:
            raise CliError(f"cannot write {name}: {e.strerror}") from None
        out.write(f"# {name}: {len(runs)} runs\n")
    return 0

"""``ptlab search``: a byte pattern found through the tables."""

from __future__ import annotations

import argparse
from typing import IO

from ..walk import Walker
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .numbers import parse_int
from .text import attrs_text, size_text
from .walking import _range, walk_budget


def parse_pattern(args: argparse.Namespace) -> bytes:
    if (args.pattern is None) == (args.string is None):
        raise CliError("give a HEX pattern or --string TEXT (one of them)")
    if args.string is not None:
        if not args.string:
            raise CliError("--string is empty")
        return args.string.encode()
    text = args.pattern.replace(" ", "").replace(":", "").lower().removeprefix("0x")
    if not text or len(text) % 2 or not text.isascii():
        raise CliError(f"bad pattern {args.pattern!r}: want an even number of hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CliError(f"bad pattern {args.pattern!r}: want hex digits") from None


def cmd_search(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.search.search` over the leaf runs of [--start, --end)."""
    import json

    from ..search import search

    needle = parse_pattern(args)
    limit = parse_int(args.max, "--max")
    if limit < 1:
        raise CliError("--max must be at least 1")
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    walker = Walker(fmt, src.mem, root, **walk_budget(src.mem))
    hits, more = search(src.mem, walker.run_table(start, end), needle, limit)
    lines = []
    for h in hits:
        if args.json:
            lines.append(json.dumps({"va": f"{h.va:#x}", "pa": f"{h.pa:#x}",
                                     "page_size": h.page_size,
                                     "attrs": attrs_text(h.attrs)}))
        else:
            lines.append(f"{h.va:#018x}  pa {h.pa:#014x}  {size_text(h.page_size):<4} "
                         f"{attrs_text(h.attrs)}")
    if lines:
        out.write("\n".join(lines) + "\n")
    if not args.json:
        out.write(f"# {len(hits)} hit(s){' (more left out: --max)' if more else ''}\n")
    return 0 if hits else 1

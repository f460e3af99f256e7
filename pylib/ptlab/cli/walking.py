"""The walk a command asks for: its VA range (``--start``/``--end``) and the walker's work
budget."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from ..formats.base import Format
from ..memory import PhysMemory
from ..walk import Walker
from .errors import CliError
from .inputs import Source
from .numbers import parse_int, parse_va
from .text import _ranges_text

MAX_WALK_WORK = 1 << 28  # the walker's work budget at most (garbage stops within ~10 s)


def walk_budget(mem: PhysMemory) -> dict[str, int]:
    """The walker's work budget for ``mem``: the default plus 2 units per 4K page of the
    memory, so a real machine's tables are walked whole (a 64 GiB arm64 linear map in 4K
    pages is 16 M PTEs, more than the default holds), at most :data:`MAX_WALK_WORK`."""
    from ..walk.walker import DEFAULT_MAX_WORK

    size = sum(e - s for s, e in mem.ranges())
    return {"max_work": min(MAX_WALK_WORK, DEFAULT_MAX_WORK + 2 * (size >> 12))}


def _range(args: argparse.Namespace, fmt: Format) -> tuple[int | None, int | None]:
    start = parse_va(args.start) if args.start is not None else None
    end = parse_int(args.end, "end VA") if args.end is not None else None
    if end is not None and end > 1 << 64:
        raise CliError(f"end VA {args.end!r} is beyond 2**64")
    if end == 0:
        raise CliError("empty range: --end 0")
    if start is not None and not fmt.covers(start):
        raise CliError(f"start VA {start:#x} is outside {fmt.name} ({_ranges_text(fmt)})")
    if start is not None and end is not None and end <= start:
        raise CliError(f"empty range: end {end:#x} <= start {start:#x}")
    return start, end


def _runs(src: Source, args: argparse.Namespace, fmt: Format, root: int,
          include_nonpresent: bool = False) -> tuple[Iterator[Any], Any]:
    start, end = _range(args, fmt)
    walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad,
                    include_nonpresent=include_nonpresent, **walk_budget(src.mem))
    return walker.runs(start, end), walker

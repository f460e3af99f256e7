"""``ptlab translate``: one VA traced level by level, or many in one batch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import IO

from ..formats.base import Format, Kind
from ..memory.raw import open_regular
from ..walk import translate
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .numbers import parse_va
from .text import _ranges_text, attrs_text, level_name, size_text


def read_vas(args: argparse.Namespace) -> list[int]:
    """VAs from the arguments, ``--file FILE`` and ``-`` (stdin), in that order; blank lines
    and ``#`` comments in files are skipped."""
    vas: list[int] = []
    sources = [a for a in args.va if a == "-"]
    if len(sources) > 1 or (sources and args.file == "-"):
        raise CliError("stdin ('-') given twice")
    for a in args.va:
        if a != "-":
            vas.append(parse_va(a))
    for name in ([args.file] if args.file is not None else []) + sources:
        if name == "-":
            vas += _vas_from_lines(sys.stdin, "stdin")
            continue
        fd, size = open_regular(name, "VA file")
        with os.fdopen(fd, "r", encoding="ascii", errors="replace") as f:
            vas += _vas_from_lines(f, name)
    if not vas:
        raise CliError("no VA given")
    return vas


def _vas_from_lines(lines: Iterator[str] | IO[str], where: str) -> list[int]:
    vas = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                vas.append(parse_va(text))
            except CliError as e:
                raise CliError(f"{where} line {n}: {e}") from None
    return vas


def cmd_translate(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    vas = read_vas(args)
    if len(vas) > 1 or args.file is not None or "-" in args.va or args.json:
        return translate_batch(src, args, fmt, vas, out)
    va = vas[0]
    if not fmt.covers(va):
        raise CliError(f"VA {va:#x} is outside {fmt.name} ({_ranges_text(fmt)})")
    root = infer_root(src, args, fmt)
    tr = translate(fmt, src.mem, root, va)
    w = out.write
    w(f"VA {va:#018x}  format {fmt.name}  root {root:#x}\n")
    for s in tr.steps:
        e = s.entry
        kind = Kind(e.kind).name
        target = f" -> {e.oa:#x}" if e.kind != Kind.EMPTY else ""
        w(f"  {level_name(fmt, s.level):<4} table {s.table_pa:#x}[{s.index:>3}] "
          f"@{s.entry_pa:#x} = {s.raw:#018x}  {kind}{target}"
          + (f"  {attrs_text(e.attrs)}" if e.kind != Kind.EMPTY else "") + "\n")
    if tr.fault is None and tr.pa is not None:
        w(f"=> PA {tr.pa:#x}  ({size_text(tr.page_size or 0)} page at "
          f"{level_name(fmt, tr.level)})  {attrs_text(tr.attrs)}\n")
        return 0
    w(f"=> fault: {tr.fault}\n")
    return 1


def translate_batch(src: Source, args: argparse.Namespace, fmt: Format, vas: list[int],
                    out: IO[str]) -> int:
    """Every VA through :func:`ptlab.vtop.translate_many`: one line (or JSON object) each;
    status 1 when any VA is not mapped."""
    import json

    import numpy as np

    from ..vtop import translate_many

    root = infer_root(src, args, fmt)
    b = translate_many(fmt, src.mem, root, np.array(vas, dtype=np.uint64))
    names = {lv: level_name(fmt, lv) for lv in range(fmt.top_level + 1)}
    attr_text = [attrs_text(a) for a in b.attr_table]
    pas, sizes, levels = b.pa.tolist(), b.page_size.tolist(), b.level.tolist()
    attrs, faults = b.attrs.tolist(), b.fault.tolist()
    lines = []
    for i, va in enumerate(vas):
        lv, f = levels[i], b.faults[faults[i]]
        if args.json:
            leaf = lv >= 0
            lines.append(json.dumps({
                "va": f"{va:#x}", "pa": f"{pas[i]:#x}" if leaf else None,
                "page_size": sizes[i] if leaf else None, "level": lv if leaf else None,
                "level_name": names[lv] if leaf else None,
                "attrs": attr_text[attrs[i]] if leaf else None, "fault": f}))
        elif f is None:
            lines.append(f"{va:#018x} -> {pas[i]:#x}  {size_text(sizes[i])} {names[lv]}  "
                         f"{attr_text[attrs[i]]}")
        else:
            lines.append(f"{va:#018x} fault: {f}")
    out.write("\n".join(lines) + "\n")
    return 0 if not any(faults) else 1

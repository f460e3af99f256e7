"""``ptlab disasm``: instructions at a VA, read through the tables."""

from __future__ import annotations

import argparse
from typing import IO

from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .numbers import parse_int, parse_va
from .text import _ranges_text, attrs_text, write_lines


def cmd_disasm(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.disasm.disassemble`: a header with the mapping's permissions, then one
    line (or JSON object) per instruction."""
    import json

    from ..disasm import DisasmError, disassemble

    fmt = infer_format(src, args)
    va = parse_va(args.va)
    count = parse_int(args.n, "instruction count")
    if not 1 <= count <= 100_000:
        raise CliError(f"instruction count {count} is not in 1..100000")
    if not fmt.covers(va):
        raise CliError(f"VA {va:#x} is outside {fmt.name} ({_ranges_text(fmt)})")
    root = infer_root(src, args, fmt)
    try:
        attrs, insns = disassemble(fmt, src.mem, root, va, count, args.force)
    except DisasmError as e:
        raise CliError(str(e)) from None
    except ImportError:
        raise CliError("disasm needs capstone: pip install 'ptlab[disasm]'") from None
    if args.json:
        write_lines(out, (json.dumps({"va": f"{i.va:#x}", "pa": f"{i.pa:#x}",
                                      "bytes": i.raw.hex(), "mnemonic": i.mnemonic,
                                      "operands": i.operands, "attrs": attrs_text(attrs)})
                          for i in insns))
        return 0
    out.write(f"# {va:#x}: {attrs_text(attrs)}\n")
    write_lines(out, (f"{i.va:#018x}  {i.raw.hex(' '):<32} {i.mnemonic} {i.operands}".rstrip()
                      for i in insns))
    return 0

"""``ptlab``: walk page tables in a memory dump from the command line.

Inputs: ``--dump FILE`` (ELF core, kdump-compressed dump in either layout, or raw image: told
apart by content), or the explicit forms ``--elf CORE`` (QEMU ``dump-guest-memory`` / kdump ELF)
and ``--raw FILE --region PA:OFF:SIZE ...``; optionally ``--vmcoreinfo FILE|scan`` (a text
file, or the kernel's note found in memory). Unless given, the format (``--format``) and root
(``--root``) are inferred: format from the machine + VMCOREINFO and the CPU note's control
registers, root from VMCOREINFO (the kernel's root symbol through ``__pa_symbol``) or the CPU
note's root register, by the rules of :mod:`ptlab.arch` (``ArchOps.format_from``, ``kernel_root``).

Subcommands: ``info``, ``translate VA...``, ``walk [--start VA] [--end VA]``, ``ptdump``, ``wx``,
``check``, ``diff [B] [--root-b PA]``, ``search HEX|--string TEXT``, ``disasm VA [N]``,
``kaslr``, ``map --svg FILE``; each with ``--json`` (but ``map``). Bad input prints one
``ptlab: error: ...`` line on stderr and exits 2. Findings exit 1: ``translate`` when a VA is
not mapped, ``wx``/``check`` when something is found, ``diff`` on differences, ``search``
when nothing is found, ``kaslr`` when VMCOREINFO disagrees.

A live QEMU: ``--qmp SOCKET`` (:mod:`ptlab.memory.qmp_live`; stopped while ptlab reads, said on
stderr, resumed after). ``--user-root`` (walk, ptdump, translate, wx) takes the user-side root
next to the kernel root (``ArchOps.user_root``). On a terminal, a command running over a second
shows a progress line on stderr (:mod:`.progress`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO

from ..memory import MemoryError_
from ..memory.raw import FileChanged
from .args import build_parser
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import SCAN_LIMIT, Source, dump_kind, load_vmcoreinfo, open_input
from .numbers import parse_int, parse_region, parse_va
from .progress import Progress, wanted
from .runs import RunLines, anomaly_json, run_json, run_text
from .text import attrs_text, level_name, one_line, size_text, write_lines
from .walking import MAX_WALK_WORK, walk_budget

__all__ = [
    "COMMANDS", "MAX_WALK_WORK", "SCAN_LIMIT", "CliError", "RunLines", "Source", "anomaly_json",
    "attrs_text", "build_parser", "command", "dump_kind", "infer_format", "infer_root",
    "level_name", "load_vmcoreinfo", "main", "one_line", "open_input", "parse_int",
    "parse_region", "parse_va", "run_json", "run_text", "size_text", "walk_budget",
    "write_lines",
]


# subcommand -> its function, in module cmd_<name> (imported when the command runs: a walk
# does not pay for capstone, the diff engine or the SVG writer)
COMMANDS = ("check", "diff", "disasm", "info", "kaslr", "map", "search", "translate", "walk",
            "ptdump", "wx")


def command(name: str) -> Callable[..., int]:
    """The function of subcommand ``name`` (``cmd_<name>`` of module ``cmd_<name>``)."""
    module = importlib.import_module(f"{__name__}.cmd_{name}")
    return getattr(module, f"cmd_{name}")  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None,
         err: IO[str] | None = None) -> int:
    """Run ``ptlab`` with ``argv``; returns the exit status (0 ok, 1 finding, 2 bad input)."""
    out = out or sys.stdout
    err = err or sys.stderr
    src: Source | None = None
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        src = open_input(args, err)
        progress = Progress(src.mem, err, args.cmd) if wanted(err) else None
        try:
            status = command(args.cmd)(src, args, out)
        finally:
            if progress is not None:
                progress.stop()
        missed = getattr(src.mem, "not_in_dump", 0)
        if missed:  # ptdump and wx keep the kernel's output format: say it on stderr
            err.write(f"ptlab: warning: {missed} read(s) of pages not in dump (first at PA "
                      f"{src.mem.first_not_in_dump:#x}); the output covers only what the dump "
                      "holds\n")
        return status
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except BrokenPipeError:  # `ptlab walk | head`
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 0
    except KeyboardInterrupt:
        return 130
    except (CliError, MemoryError_, OSError, ValueError, FileChanged) as e:
        # FormatError is a ValueError; FileChanged: the dump shrank while being read
        err.write(f"ptlab: error: {one_line(str(e))}\n")
        return 2
    finally:
        if src is not None:
            src.mem.close()


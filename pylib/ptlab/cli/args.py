"""The ``ptlab`` argument parser: the input options and every subcommand's arguments."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .errors import CliError
from .inputs import SCAN_LIMIT


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def _add_input_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("input")
    g.add_argument("--dump", metavar="FILE", default=d,
                   help="a dump of any kind ptlab reads, recognised by content: ELF core, "
                   "kdump-compressed (plain or flattened), else a raw image")
    g.add_argument("--elf", metavar="CORE", default=d, help="ELF core (QEMU dump / kdump)")
    g.add_argument("--raw", metavar="FILE", default=d, help="raw physical-memory image")
    g.add_argument("--qmp", metavar="SOCKET", default=d,
                   help="a live QEMU's QMP unix socket: registers over HMP, RAM mmapped where "
                   "it is a shared file backend, else read by pmemsave; the guest is stopped "
                   "while ptlab reads and resumed afterwards")
    g.add_argument("--qmp-copy", action="store_true",
                   default=argparse.SUPPRESS if suppress else False,
                   help="with --qmp: read RAM through pmemsave even where it could be mapped")
    g.add_argument("--qmp-timeout", metavar="SECONDS", default=d,
                   help="with --qmp: how long to wait for each QMP answer (default 5; a "
                   "socket another client holds never greets)")
    g.add_argument("--region", metavar="PA:OFF:SIZE", action="append", default=d,
                   help="raw image region (repeatable); default: whole file at PA 0")
    g.add_argument("--format", metavar="NAME", default=d, help="page-table format name")
    g.add_argument("--root", metavar="PA", default=d, help="PA of the top-level table")
    g.add_argument("--vmcoreinfo", metavar="FILE|scan", default=d,
                   help="VMCOREINFO text file, or 'scan' memory for the kernel's note "
                   f"(its first {SCAN_LIMIT >> 30} GiB)")
    g.add_argument("--cpu", metavar="N", default=d,
                   help="take the root from this CPU's CR3 note or live registers "
                   "(default: VMCOREINFO, else CPU 0)")


def _add_user_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-root", dest="user_root_side", action="store_true",
                   help="walk the user-side root next to the kernel root instead: the x86 PTI "
                   "user PGD (kernel PGD + 0x1000), the arm64 KPTI tramp_pg_dir "
                   "(swapper_pg_dir - 0x2000)")


def _add_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", metavar="VA", help="first VA (default: all of the format)")
    p.add_argument("--end", metavar="VA", help="end VA, exclusive")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ptlab", description="Walk page tables in a memory dump.")
    _add_input_options(p, suppress=False)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _add_input_options(sp, suppress=True)
        return sp

    i = cmd("info", "summarise the input: machine, loads, notes, VMCOREINFO, inferred format/root")
    i.add_argument("--json", action="store_true", help="one JSON object")
    t = cmd("translate", "translate VAs: one VA prints the entry at every level; many (from "
            "arguments, --file or stdin '-') go through one batch, one line each")
    t.add_argument("va", metavar="VA", nargs="*", help="VAs ('-': read them from stdin)")
    _add_user_root(t)
    t.add_argument("--file", metavar="FILE", help="read VAs from FILE, one per line ('-': stdin)")
    t.add_argument("--json", action="store_true",
                   help='one JSON object per VA and line: {"va", "pa", "page_size", "level", '
                   '"level_name", "attrs", "fault"}')
    for name, help in (("walk", "print leaf runs, one per line"),
                       ("ptdump", "print the kernel's debugfs page-table dump text"),
                       ("wx", "audit for writable+executable mappings (the kernel's DEBUG_WX)")):
        w = cmd(name, help)
        _add_range(w)
        _add_user_root(w)
        w.add_argument("--ignore-ad", action="store_true",
                       help="coalesce runs regardless of accessed/dirty bits")
        if name == "walk":
            w.add_argument("--include-nonpresent", action="store_true",
                           help="also list non-present leaves (e.g. L1TF-inverted entries)")
        w.add_argument("--json", action="store_true",
                       help="one JSON object per line (a run, an anomaly, the summary)")
    d = cmd("diff", "compare two dumps (B) or two roots of one (--root-b) as runs: added, "
            "removed, changed permissions, splits and merges, by region; exit 1 on differences")
    d.add_argument("b", metavar="B", nargs="?", help="the second dump (default: the same input)")
    d.add_argument("--root-b", metavar="PA", help="root of the second side")
    _add_range(d)
    d.add_argument("--ignore-ad", action="store_true", help="ignore accessed/dirty bits")
    d.add_argument("--compare-pa", action="store_true",
                   help="a range mapping other physical addresses is a change too")
    d.add_argument("--json", action="store_true", help="one JSON object per change and line")
    se = cmd("search", "find a byte pattern through the tables: each hit at every VA mapping "
             "it, with its PA; exit 1 when nothing is found")
    se.add_argument("pattern", metavar="HEX", nargs="?", help="bytes in hex ('de ad be ef')")
    se.add_argument("--string", metavar="TEXT", help="search for TEXT (UTF-8) instead")
    _add_range(se)
    se.add_argument("--max", metavar="N", default="1000", help="report at most N hits")
    se.add_argument("--json", action="store_true", help="one JSON object per hit and line")
    da = cmd("disasm", "disassemble N instructions at VA (capstone), through the tables; "
             "refuses a non-executable mapping unless --force")
    da.add_argument("va", metavar="VA")
    da.add_argument("n", metavar="N", nargs="?", default="16", help="instructions (default 16)")
    da.add_argument("--force", action="store_true", help="disassemble a non-executable mapping")
    da.add_argument("--json", action="store_true", help="one JSON object per instruction")
    k = cmd("kaslr", "the kernel's virtual and physical base (KASLR displacement) from the "
            "page tables alone, checked against VMCOREINFO's KERNELOFFSET when there is one")
    k.add_argument("--json", action="store_true", help="one JSON object")
    mp = cmd("map", "draw the address space: one row per region, runs coloured by "
             "permission, the page-size mix")
    mp.add_argument("--svg", metavar="FILE", help="write the picture here as SVG")
    mp.add_argument("--png", metavar="FILE", help="write the same picture here as PNG")
    mp.add_argument("--start", metavar="VA", help="first VA (default: all of the format)")
    mp.add_argument("--end", metavar="VA", help="end VA, exclusive")
    c = cmd("check", "security rules: W+X, kernel text writable, data executable, kernel "
            "pages user mode reaches, arm64 pages without UXN, the PTI user PGD / KPTI "
            "trampoline table mapping more than the entry code needs; exit 1 on findings")
    c.add_argument("--user-root", metavar="PA",
                   help="the user-side root to check (default: found next to the kernel root)")
    c.add_argument("--json", action="store_true", help="one JSON object per finding and line")
    return p

"""``ptlab``: walk page tables in a memory dump from the command line.

Inputs: ``--dump FILE`` (ELF core, kdump-compressed dump in either layout, or raw image: told
apart by content), or the explicit forms ``--elf CORE`` (QEMU ``dump-guest-memory`` / kdump ELF)
and ``--raw FILE --region PA:OFF:SIZE ...``; optionally ``--vmcoreinfo FILE|scan`` (a text
file, or the kernel's note found in memory). Unless given, the format (``--format``) and root
(``--root``) are inferred: format from the machine + VMCOREINFO and the CPU note's control
registers, root from VMCOREINFO (the kernel's root symbol through ``__pa_symbol``) or the CPU
note's root register, by the rules of :mod:`ptlab.arch` (``ArchOps.format_from``, ``kernel_root``).

Subcommands: ``info``, ``translate VA...``, ``walk [--start VA] [--end VA]``, ``ptdump``, ``wx``.
Bad input prints one ``ptlab: error: ...`` line on stderr and exits 2. ``translate`` exits 1
when the VA is not mapped; ``wx`` exits 1 when W+X mappings are found.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from . import dump
from .arch import ArchError, all_arches, arch_for, kernel_root
from .formats.base import Attrs, Format, Kind
from .memory import ElfCore, MemoryError_, PhysMemory, RawImage, VmcoreInfo
from .memory.kdump import KdumpCompressed, is_kdump
from .memory.raw import FileChanged, ImageError, open_regular, pread_exact
from .memory.vmcoreinfo import MAX_NOTE, find_vmcoreinfo
from .walk import Walker, translate

U64 = (1 << 64) - 1
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SCAN_LIMIT = 8 << 30  # bytes `--vmcoreinfo scan` reads at most (from the lowest PA up)


class CliError(Exception):
    """Bad input: reported as one ``ptlab: error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


# --- argument parsing -------------------------------------------------------------------------
def parse_int(text: str, what: str = "number") -> int:
    """Decimal or 0x/0o/0b-prefixed integer (underscores allowed), optional K/M/G/T suffix."""
    t = text.strip().replace("_", "").lower()
    if not t.isascii():  # int() would take Arabic-Indic, fullwidth, ... digits
        raise CliError(f"bad {what} {text!r} (use ASCII decimal or 0x-prefixed hex)")
    mult = 1
    if t and t[-1] in _SUFFIX and not t.startswith("0x"):
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        value = int(t, 0) * mult
    except ValueError:
        raise CliError(f"bad {what} {text!r} (use decimal or 0x-prefixed hex)") from None
    if value < 0:
        raise CliError(f"bad {what} {text!r}: negative")
    return value


def parse_va(text: str) -> int:
    v = parse_int(text, "VA")
    if v > U64:
        raise CliError(f"VA {text!r} does not fit in 64 bits")
    return v


def parse_region(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise CliError(f"bad region {text!r}: want PA:FILE_OFFSET:SIZE")
    pa, off, size = (parse_int(p, f"{name} in region {text!r}:")
                     for p, name in zip(parts, ("PA", "file offset", "size"), strict=True))
    return pa, off, size


def _add_input_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("input")
    g.add_argument("--dump", metavar="FILE", default=d,
                   help="a dump of any kind ptlab reads, recognised by content: ELF core, "
                   "kdump-compressed (plain or flattened), else a raw image")
    g.add_argument("--elf", metavar="CORE", default=d, help="ELF core (QEMU dump / kdump)")
    g.add_argument("--raw", metavar="FILE", default=d, help="raw physical-memory image")
    g.add_argument("--region", metavar="PA:OFF:SIZE", action="append", default=d,
                   help="raw image region (repeatable); default: whole file at PA 0")
    g.add_argument("--format", metavar="NAME", default=d, help="page-table format name")
    g.add_argument("--root", metavar="PA", default=d, help="PA of the top-level table")
    g.add_argument("--vmcoreinfo", metavar="FILE|scan", default=d,
                   help="VMCOREINFO text file, or 'scan' memory for the kernel's note "
                   f"(its first {SCAN_LIMIT >> 30} GiB)")
    g.add_argument("--cpu", metavar="N", default=d,
                   help="take the root from this CPU's CR3 note (default: VMCOREINFO, else CPU 0)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ptlab", description="Walk page tables in a memory dump.")
    _add_input_options(p, suppress=False)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        _add_input_options(sp, suppress=True)
        return sp

    cmd("info", "summarise the input: machine, loads, notes, VMCOREINFO, inferred format/root")
    t = cmd("translate", "translate VAs: one VA prints the entry at every level; many (from "
            "arguments, --file or stdin '-') go through one batch, one line each")
    t.add_argument("va", metavar="VA", nargs="*", help="VAs ('-': read them from stdin)")
    t.add_argument("--file", metavar="FILE", help="read VAs from FILE, one per line ('-': stdin)")
    t.add_argument("--json", action="store_true",
                   help='one JSON object per VA and line: {"va", "pa", "page_size", "level", '
                   '"level_name", "attrs", "fault"}')
    for name, help in (("walk", "print leaf runs, one per line"),
                       ("ptdump", "print the kernel's debugfs page-table dump text"),
                       ("wx", "audit for writable+executable mappings (the kernel's DEBUG_WX)")):
        w = cmd(name, help)
        w.add_argument("--start", metavar="VA", help="first VA (default: all of the format)")
        w.add_argument("--end", metavar="VA", help="end VA, exclusive")
        w.add_argument("--ignore-ad", action="store_true",
                       help="coalesce runs regardless of accessed/dirty bits")
        if name == "walk":
            w.add_argument("--include-nonpresent", action="store_true",
                           help="also list non-present leaves (e.g. L1TF-inverted entries)")
    return p


# --- inputs -----------------------------------------------------------------------------------
@dataclass
class Source:
    """The opened input and what it says about itself."""

    mem: PhysMemory
    kind: str  # "elf" | "kdump" | "raw"
    path: str
    core: ElfCore | KdumpCompressed | None = None  # a dump that describes its machine
    vmcoreinfo: VmcoreInfo | None = None  # --vmcoreinfo, else the core's note
    notes: list[str] = field(default_factory=list)  # how format/root were chosen

    @property
    def machine(self) -> str | None:
        if self.core is not None:
            return self.core.machine
        return self.vmcoreinfo.arch if self.vmcoreinfo is not None else None


def open_input(args: argparse.Namespace) -> Source:
    for opt in ("dump", "elf", "raw", "format", "vmcoreinfo"):
        if getattr(args, opt, None) == "":
            raise CliError(f"--{opt} is empty")
    given = [opt for opt in ("dump", "elf", "raw") if getattr(args, opt) is not None]
    if len(given) > 1:
        raise CliError("give only one of --dump, --elf, --raw, not both "
                       + " and ".join(f"--{g}" for g in given))
    if not given:
        raise CliError("no input: give --dump FILE (or --elf CORE, --raw FILE)")
    path = getattr(args, given[0])
    kind = dump_kind(path) if given[0] == "dump" else given[0]
    if args.region and kind != "raw":
        raise CliError(f"--region applies to raw images, not to {path} ({kind})")
    if kind == "elf":
        core: ElfCore | KdumpCompressed = ElfCore(path)
    elif kind == "kdump":
        core = KdumpCompressed(path)
    else:
        regions = [parse_region(r) for r in args.region] if args.region else None
        return _with_vmcoreinfo(Source(RawImage(path, regions), "raw", path), args)
    return _with_vmcoreinfo(Source(core, kind, path, core, core.vmcoreinfo), args)


def dump_kind(path: str) -> str:
    """"elf", "kdump" or "raw": what the file holds, by its first bytes."""
    fd, size = open_regular(path)
    try:
        head = pread_exact(fd, min(size, 16), 0, path)
    finally:
        os.close(fd)
    if not head:
        raise CliError(f"{path} is empty")
    if head.startswith(b"\x7fELF"):
        return "elf"
    return "kdump" if is_kdump(head) else "raw"


def _with_vmcoreinfo(src: Source, args: argparse.Namespace) -> Source:
    try:
        if args.vmcoreinfo is not None:
            src.vmcoreinfo = load_vmcoreinfo(args.vmcoreinfo, src)
    except BaseException:
        src.mem.close()
        raise
    return src


def load_vmcoreinfo(spec: str, src: Source) -> VmcoreInfo:
    """``--vmcoreinfo``: a text file, or ``scan`` to find the kernel's note in memory."""
    if spec == "scan":
        limit = min(SCAN_LIMIT, getattr(src.mem, "scan_limit", SCAN_LIMIT))
        found = find_vmcoreinfo(src.mem, limit=limit)
        if found is None:
            raise CliError(f"no VMCOREINFO note found in the memory of {src.path} (the scan "
                           f"reads at most its first {size_text(limit)}); pass "
                           "--vmcoreinfo FILE")
        src.notes.append(f"VMCOREINFO note found in memory at PA {found[0]:#x}")
        return found[1]
    try:
        fd, size = open_regular(spec, "VMCOREINFO file")
    except ImageError as e:
        raise CliError(str(e).replace("cannot open", "cannot read", 1)) from None
    try:
        vmci = VmcoreInfo(pread_exact(fd, min(size, MAX_NOTE), 0, spec))
    except FileChanged as e:
        raise CliError(f"cannot read VMCOREINFO file {spec}: {e}") from None
    finally:
        os.close(fd)
    if not len(vmci):
        raise CliError(f"{spec} holds no KEY=VALUE lines")
    return vmci


def all_formats() -> list[Format]:
    from .formats import catalog

    return catalog.all_configs()


def format_by_name(name: str) -> Format:
    from .formats import catalog

    try:
        return catalog.by_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None


def _cpu(src: Source, args: argparse.Namespace) -> Any:
    if src.core is None or not src.core.cpus:
        return None
    n = parse_int(args.cpu, "CPU number") if args.cpu is not None else 0
    if n >= len(src.core.cpus):
        raise CliError(f"--cpu {n}: the core has {len(src.core.cpus)} CPU(s)")
    return src.core.cpus[n]


def infer_format(src: Source, args: argparse.Namespace) -> Format:
    """``--format`` or the format the ELF core's machine, VMCOREINFO and CPU notes imply."""
    if args.format is not None:
        fmt = format_by_name(args.format)
        if src.core is not None and src.core.machine not in (None, fmt.arch):
            raise CliError(f"format {fmt.name} is {fmt.arch} but the core is {src.core.machine}")
        if src.vmcoreinfo is not None and src.vmcoreinfo.arch not in (None, fmt.arch):
            raise CliError(f"format {fmt.name} is {fmt.arch} but VMCOREINFO describes "
                           f"{src.vmcoreinfo.arch}")
        src.notes.append(f"format {fmt.name}: from --format")
        return fmt
    machine, vmci = src.machine, src.vmcoreinfo
    if machine is None:
        what = ("with --raw without --vmcoreinfo" if src.core is None else
                f"for {src.path}: it does not say which machine it is from")
        raise CliError(f"--format NAME is required {what} (known: "
                       + ", ".join(f.name for f in all_formats()) + ")")
    cpu = _cpu(src, args)
    regs = cpu.control if cpu is not None else None
    where = f"CPU {cpu.index} note" if cpu is not None else "registers"
    try:
        fmt, why = arch_for(machine).format_from(regs, vmci, where)
    except ArchError as e:
        raise CliError(f"{e}; pass --format") from None
    src.notes.append(f"format {fmt.name}: from {why}")
    return fmt


def infer_root(src: Source, args: argparse.Namespace, fmt: Format) -> int:
    """``--root`` or the root VMCOREINFO (``__pa_symbol``) or the CPU note's CR3 gives."""
    if args.root is not None:
        root = parse_int(args.root, "root PA")
        src.notes.append(f"root {root:#x}: from --root")
    else:
        root, why, ops = None, "", arch_for(fmt)
        if src.vmcoreinfo is not None and args.cpu is None:
            try:
                root, why = kernel_root(ops, src.vmcoreinfo)
            except MemoryError_ as e:
                src.notes.append(f"root: VMCOREINFO unusable ({e})")
        cpu = _cpu(src, args)
        if root is None and cpu is not None and cpu.control:
            try:
                root, why = kernel_root(ops, regs=cpu.control, where=f"CPU {cpu.index}")
            except ArchError as e:
                raise CliError(f"{e}; pass --root") from None
        if root is None:
            raise CliError("cannot infer the root (no usable VMCOREINFO, no CPU root-register "
                           "note); pass --root PA or --vmcoreinfo")
        src.notes.append(f"root {root:#x}: from {why}")
    align = fmt.entries(fmt.top_level) * 8  # a small arm64 root is aligned to its size
    if root & (align - 1) or root >= 1 << fmt.pa_bits:
        raise CliError(f"root {root:#x} is not a {align:#x}-aligned PA below 2**{fmt.pa_bits}")
    if not src.mem.contains(root, 8):
        raise CliError(f"root {root:#x} is outside the memory of {src.path}")
    return root


# --- output helpers ---------------------------------------------------------------------------
def one_line(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (a file name holding a
    newline must not split an error message)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def level_name(fmt: Format, level: int | None) -> str:
    return "?" if level is None else fmt.level_name(level)


def size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def attrs_text(a: Attrs | None) -> str:
    if a is None:
        return "-"
    bits = ["rw" if a.writable else "ro", "user" if a.user else "kern",
            "x" if a.exec else "nx"]
    if a.user:
        bits.append("ux" if a.uexec else "unx")
    bits += [name for name, on in (("global", a.global_), ("accessed", a.accessed),
                                   ("dirty", a.dirty), ("cont", a.contiguous), ("ns", a.ns),
                                   ("dbm", a.dbm)) if on]
    if not a.present:
        bits.insert(0, "NOT-PRESENT")
    for name in ("cache", "sw", "pkey", "shareability"):
        v = getattr(a, name)
        if v:
            bits.append(f"{name}={v}")
    return " ".join(bits)


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


def _ranges_text(fmt: Format) -> str:
    return ", ".join(f"{s:#x}-{e - 1:#x}" for s, e in fmt.va_ranges())


# --- commands ---------------------------------------------------------------------------------
def cmd_info(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    w = out.write
    w(f"file: {src.path} ({src.kind}, {getattr(src.mem, 'file_size', '?')} bytes)\n")
    core = src.core
    if isinstance(core, KdumpCompressed):
        h = core.header
        w(f"machine: {core.machine} (utsname {h.machine!r}, release {h.release!r})\n")
        w(f"kdump: {'flattened ' if h.flattened else ''}{h.signature} version {h.version}, "
          f"{h.compression} pages of {size_text(h.block_size)}, dump level {h.dump_level}, "
          f"max_mapnr {h.max_mapnr:#x}, {core.pages_in_dump} pages in the dump"
          f"{', INCOMPLETE' if h.incomplete else ''}\n")
    if isinstance(core, ElfCore):
        w(f"machine: {core.machine} (e_machine {core.e_machine})\n")
        w(f"loads: {len(core.loads)}\n")
        for ld in core.loads[:64]:
            w(f"  PA {ld.paddr:#014x}-{ld.paddr + ld.memsz:#014x} {size_text(ld.memsz):>6} "
              f"file {ld.offset:#x}+{ld.filesz:#x} vaddr {ld.vaddr:#x}\n")
        if len(core.loads) > 64:
            w(f"  ... {len(core.loads) - 64} more\n")
    if core is not None:
        counts: dict[tuple[str, int], int] = {}
        for n in core.notes:
            counts[(n.name, n.type)] = counts.get((n.name, n.type), 0) + 1
        w("notes: " + ", ".join(f"{k[0]}/{k[1]} x{v}" for k, v in counts.items()) + "\n")
        for cpu in core.cpus:
            regs = [f"{k}={cpu.regs[k]:#x}" for k in ("rip", "pc", "rsp", "sp") if k in cpu.regs]
            if cpu.cr is not None:
                regs += [f"cr0={cpu.cr[0]:#x}", f"cr3={cpu.cr[3]:#x}", f"cr4={cpu.cr[4]:#x}"]
            w(f"cpu {cpu.index}: " + " ".join(regs) + "\n")
    else:
        w("regions: " + ", ".join(f"[{s:#x}, {e:#x})" for s, e in src.mem.ranges()) + "\n")
    vmci = src.vmcoreinfo
    if vmci is None:
        w("vmcoreinfo: none\n")
    else:
        w(f"vmcoreinfo: {len(vmci)} keys, OSRELEASE={vmci.osrelease}\n")
        shown = (*(f"SYMBOL({ops.root_symbol})" for ops in all_arches()), "NUMBER(",
                 "KERNELOFFSET", "PAGESIZE", "OSRELEASE")
        for key in vmci:
            if key.startswith(shown):
                w(f"  {key}={vmci[key]}\n")
    try:
        fmt = infer_format(src, args)
    except (CliError, MemoryError_) as e:
        w(f"format: unknown ({e})\n")
        return 0
    w(f"format: {fmt.name}\n")
    try:
        root = infer_root(src, args, fmt)
        w(f"root: {root:#x}\n")
    except (CliError, MemoryError_) as e:
        w(f"root: unknown ({e})\n")
    for n in src.notes:
        w(f"  ({n})\n")
    return 0


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

    from .vtop import translate_many

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


def _runs(src: Source, args: argparse.Namespace, fmt: Format, root: int,
          include_nonpresent: bool = False) -> tuple[Iterator[Any], Any]:
    start, end = _range(args, fmt)
    walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad,
                    include_nonpresent=include_nonpresent)
    return walker.runs(start, end), walker


def run_text(fmt: Format, r: Any) -> str:
    return (f"{r.va:#018x}-{r.va + r.size:#018x} {size_text(r.size):>6}  pa {r.pa:#014x}  "
            f"{r.count:>6} x {size_text(r.page_size):<4} {level_name(fmt, r.level):<4} "
            f"{attrs_text(r.attrs)}")


def cmd_walk(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    runs, walker = _runs(src, args, fmt, root, args.include_nonpresent)
    n = 0
    for r in runs:
        out.write(run_text(fmt, r) + "\n")
        n += 1
    for a in walker.anomalies:
        out.write(f"# anomaly va {a.va:#x} {level_name(fmt, a.level)} entry @{a.entry_pa:#x} "
                  f"= {a.raw:#018x}: {a.reason}\n")
    kept = "" if not walker.anomalies_dropped else f" ({len(walker.anomalies)} listed)"
    out.write(f"# {n} runs, {walker.tables_visited} tables, {walker.anomaly_count} anomalies"
              f"{kept}\n")
    return 0


def cmd_ptdump(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    start, end = _range(args, fmt)
    if start is None and end is None:
        out.write(dump.dump(fmt, src.mem, root, ignore_ad=args.ignore_ad))
        return 0
    # the kernel's lines depend on the walk from the start (sections, coalescing): render the
    # whole root and keep the lines overlapping [start, end)
    walker = Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad, include_holes=True,
                    include_nonpresent=True)
    lo = 0 if start is None else start
    hi = 1 << 64 if end is None else end
    lines = [it for it in dump.note_runs(walker.runs(), fmt)
             if isinstance(it, dump.DumpRun) and it.va < hi and it.va + it.size > lo]
    out.write(dump.format_runs(lines, fmt.arch))
    return 0


def cmd_wx(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """The kernel's DEBUG_WX verdict (ptlab.dump.check_wx) over the whole root, or W+X runs
    (writable and kernel-executable) of [--start, --end)."""
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    if args.start is None and args.end is None:
        report = dump.check_wx(fmt, src.mem, root)
        for r in report.runs:
            out.write("W+X " + run_text(fmt, r) + "\n")
        if not report.complete:
            raise CliError(f"the W+X walk stopped at its work budget (garbage or cyclic "
                           f"tables?) after {len(report.runs)} W+X run(s): no verdict")
        out.write(report.message + "\n")
        return 0 if report.passed else 1
    runs, _ = _runs(src, args, fmt, root)
    bad = dump.wx_runs(runs)
    for r in bad:
        out.write("W+X " + run_text(fmt, r) + "\n")
    count = arch_for(fmt).wx_count(bad, fmt.table_bytes)
    out.write(arch_for(fmt).wx_message(count) + "\n")
    return 1 if bad else 0


COMMANDS = {"info": cmd_info, "translate": cmd_translate, "walk": cmd_walk,
            "ptdump": cmd_ptdump, "wx": cmd_wx}


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None,
         err: IO[str] | None = None) -> int:
    """Run ``ptlab`` with ``argv``; returns the exit status (0 ok, 1 finding, 2 bad input)."""
    out = out or sys.stdout
    err = err or sys.stderr
    src: Source | None = None
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        src = open_input(args)
        status = COMMANDS[args.cmd](src, args, out)
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


if __name__ == "__main__":
    sys.exit(main())

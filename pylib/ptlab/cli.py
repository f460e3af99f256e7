"""``ptlab``: walk page tables in a memory dump from the command line.

Inputs: ``--elf CORE`` (QEMU ``dump-guest-memory`` / kdump ELF) or ``--raw FILE --region
PA:OFF:SIZE ...``, optionally ``--vmcoreinfo FILE|scan`` (a text file, or the kernel's note
found in memory). Unless given, the format (``--format``) and root (``--root``) are inferred:
format from the machine + VMCOREINFO (x86 ``pgtable_l5_enabled``, arm64 PAGESIZE and
TCR_EL1.T1SZ / VA_BITS) or QEMU's x86 CPU note (CR4.LA57); root from VMCOREINFO
(``init_top_pgt`` / ``swapper_pg_dir`` through ``__pa_symbol``) or the CPU note's CR3.

Subcommands: ``info``, ``translate VA``, ``walk [--start VA] [--end VA]``, ``ptdump``, ``wx``.
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

from .formats.base import Attrs, Format, Kind
from .memory import ElfCore, MemoryError_, PhysMemory, RawImage, VmcoreInfo
from .memory.vmcoreinfo import MAX_NOTE, find_vmcoreinfo

U64 = (1 << 64) - 1
CR3_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12 (PCID/flags and bit 63 dropped)
CR0_PG = 1 << 31
CR4_LA57 = 1 << 12
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_LEVEL_NAMES = ("pte", "pmd", "pud", "p4d", "pgd")


class CliError(Exception):
    """Bad input: reported as one ``ptlab: error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


# --- argument parsing -------------------------------------------------------------------------
def parse_int(text: str, what: str = "number") -> int:
    """Decimal or 0x/0o/0b-prefixed integer (underscores allowed), optional K/M/G/T suffix."""
    t = text.strip().replace("_", "").lower()
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
    g.add_argument("--elf", metavar="CORE", default=d, help="ELF core (QEMU dump / kdump)")
    g.add_argument("--raw", metavar="FILE", default=d, help="raw physical-memory image")
    g.add_argument("--region", metavar="PA:OFF:SIZE", action="append", default=d,
                   help="raw image region (repeatable); default: whole file at PA 0")
    g.add_argument("--format", metavar="NAME", default=d, help="page-table format name")
    g.add_argument("--root", metavar="PA", default=d, help="PA of the top-level table")
    g.add_argument("--vmcoreinfo", metavar="FILE|scan", default=d,
                   help="VMCOREINFO text file, or 'scan' memory for the kernel's note")
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
    t = cmd("translate", "translate one VA, printing the entry at every level")
    t.add_argument("va", metavar="VA")
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
    kind: str  # "elf" | "raw"
    path: str
    core: ElfCore | None = None
    vmcoreinfo: VmcoreInfo | None = None  # --vmcoreinfo, else the core's note
    notes: list[str] = field(default_factory=list)  # how format/root were chosen

    @property
    def machine(self) -> str | None:
        if self.core is not None:
            return self.core.machine
        return self.vmcoreinfo.arch if self.vmcoreinfo is not None else None


def open_input(args: argparse.Namespace) -> Source:
    if args.elf and args.raw:
        raise CliError("give either --elf or --raw, not both")
    if args.elf:
        if args.region:
            raise CliError("--region applies to --raw images, not --elf cores")
        core = ElfCore(args.elf)
        src = Source(core, "elf", args.elf, core, core.vmcoreinfo)
    elif args.raw:
        regions = [parse_region(r) for r in args.region] if args.region else None
        src = Source(RawImage(args.raw, regions), "raw", args.raw)
    else:
        raise CliError("no input: give --elf CORE or --raw FILE")
    try:
        if args.vmcoreinfo:
            src.vmcoreinfo = load_vmcoreinfo(args.vmcoreinfo, src)
    except BaseException:
        src.mem.close()
        raise
    return src


def load_vmcoreinfo(spec: str, src: Source) -> VmcoreInfo:
    """``--vmcoreinfo``: a text file, or ``scan`` to find the kernel's note in memory."""
    if spec == "scan":
        found = find_vmcoreinfo(src.mem)
        if found is None:
            raise CliError(f"no VMCOREINFO note found in the memory of {src.path}")
        src.notes.append(f"VMCOREINFO note found in memory at PA {found[0]:#x}")
        return found[1]
    try:
        with open(spec, "rb") as f:
            vmci = VmcoreInfo(f.read(MAX_NOTE))
    except OSError as e:
        raise CliError(f"cannot read VMCOREINFO file {spec}: {e.strerror}") from None
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
    if args.format:
        fmt = format_by_name(args.format)
        if src.core is not None and src.core.machine != fmt.arch:
            raise CliError(f"format {fmt.name} is {fmt.arch} but the core is {src.core.machine}")
        if src.vmcoreinfo is not None and src.vmcoreinfo.arch not in (None, fmt.arch):
            raise CliError(f"format {fmt.name} is {fmt.arch} but VMCOREINFO describes "
                           f"{src.vmcoreinfo.arch}")
        src.notes.append(f"format {fmt.name}: from --format")
        return fmt
    machine, vmci = src.machine, src.vmcoreinfo
    if machine is None:
        raise CliError("--format NAME is required with --raw without --vmcoreinfo (known: "
                       + ", ".join(f.name for f in all_formats()) + ")")
    candidates = [f for f in all_formats() if f.arch == machine]
    if machine == "x86_64":
        l5 = vmci.pgtable_l5_enabled if vmci is not None else None
        why = "VMCOREINFO pgtable_l5_enabled"
        cpu = _cpu(src, args) if l5 is None else None
        if cpu is not None and cpu.cr4 is not None:
            l5, why = bool(cpu.cr4 & CR4_LA57), f"CPU {cpu.index} note CR4.LA57"
        if l5 is None:
            l5, why = False, "default (no VMCOREINFO or CPU note)"
        levels = 5 if l5 else 4
        found = [f for f in candidates if f.levels == levels]
    else:
        if vmci is None or vmci.kernel_va_bits is None:
            raise CliError("cannot infer the arm64 format without VMCOREINFO (VA_BITS); "
                           "pass --format")
        page, va_bits = vmci.page_size or 4096, vmci.kernel_va_bits
        why = f"VMCOREINFO PAGESIZE={page} VA bits={va_bits}"
        found = [f for f in candidates if f.table_bytes == page and f.va_bits == va_bits]
        found.sort(key=lambda f: not f.upper)  # the kernel root is a TTBR1 (upper) table
    if not found:
        raise CliError(f"no known {machine} format fits ({why}); pass --format")
    src.notes.append(f"format {found[0].name}: from {why}")
    return found[0]


def infer_root(src: Source, args: argparse.Namespace, fmt: Format) -> int:
    """``--root`` or the root VMCOREINFO (``__pa_symbol``) or the CPU note's CR3 gives."""
    if args.root is not None:
        root = parse_int(args.root, "root PA")
        src.notes.append(f"root {root:#x}: from --root")
    else:
        root, why = None, ""
        if src.vmcoreinfo is not None and args.cpu is None:
            try:
                root = src.vmcoreinfo.kernel_root(fmt.arch)
                why = "VMCOREINFO " + ("init_top_pgt" if fmt.arch == "x86_64"
                                       else "swapper_pg_dir")
            except MemoryError_ as e:
                src.notes.append(f"root: VMCOREINFO unusable ({e})")
        cpu = _cpu(src, args)
        if root is None and cpu is not None and cpu.cr3 is not None:
            if not cpu.cr[0] & CR0_PG:
                raise CliError(f"CPU {cpu.index} has paging off (CR0={cpu.cr[0]:#x}); "
                               "pass --root")
            root, why = cpu.cr3 & CR3_ADDR_MASK, f"CPU {cpu.index} CR3 {cpu.cr3:#x}"
            if cpu.cr3 & 0x1000:
                why += " (bit 12 set: under PTI the user PGD, kernel PGD = root - 0x1000)"
        if root is None:
            raise CliError("cannot infer the root (no usable VMCOREINFO, no CPU CR3 note); "
                           "pass --root PA or --vmcoreinfo")
        src.notes.append(f"root {root:#x}: from {why}")
    align = fmt.entries(fmt.top_level) * 8  # a small arm64 root is aligned to its size
    if root & (align - 1) or root >= 1 << fmt.pa_bits:
        raise CliError(f"root {root:#x} is not a {align:#x}-aligned PA below 2**{fmt.pa_bits}")
    if not src.mem.contains(root, 8):
        raise CliError(f"root {root:#x} is outside the memory of {src.path}")
    return root


# --- output helpers ---------------------------------------------------------------------------
def level_name(fmt: Format, level: int | None) -> str:
    if level is None:
        return "?"
    try:
        from .walk import level_name as walk_level_name
    except ImportError:
        return "pgd" if level == fmt.top_level else _LEVEL_NAMES[level]
    return str(walk_level_name(fmt, level))


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


def _walk_module() -> Any:
    try:
        from . import walk
    except ImportError as e:
        raise CliError(f"the walker (ptlab.walk) is not available: {e}") from None
    return walk


def _range(args: argparse.Namespace, fmt: Format) -> tuple[int | None, int | None]:
    start = parse_va(args.start) if args.start else None
    end = parse_int(args.end, "end VA") if args.end else None
    if end is not None and end > 1 << 64:
        raise CliError(f"end VA {args.end!r} is beyond 2**64")
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
    if core is not None:
        w(f"machine: {core.machine} (e_machine {core.e_machine})\n")
        w(f"loads: {len(core.loads)}\n")
        for ld in core.loads[:64]:
            w(f"  PA {ld.paddr:#014x}-{ld.paddr + ld.memsz:#014x} {size_text(ld.memsz):>6} "
              f"file {ld.offset:#x}+{ld.filesz:#x} vaddr {ld.vaddr:#x}\n")
        if len(core.loads) > 64:
            w(f"  ... {len(core.loads) - 64} more\n")
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
        for key in vmci:
            if key.startswith(("SYMBOL(init_top_pgt", "SYMBOL(swapper_pg_dir", "NUMBER(",
                               "KERNELOFFSET", "PAGESIZE", "OSRELEASE")):
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


def cmd_translate(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    va = parse_va(args.va)
    if not fmt.covers(va):
        raise CliError(f"VA {va:#x} is outside {fmt.name} ({_ranges_text(fmt)})")
    root = infer_root(src, args, fmt)
    tr = _walk_module().translate(fmt, src.mem, root, va)
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


def _runs(src: Source, args: argparse.Namespace, fmt: Format, root: int,
          include_nonpresent: bool = False) -> tuple[Iterator[Any], Any]:
    start, end = _range(args, fmt)
    walker = _walk_module().Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad,
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
    out.write(f"# {n} runs, {walker.tables_visited} tables, {len(walker.anomalies)} anomalies\n")
    return 0


def _dump_module() -> Any:
    """ptlab.dump (ptdump text, W+X audit), or None if it is not there."""
    try:
        from . import dump
    except ImportError:
        return None
    return dump


def cmd_ptdump(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    dump = _dump_module()
    if dump is None:
        out.write("# ptlab.dump is not available: plain runs\n")
        for r in _runs(src, args, fmt, root)[0]:
            out.write(run_text(fmt, r) + "\n")
        return 0
    start, end = _range(args, fmt)
    if start is None and end is None:
        out.write(dump.dump(fmt, src.mem, root, ignore_ad=args.ignore_ad))
        return 0
    # the kernel's lines depend on the walk from the start (sections, coalescing): render the
    # whole root and keep the lines overlapping [start, end)
    walker = _walk_module().Walker(fmt, src.mem, root, ignore_ad=args.ignore_ad,
                                   include_holes=True, include_nonpresent=True)
    lo, hi = start or 0, end or 1 << 64
    lines = [it for it in dump.note_runs(walker.runs(), fmt)
             if isinstance(it, dump.DumpRun) and it.va < hi and it.va + it.size > lo]
    out.write(dump.format_runs(lines, fmt.arch))
    return 0


def cmd_wx(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """The kernel's DEBUG_WX verdict (ptlab.dump.check_wx) over the whole root, or W+X runs
    (writable and kernel-executable) of [--start, --end)."""
    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    dump = _dump_module()
    if dump is not None and args.start is None and args.end is None:
        report = dump.check_wx(fmt, src.mem, root)
        for r in report.runs:
            out.write("W+X " + run_text(fmt, r) + "\n")
        out.write(report.message + "\n")
        return 0 if report.passed else 1
    runs, _ = _runs(src, args, fmt, root)
    bad = [r for r in runs if r.attrs.present and r.attrs.writable and r.attrs.exec]
    pages = sum(r.size for r in bad) // fmt.table_bytes
    for r in bad:
        out.write("W+X " + run_text(fmt, r) + "\n")
    if pages:
        out.write(f"Checked W+X mappings: FAILED, {pages} W+X pages found.\n")
        return 1
    out.write("Checked W+X mappings: passed, no W+X pages found.\n")
    return 0


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
        return COMMANDS[args.cmd](src, args, out)
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
    except (CliError, MemoryError_, OSError, ValueError) as e:  # FormatError is a ValueError
        err.write(f"ptlab: error: {e}\n")
        return 2
    finally:
        if src is not None:
            src.mem.close()


if __name__ == "__main__":
    sys.exit(main())

"""The page-table format and root: ``--format``/``--root``, else inferred from the machine,
VMCOREINFO and the CPU notes (the rules of :mod:`ptlab.arch`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..arch import ArchError, arch_for, kernel_root
from ..formats.base import Format
from ..memory import MemoryError_
from .errors import CliError
from .inputs import Source
from .numbers import parse_int


def all_formats() -> list[Format]:
    from ..formats import catalog

    return catalog.all_configs()


def format_by_name(name: str) -> Format:
    from ..formats import catalog

    try:
        return catalog.by_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None


def _cpu(src: Source, args: argparse.Namespace) -> Any:
    if src.core is None or not src.core.cpus:
        return None
    n = parse_int(args.cpu, "CPU number") if args.cpu is not None else 0
    if n >= len(src.core.cpus):
        raise CliError(f"--cpu {n}: {src.path} has {len(src.core.cpus)} CPU(s)")
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
    """``--root`` or the root VMCOREINFO (``__pa_symbol``) or the CPU note's (or live
    CPU's) root register gives; with ``--user-root`` the user-side root next to it
    (``ArchOps.user_root``)."""
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
        if root is None and src.kind == "qmp":
            raise CliError(f"cannot infer the root: QEMU's monitor shows no {src.machine} root "
                           "register (HMP 'info registers' prints no TTBR1 on arm64) and no "
                           "usable VMCOREINFO note is in guest RAM; pass --root PA")
        if root is None:
            raise CliError("cannot infer the root (no usable VMCOREINFO, no CPU root-register "
                           "note); pass --root PA or --vmcoreinfo")
        src.notes.append(f"root {root:#x}: from {why}")
    align = fmt.entries(fmt.top_level) * 8  # a small arm64 root is aligned to its size
    if root & (align - 1) or root >= 1 << fmt.pa_bits:
        raise CliError(f"root {root:#x} is not a {align:#x}-aligned PA below 2**{fmt.pa_bits}")
    if not src.mem.contains(root, 8):
        raise CliError(f"root {root:#x} is outside the memory of {src.path}")
    if getattr(args, "user_root_side", False):
        found = arch_for(fmt).user_root(fmt, src.mem, root)
        if found is None:
            raise CliError(f"no user-side root next to the kernel root {root:#x} (PTI / KPTI "
                           "off, or not a kernel root)")
        root, why = found
        src.notes.append(f"root {root:#x}: --user-root, the {why}")
    return root

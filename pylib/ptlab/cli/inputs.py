"""Opening the input: ``--dump``/``--elf``/``--raw`` (with ``--region``) and
``--vmcoreinfo``, as a :class:`Source`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from ..memory import ElfCore, PhysMemory, RawImage, VmcoreInfo
from ..memory.raw import FileChanged, ImageError, open_regular, pread_exact
from ..memory.vmcoreinfo import MAX_NOTE, find_vmcoreinfo
from .errors import CliError
from .numbers import parse_region
from .text import size_text

if TYPE_CHECKING:  # imported where used: a walk of an ELF dump needs neither
    from ..memory.kdump import KdumpCompressed
    from ..memory.qmp_live import LiveQemu

SCAN_LIMIT = 8 << 30  # bytes `--vmcoreinfo scan` reads at most (from the lowest PA up)


@dataclass
class Source:
    """The opened input and what it says about itself."""

    mem: PhysMemory
    kind: str  # "elf" | "kdump" | "raw" | "qmp"
    path: str
    core: ElfCore | KdumpCompressed | LiveQemu | None = None  # a dump that describes its machine
    vmcoreinfo: VmcoreInfo | None = None  # --vmcoreinfo, else the core's note
    notes: list[str] = field(default_factory=list)  # how format/root were chosen

    @property
    def machine(self) -> str | None:
        if self.core is not None:
            return self.core.machine
        return self.vmcoreinfo.arch if self.vmcoreinfo is not None else None



def _qmp_timeout(args: argparse.Namespace) -> float:
    """``--qmp-timeout`` in seconds (default 5): a positive, finite number."""
    text = getattr(args, "qmp_timeout", None)
    if text is None:
        return 5.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise CliError(f"--qmp-timeout {text}: want seconds, more than 0 and under 3600")
    return value

def open_input(args: argparse.Namespace, err: IO[str] | None = None) -> Source:
    """Open the input ``args`` name; ``err`` hears that a live guest was stopped/resumed."""
    for opt in ("dump", "elf", "raw", "qmp", "format", "vmcoreinfo"):
        if getattr(args, opt, None) == "":
            raise CliError(f"--{opt} is empty")
    given = [opt for opt in ("dump", "elf", "raw", "qmp") if getattr(args, opt) is not None]
    if len(given) > 1:
        raise CliError("give only one of --dump, --elf, --raw, --qmp, not both "
                       + " and ".join(f"--{g}" for g in given))
    if not given:
        raise CliError("no input: give --dump FILE (or --elf CORE, --raw FILE, --qmp SOCKET)")
    path = getattr(args, given[0])
    if getattr(args, "qmp_copy", False) and given[0] != "qmp":
        raise CliError("--qmp-copy applies to --qmp only")
    if getattr(args, "qmp_timeout", None) is not None and given[0] != "qmp":
        raise CliError("--qmp-timeout applies to --qmp only")
    if given[0] == "qmp":
        if args.region:
            raise CliError("--region applies to raw images, not to --qmp")
        from ..memory.qmp_live import attach

        live = attach(path, copy=args.qmp_copy, timeout=_qmp_timeout(args),
                      say=lambda s: (err.write(s + "\n"), err.flush()) if err else None)
        src = Source(live, "qmp", path, live)
        if live.shared:
            src.notes.append("RAM read in place: shared file backend " + ", ".join(live.shared))
        if live.copied:
            src.notes.append("RAM read by QMP pmemsave" + (" (the rest)" if live.shared else
                             " (no shared file backend ptlab can open)"))
        if (args.vmcoreinfo is None and (args.root is None or args.format is None)
                and not any(c.control for c in live.cpus)):
            return _live_vmcoreinfo(src)
        return _with_vmcoreinfo(src, args)
    kind = dump_kind(path) if given[0] == "dump" else given[0]
    if args.region and kind != "raw":
        raise CliError(f"--region applies to raw images, not to {path} ({kind})")
    if kind == "elf":
        core: ElfCore | KdumpCompressed = ElfCore(path)
    elif kind == "kdump":
        from ..memory.kdump import KdumpCompressed

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
    from ..memory.kdump import is_kdump

    return "kdump" if is_kdump(head) else "raw"


def _live_vmcoreinfo(src: Source) -> Source:
    """A live QEMU whose monitor shows no root register (arm64's ``info registers`` has no
    TTBR/TCR): the kernel's own VMCOREINFO note, found in guest RAM as ``--vmcoreinfo scan``
    does, names the format and root; without one the later inference says what to pass."""
    try:
        src.vmcoreinfo = load_vmcoreinfo("scan", src)
    except CliError:
        src.notes.append(f"no root register from QEMU's monitor and no VMCOREINFO note in "
                         f"the first {size_text(SCAN_LIMIT)} of guest RAM")
    except BaseException:
        src.mem.close()
        raise
    else:
        src.notes[-1] += f" (QEMU's monitor shows no {src.machine} root register)"
    return src


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

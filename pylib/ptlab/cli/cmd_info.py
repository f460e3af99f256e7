"""``ptlab info``: what the input is and the format and root inferred for it."""

from __future__ import annotations

import argparse
from typing import IO, Any

from ..arch import all_arches
from ..memory import ElfCore, MemoryError_
from ..memory.kdump import KdumpCompressed
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .text import size_text


def cmd_info(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    if args.json:
        return info_json(src, args, out)
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
    if src.kind == "qmp":
        w(f"machine: {src.machine} (live QEMU)\n")
        w("regions: " + ", ".join(f"[{s:#x}, {e:#x})" for s, e in src.mem.ranges()) + "\n")
        for cpu in getattr(core, "cpus", []):
            w(f"cpu {cpu.index}: " + " ".join(f"{k}={v:#x}" for k, v in cpu.control.items())
              + "\n")
    elif core is not None:
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


def info_json(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """``info --json``: the input's kind, machine, memory ranges, CPUs' control registers,
    VMCOREINFO and the inferred format and root (null with the reason when unknown)."""
    import json

    core = src.core
    obj: dict[str, Any] = {
        "file": src.path, "kind": src.kind, "bytes": getattr(src.mem, "file_size", None),
        "machine": src.machine,
        "ranges": [[f"{s:#x}", f"{e:#x}"] for s, e in src.mem.ranges()[:1024]],
        "cpus": [{"index": c.index, "control": {k: f"{v:#x}" for k, v in
                                                 (c.control or {}).items()}}
                 for c in (core.cpus if core is not None else [])],
        "vmcoreinfo": dict(src.vmcoreinfo.items()) if src.vmcoreinfo is not None else None,
        "format": None, "root": None, "why": None}
    try:
        fmt = infer_format(src, args)
        obj["format"] = fmt.name
        obj["root"] = f"{infer_root(src, args, fmt):#x}"
    except (CliError, MemoryError_) as e:
        obj["why"] = str(e)
    obj["notes"] = src.notes
    out.write(json.dumps(obj) + "\n")
    return 0

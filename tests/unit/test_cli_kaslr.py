"""``ptlab kaslr``: the kernel text's base and KASLR displacement from the tables alone, on
built x86-64 and arm64 kernels displaced by a known offset (module text and a generated-code
page do not confuse it); checked against VMCOREINFO's KERNELOFFSET (exit 1 on disagreement)."""

from __future__ import annotations

import io
import json

import pytest
from ptlab.arch import arch_for
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.memory.elfwrite import cpu_notes, loads_from_sparse, vmcoreinfo_note, write_core
from ptlab.testing import TableBuilder

RAM = 48 << 20


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def kernel(name: str, offset: int, header: int) -> tuple[TableBuilder, int]:
    """Text of 6 MiB at the link-time _text + ``offset`` (+ ``header`` bytes mapped
    non-executable first, as arm64 maps its image header), PA 16 MiB; a module page before
    it and a read-only executable page after it."""
    fmt = by_name(name)
    ops = arch_for(fmt)
    rx = fmt.normalize(ops.page_kernel.with_(writable=False, exec=True))
    ro = fmt.normalize(ops.page_kernel.with_(writable=False))
    b = TableBuilder(fmt, base=0x100_0000 - 0x40_0000)
    text = ops.image_base(fmt) + offset
    if header:
        b.map(text, 0x100_0000, header, ro, level=0)
    b.map(text + header, 0x100_0000 + header, (2 << 20) - header, rx, level=0)
    b.map(text + (2 << 20), 0x120_0000, 4 << 20, rx, level=1)
    b.map(text - (64 << 20), 0x200_0000, 0x1000, rx, level=0)
    b.map(text + (64 << 20), 0x200_1000, 0x1000, rx, level=0)
    return b, text


@pytest.mark.parametrize("name,offset,header", [
    ("x86_64-4level", 0x2600_0000, 0), ("arm64-4k-48", 0x3E6F_0340_0000, 0x1_0000)])
def test_base_and_offset(tmp_path, name, offset, header):
    b, text = kernel(name, offset, header)
    raw = tmp_path / "ram.raw"
    raw.write_bytes(b.mem.read(0, RAM))
    args = ["--raw", str(raw), "--format", name, "--root", hex(b.root), "kaslr"]
    code, out, err = run(*args, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"text": hex(text), "phys": "0x1000000", "offset": hex(offset),
                               "exec": [hex(text + header), hex(text + (6 << 20))],
                               "vmcoreinfo_offset": None, "agree": True}
    machine = arch_for(by_name(name)).name
    for known, status in ((offset, 0), (offset + (2 << 20), 1)):
        core = tmp_path / f"{known:x}.core"
        write_core(core, machine, loads_from_sparse(b.mem, [(0, RAM)]),
                   [*cpu_notes(machine), vmcoreinfo_note(f"KERNELOFFSET={known:x}\n")])
        code, out, err = run("--elf", str(core), "--format", name, "--root", hex(b.root),
                             "kaslr")
        assert code == status and not err
        assert out.splitlines()[-1] == (f"VMCOREINFO KERNELOFFSET={known:x}: "
                                         + ("agrees" if status == 0 else "DISAGREES"))


def test_no_kernel_text(tmp_path):
    fmt = by_name("x86_64-4level")
    b = TableBuilder(fmt, base=0x100_0000)
    b.map(0xFFFF_8880_0000_0000, 0, 1 << 21, fmt.normalize(arch_for(fmt).page_kernel), level=1)
    raw = tmp_path / "ram.raw"
    raw.write_bytes(b.mem.read(0, RAM))
    code, out, err = run("--raw", str(raw), "--format", fmt.name, "--root", hex(b.root),
                         "kaslr")
    assert code == 2 and not out and "no kernel-executable mapping" in err

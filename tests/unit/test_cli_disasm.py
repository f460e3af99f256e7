"""``ptlab disasm``: known instructions planted in built x86-64 and arm64 text decode as
themselves, across a page boundary into the next (differently placed) page; a
non-executable mapping is refused (exit 2) unless --force; --json; bad input exit 2."""

from __future__ import annotations

import io
import json

import pytest
from ptlab.arch import arch_for
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.testing import TableBuilder

RAM = 16 << 20
X86_CODE = bytes.fromhex("90" "4889e5" "c3")  # nop; mov rbp, rsp; ret
ARM_CODE = bytes.fromhex("1f2003d5" "fd030091" "c0035fd6")  # nop; mov x29, sp; ret


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def image(tmp_path, name: str, code: bytes, text: int, data: int):
    fmt = by_name(name)
    rx = fmt.normalize(arch_for(fmt).page_kernel.with_(writable=False, exec=True))
    b = TableBuilder(fmt, base=0x80_0000)
    b.map(text, 0x10_0000, 0x1000, rx, level=0)  # two text pages, not PA-contiguous
    b.map(text + 0x1000, 0x30_0000, 0x1000, rx, level=0)
    b.map(data, 0x20_0000, 0x1000, fmt.normalize(arch_for(fmt).page_kernel), level=0)
    b.mem.write(0x10_0000 + 0x1000 - len(code) + 1, code[:-1])  # the last byte (x86: ret;
    b.mem.write(0x30_0000, code[-1:])  # arm64: ret's last byte) on the next page
    b.mem.write(0x20_0000, code)
    path = tmp_path / f"{name}.raw"
    path.write_bytes(b.mem.read(0, RAM))
    return ["--raw", str(path), "--format", name, "--root", hex(b.root)], text + 0x1000 - (
        len(code) - 1)


@pytest.mark.parametrize("name,code,text,data,want,last_pa", [
    ("x86_64-4level", X86_CODE, 0xFFFF_FFFF_8100_0000, 0xFFFF_8880_0000_0000,
     [("nop", ""), ("mov", "rbp, rsp"), ("ret", "")], "0x300000"),  # ret: the next page
    ("arm64-4k-48", ARM_CODE, 0xFFFF_8000_1000_0000, 0xFFFF_0000_0000_0000,
     [("nop", ""), ("mov", "x29, sp"), ("ret", "")], "0x100ffd"),  # ret: straddles
])
def test_disasm_through_the_tables(tmp_path, name, code, text, data, want, last_pa):
    args, va = image(tmp_path, name, code, text, data)
    rc, out, err = run(*args, "disasm", hex(va), "3", "--json")
    insns = [json.loads(x) for x in out.splitlines()]
    assert (rc, err) == (0, "")
    assert [(i["mnemonic"], i["operands"]) for i in insns] == want
    assert "".join(i["bytes"] for i in insns) == code.hex()
    assert insns[-1]["pa"] == last_pa and insns[0]["attrs"].startswith("ro kern x")
    rc, out, err = run(*args, "disasm", hex(data))
    assert rc == 2 and not out and "not executable" in err and "--force" in err
    rc, out, _ = run(*args, "disasm", hex(data), "3", "--force")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith(f"# {data:#x}: rw kern nx")
    assert [ln.split()[-1] for ln in lines[1:]] == [want[0][0], want[1][1].split()[-1],
                                                    want[2][0]]


@pytest.mark.parametrize("extra,pattern", [
    (["0x10"], "is not mapped"),
    (["zz"], "bad VA"),
    (["0xffffffff81000000", "0"], "not in 1..100000"),
    (["0xffff000000000000"], "is outside x86_64-4level"),
])
def test_bad_input(tmp_path, extra, pattern):
    args, _ = image(tmp_path, "x86_64-4level", X86_CODE, 0xFFFF_FFFF_8100_0000,
                    0xFFFF_8880_0000_0000)
    rc, out, err = run(*args, "disasm", *extra)
    assert rc == 2 and not out
    assert err.startswith("ptlab: error: ") and pattern in err and err.count("\n") == 1, err

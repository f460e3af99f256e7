"""``ptlab search``: a pattern planted in one physical page is found at every VA mapping it
(the direct map and an alias), with its PA; not where it would straddle into an unmapped page;
hex and text patterns, --max, --json; bad patterns exit 2."""

from __future__ import annotations

import io
import json

import pytest
from ptlab.arch import arch_for
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.testing import TableBuilder

F = by_name("x86_64-4level")
DIRECT = 0xFFFF_8880_0000_0000
ALIAS = 0xFFFF_C900_0000_0000  # a vmalloc alias of one page
RAM = 32 << 20
NEEDLE = b"ptlab-canary-\x01\x02\x03"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def image(tmp_path):
    a = F.normalize(arch_for(F).page_kernel)
    b = TableBuilder(F, base=0x100_0000)
    b.map(DIRECT, 0, 16 << 20, a, level=1)  # PA 0..16M in 2M pages
    b.map(ALIAS, 0x80_0000, 0x1000, a, level=0)  # PA 8M again, 4K
    b.map(ALIAS + 0x2000, 0x90_0000 + 0x1000, 0x1000, a, level=0)
    b.mem.write(0x80_0010, NEEDLE)
    b.mem.write(0x90_0000 + 0x1000 - 4, NEEDLE)  # straddles out of the alias page (not of
    path = tmp_path / "ram.raw"  # the direct map, where it is found)
    path.write_bytes(b.mem.read(0, RAM))
    return ["--raw", str(path), "--format", F.name, "--root", hex(b.root)]


def test_hits_at_every_mapping_va(image):
    code, out, err = run(*image, "search", "--string", NEEDLE.decode())
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == [
        f"{DIRECT + 0x80_0010:#018x}", f"{DIRECT + 0x90_0ffc:#018x}", f"{ALIAS + 0x10:#018x}"]
    assert "pa 0x000000800010  2M   rw kern nx" in lines[0]
    assert "pa 0x000000800010  4K   rw kern nx" in lines[2]
    assert lines[-1] == "# 3 hit(s)"
    code, out, _ = run(*image, "search", NEEDLE.hex(" "), "--json", "--start", hex(ALIAS))
    assert code == 0
    assert [json.loads(x) for x in out.splitlines()] == [
        {"va": hex(ALIAS + 0x10), "pa": "0x800010", "page_size": 4096,
         "attrs": "rw kern nx global accessed dirty"}]
    code, out, _ = run(*image, "search", NEEDLE.hex(), "--max", "1")
    assert code == 0 and out.splitlines()[-1] == "# 1 hit(s) (more left out: --max)"
    code, out, _ = run(*image, "search", "--string", "not in memory at all")
    assert code == 1 and out == "# 0 hit(s)\n"


@pytest.mark.parametrize("extra,pattern", [
    ([], "give a HEX pattern or --string"),
    (["abc"], "even number of hex digits"),
    (["zz"], "want hex digits"),
    (["00", "--string", "x"], "one of them"),
    (["--string", ""], "--string is empty"),
    (["00ff", "--max", "0"], "--max must be at least 1"),
])
def test_bad_patterns(image, extra, pattern):
    code, out, err = run(*image, "search", *extra)
    assert code == 2 and not out
    assert err.startswith("ptlab: error: ") and pattern in err and err.count("\n") == 1, err

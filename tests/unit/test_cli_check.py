"""``ptlab check``: each rule finds its planted mapping on built x86-64 and arm64 kernel
tables and nothing on the clean ones; exit status 1 on findings, one line (or JSON object) per
finding; bad input is one error line, exit 2."""

from __future__ import annotations

import io
import json

import pytest
from ptlab.arch import arch_for
from ptlab.arch.x86_64 import CPU_ENTRY_AREA_BASE, ESPFIX_BASE, START_KERNEL_MAP
from ptlab.check import check
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.testing import TableBuilder

X86 = by_name("x86_64-4level")
ARM = by_name("arm64-4k-48")
RAM = 64 << 20
TEXT = START_KERNEL_MAP + (16 << 20)  # _stext: 4 MiB of 2M text pages
RODATA = TEXT + (4 << 20)
DATA = RODATA + (2 << 20)
DIRECT = 0xFFFF_8880_0000_0000


def attrs(fmt, **kw):
    base = arch_for(fmt).page_kernel.with_(**{"writable": False, **kw})
    return fmt.normalize(base)


def x86_kernel(plant: str | None = None) -> tuple[TableBuilder, int]:
    """A kernel half as x86 lays it out: text rx, rodata ro, data rw (2M pages), the direct
    map rw NX, the CPU entry area and ESPfix; the root is 8 KiB aligned with a PTI user PGD
    in its second page (CPU entry area, entry text). ``plant`` adds one bad mapping."""
    f = X86
    b = TableBuilder(f, base=0x200_0000)
    user_pgd = b.alloc()
    assert user_pgd == b.root + 0x1000
    b.map(TEXT, 0x100_0000, 4 << 20, attrs(f, exec=True, uexec=True), level=1)
    b.map(RODATA, 0x140_0000, 2 << 20, attrs(f), level=1)
    b.map(DATA, 0x160_0000, 2 << 20, attrs(f, writable=True), level=1)
    b.map(DIRECT, 0, 16 << 20, attrs(f, writable=True), level=1)
    b.map(CPU_ENTRY_AREA_BASE, 0x180_0000, 0x4000, attrs(f, writable=True), level=0)
    b.map(ESPFIX_BASE, 0x180_4000, 0x1000, attrs(f), level=0)
    u = TableBuilder(f, b.mem, base=0x300_0000)
    u.map(TEXT, 0x100_0000, 2 << 20, attrs(f, exec=True, uexec=True), level=1)  # entry text
    # the CPU's TSS page at its per-CPU (direct map) address, as in the CPU entry area
    u.map(DIRECT + 0x180_0000, 0x180_0000, 0x1000, attrs(f, writable=True), level=0)
    slot = f.index(CPU_ENTRY_AREA_BASE & (f.va_span - 1), f.top_level) * 8
    u.mem.write_u64(u.root + slot, b.mem.read_u64(b.root + slot))  # pti_clone_user_shared
    if plant == "wx":
        b.map(DIRECT + (32 << 20), 0x200_0000, 0x1000, attrs(f, writable=True, exec=True,
                                                              uexec=True), level=0)
    elif plant == "text-writable":  # the second 2M text page made writable
        b.set_raw(TEXT + (2 << 20), 1, f.leaf(0x120_0000, attrs(f, writable=True, exec=True,
                                                                 uexec=True), 1))
    elif plant == "user-kernel":  # US set on the leaf and on every table entry above it
        b.map(DIRECT + (32 << 20), 0x200_0000, 0x1000, attrs(f, writable=True, user=True),
              level=0)
        for level in (3, 2, 1):
            b.set_table_attrs(DIRECT + (32 << 20), level, f.table_attrs().with_(user=True))
    elif plant == "data-exec":
        b.map(DIRECT + (32 << 20), 0x200_0000, 0x1000, attrs(f, exec=True, uexec=True),
              level=0)
    elif plant == "user-root":  # linux_banner's rodata in the user PGD
        u.map(RODATA, 0x140_0000, 0x1000, attrs(f), level=0)
    elif plant == "user-root-data":  # a direct-map page the CPU entry area does not map
        u.map(DIRECT + 0x190_0000, 0x190_0000, 0x1000, attrs(f, writable=True), level=0)
    b.mem.write(user_pgd, u.mem.read(u.root, 0x1000))
    return b, TEXT


def rules(report) -> list[tuple[str, int]]:
    return [(f.rule, f.run.va) for f in report.findings]


def test_clean_x86_kernel_has_no_findings():
    b, stext = x86_kernel()
    r = check(X86, b.mem, b.root, stext=stext)
    assert r.findings == [] and r.complete
    assert r.text == (TEXT, TEXT + (4 << 20))
    assert r.user_root is not None and r.user_root[0] == b.root + 0x1000


@pytest.mark.parametrize("plant,va", [
    ("wx", DIRECT + (32 << 20)), ("user-kernel", DIRECT + (32 << 20)),
    ("data-exec", DIRECT + (32 << 20)), ("user-root", RODATA),
    ("user-root-data", DIRECT + 0x190_0000)])
def test_each_rule_finds_its_planted_mapping(plant, va):
    b, stext = x86_kernel(plant)
    r = check(X86, b.mem, b.root, stext=stext)
    assert rules(r) == [(plant.removesuffix("-data"), va)]


def test_writable_text_is_text_writable():
    b, stext = x86_kernel("text-writable")
    r = check(X86, b.mem, b.root, stext=stext)
    assert [x for x, _ in rules(r)] == ["text-writable"]
    assert r.text == (TEXT, TEXT + (4 << 20))
    assert r.findings[0].run.va == TEXT + (2 << 20)


def test_text_found_without_vmcoreinfo():
    b, _ = x86_kernel()
    assert check(X86, b.mem, b.root).text == (TEXT, TEXT + (4 << 20))


def test_no_user_pgd_without_pti():
    """Without PTI the page after the root is the kernel's own next-level table."""
    f = X86
    b = TableBuilder(f, base=0x200_0000)
    b.map(START_KERNEL_MAP + (16 << 20), 0x100_0000, 2 << 20, attrs(f, exec=True), level=1)
    assert b.tables[1] == b.root + 0x1000  # the pud the root points to
    assert arch_for(f).user_root(f, b.mem, b.root) is None


def arm64_kernel(uxn: bool = True, tramp_leak: bool = False) -> tuple[TableBuilder, int]:
    """arm64: tramp_pg_dir, reserved_pg_dir, swapper_pg_dir in a row; text ROX at
    KIMAGE_VADDR, the linear map RW; KPTI's trampoline at the top of the fixmap."""
    from ptlab.arch.arm64 import layout

    f, lay = ARM, layout(48, 12)
    swapper = TableBuilder(f, base=0x4000_2000)  # tramp_pg_dir 0x4000_0000, reserved between
    tramp = TableBuilder(f, swapper.mem, base=0x4100_0000)  # copied to tramp_pg_dir below
    text = lay["MODULES_END"] + (2 << 20)
    swapper.map(text, 0x4020_0000, 2 << 20, attrs(f, exec=True, uexec=not uxn), level=1)
    swapper.map(lay["PAGE_OFFSET"], 0x4000_0000, 32 << 20, attrs(f, writable=True), level=1)
    tva = lay["FIXADDR_TOP"] - 0x1000
    tramp.map(tva, 0x4020_0000, 0x1000, attrs(f, exec=True), level=0)
    if tramp_leak:
        tramp.map(lay["PAGE_OFFSET"], 0x4000_0000, 2 << 20, attrs(f, writable=True), level=1)
    swapper.mem.write(0x4000_0000, tramp.mem.read(tramp.root, 0x1000))
    return swapper, text


def test_arm64_clean_uxn_and_trampoline():
    b, text = arm64_kernel()
    r = check(ARM, b.mem, b.root, stext=text)
    assert r.findings == [] and r.user_root is not None
    assert r.user_root[0] == b.root - 0x2000
    b, text = arm64_kernel(uxn=False, tramp_leak=True)
    r = check(ARM, b.mem, b.root, stext=text)
    assert sorted(x for x, _ in rules(r)) == ["el0-exec", "user-root"]


# --- the CLI -------------------------------------------------------------------------------
def raw_file(tmp_path, b: TableBuilder) -> str:
    path = tmp_path / "ram.raw"
    path.write_bytes(b.mem.read(0, RAM))
    return str(path)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_check_exit_status_and_lines(tmp_path):
    b, _ = x86_kernel()
    args = ["--raw", raw_file(tmp_path, b), "--format", X86.name, "--root", hex(b.root)]
    code, out, err = run(*args, "check")
    assert (code, err) == (0, "") and out.startswith("# 0 finding(s)"), out
    b, _ = x86_kernel("wx")
    args[1] = raw_file(tmp_path, b)
    code, out, err = run(*args, "check")
    lines = out.splitlines()
    assert code == 1 and not err and len(lines) == 2
    assert lines[0].startswith(f"wx            {DIRECT + (32 << 20):#018x}-")
    assert lines[1].startswith("# 1 finding(s)")
    code, out, _ = run(*args, "check", "--json")
    objs = [json.loads(x) for x in out.splitlines()]
    assert code == 1 and [o["rule"] for o in objs] == ["wx"]
    assert objs[0]["va"] == hex(DIRECT + (32 << 20)) and objs[0]["pa"] == "0x2000000"
    assert objs[0]["attrs"].startswith("rw kern x")


@pytest.mark.parametrize("extra,pattern", [
    (["--user-root", "0x123"], "not a table-aligned PA"),
    (["--user-root", "0x40000000000"], "not a table-aligned PA inside"),
    (["--user-root", "zz"], "bad user root PA"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_check_bad_input(tmp_path, extra, pattern):
    b, _ = x86_kernel()
    code, out, err = run("--raw", raw_file(tmp_path, b), "--format", X86.name, "--root",
                         hex(b.root), "check", *extra)
    assert code == 2 and not out
    assert err.startswith("ptlab: error: ") and pattern in err and err.count("\n") == 1, err

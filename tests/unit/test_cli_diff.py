"""``ptlab diff``: two roots of one image and two ELF cores compared as runs (added, removed,
changed, split, merged) under their ptdump region; a KASLR-moved kernel image is no difference
when both cores carry VMCOREINFO's KERNELOFFSET; exit 1 on differences; bad input exit 2."""

from __future__ import annotations

import io
import json

import pytest
from ptlab.arch import arch_for
from ptlab.arch.x86_64 import START_KERNEL_MAP
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.memory.elfwrite import cpu_notes, loads_from_sparse, vmcoreinfo_note, write_core
from ptlab.testing import TableBuilder

F = by_name("x86_64-4level")
DIRECT = 0xFFFF_8880_0000_0000
TEXT = START_KERNEL_MAP + (16 << 20)
RAM = 48 << 20
K4, M2 = 4096, 2 << 20


def attrs(**kw):
    return F.normalize(arch_for(F).page_kernel.with_(**kw))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def two_roots(tmp_path):
    """One image, two roots: B splits A's first 2M direct-map page into 4K pages, makes one
    read-only, drops one, maps one more 2M page, and maps A's 4K text as one 2M page."""
    a = TableBuilder(F, base=0x100_0000)
    a.map(DIRECT, 0, 2 * M2, attrs(), level=1)
    a.map(TEXT, 0x20_0000, M2, attrs(writable=False, exec=True, uexec=True), level=0)
    b = TableBuilder(F, a.mem, base=0x180_0000)
    b.map(DIRECT, 0, M2, attrs(), level=0)
    b.map(DIRECT + 5 * K4, 5 * K4, K4, attrs(writable=False), level=0)
    b.mem.write_u64(b.entry_pa(DIRECT + 9 * K4, 0), 0)
    b.map(DIRECT + M2, M2, 2 * M2, attrs(), level=1)
    b.map(TEXT, 0x20_0000, M2, attrs(writable=False, exec=True, uexec=True), level=1)
    path = tmp_path / "ram.raw"
    path.write_bytes(a.mem.read(0, RAM))
    return ["--raw", str(path), "--format", F.name, "--root", hex(a.root)], b.root


def test_two_roots_as_runs(two_roots):
    args, root_b = two_roots
    code, out, err = run(*args, "diff", "--root-b", hex(root_b))
    lines = out.splitlines()
    assert code == 1 and not err
    got = [(ln.split()[0], ln.split()[1]) for ln in lines if not ln.startswith(("#", "---"))]
    r = lambda lo, hi: f"{DIRECT + lo:#018x}-{DIRECT + hi:#018x}"  # noqa: E731
    assert got == [
        ("split", r(0, 5 * K4)), ("changed", r(5 * K4, 6 * K4)), ("split", r(6 * K4, 9 * K4)),
        ("removed", r(9 * K4, 10 * K4)), ("split", r(10 * K4, M2)), ("added", r(2 * M2, 3 * M2)),
        ("merged", f"{TEXT:#018x}-{TEXT + M2:#018x}")], out
    assert lines[0] == "---[ Low Kernel Mapping ]---" and "---[ High Kernel Mapping ]---" in lines
    assert lines[-1].endswith("1 added, 1 changed, 1 merged, 1 removed, 3 split")
    assert "rw kern nx global accessed dirty -> ro kern nx global accessed dirty  [2M/4K]" \
        in lines[2]
    code, out, _ = run(*args, "diff", "--root-b", hex(root_b), "--json")
    objs = [json.loads(x) for x in out.splitlines()]
    assert [o["kind"] for o in objs][:2] == ["split", "changed"]
    assert objs[0] == {"kind": "split", "va": hex(DIRECT), "end": hex(DIRECT + 5 * K4),
                       "size": 5 * K4, "region": "Low Kernel Mapping",
                       "old": "rw kern nx global accessed dirty",
                       "new": "rw kern nx global accessed dirty", "old_pa": "0x0",
                       "new_pa": "0x0", "old_page_size": M2, "new_page_size": K4}
    code, out, _ = run(*args, "diff", "--root-b", args[-1])  # a root against itself
    assert code == 0 and out.endswith("no differences\n")


def core_with_text(path, offset: int, vmcoreinfo: bool) -> None:
    b = TableBuilder(F, base=0x100_0000)
    b.map(DIRECT, 0, M2, attrs(), level=1)
    b.map(TEXT + offset, 0x20_0000, M2, attrs(writable=False, exec=True, uexec=True), level=1)
    text = (f"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=0\n"
            f"SYMBOL(init_top_pgt)={START_KERNEL_MAP + b.root:x}\nSYMBOL(_stext)="
            f"{TEXT + offset:x}\nKERNELOFFSET={offset:x}\nNUMBER(pgtable_l5_enabled)=0\n")
    notes = cpu_notes("x86_64", cr3=b.root) + ([vmcoreinfo_note(text)] if vmcoreinfo else [])
    write_core(path, "x86_64", loads_from_sparse(b.mem, [(0, RAM)]), notes)


def test_kaslr_offsets_taken_out(tmp_path):
    a, b = tmp_path / "a.core", tmp_path / "b.core"
    core_with_text(a, 0, True)
    core_with_text(b, 0x400_0000, True)
    code, out, err = run("--dump", str(a), "diff", str(b))
    assert (code, err) == (0, "") and out.startswith("# ") and "no differences" in out
    assert "B's kernel image moved by -0x4000000 (KERNELOFFSET)" in out
    core_with_text(b, 0x400_0000, False)  # no VMCOREINFO on one side: moved, so different
    code, out, err = run("--dump", str(a), "--root", hex(0x100_0000), "diff", str(b),
                         "--root-b", hex(0x100_0000))
    assert code == 1 and out.splitlines()[-1].endswith("1 added, 1 removed"), out


@pytest.mark.parametrize("extra,pattern", [
    ([], "diff needs a second dump B or --root-b"),
    (["--root-b", "0x123"], "not a 0x1000-aligned PA"),
    (["/nonexistent/b.core"], "/nonexistent/b.core"),
    (["--root-b", "0x1800000", "--start", "0xffff000000000000"], "is outside x86_64-4level"),
])
def test_bad_input(two_roots, extra, pattern):
    args, _ = two_roots
    code, out, err = run(*args, "diff", *extra)
    assert code == 2 and not out
    assert err.startswith("ptlab: error: ") and pattern in err and err.count("\n") == 1, err


def test_formats_must_match(two_roots, tmp_path):
    args, _ = two_roots
    arm = tmp_path / "arm.raw"
    arm.write_bytes(bytes(4096))
    code, out, err = run(*args, "diff", str(arm))
    assert code == 2 and "ptlab: error:" in err

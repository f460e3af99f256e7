"""The ptlab command line over generated ELF cores and raw images (in-process + one subprocess)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from ptlab import dump
from ptlab.cli import main
from ptlab.formats import Attrs
from ptlab.formats.catalog import by_name
from ptlab.memory import SparseMemory
from ptlab.memory.elfwrite import cpu_notes, loads_from_sparse, vmcoreinfo_note, write_core

TEXT_VA = 0xFFFF_FFFF_8100_0000  # 2M kernel text leaf -> PA 0x200000
DATA_VA = 0xFFFF_FFFF_8120_0000  # 4K rw nx -> PA 0x5000
WX_VA = 0xFFFF_FFFF_8120_1000  # 4K rw x -> PA 0x6000
RAM = 0x40_0000


def build_x86(mem: SparseMemory) -> int:
    """pgd 0x1000 -> pud 0x2000 -> pmd 0x3000 -> {2M leaf, pte 0x4000}; returns the root."""
    f = by_name("x86_64-4level")
    base = Attrs(present=True, global_=True, accessed=True, dirty=True)
    rx = f.normalize(base.with_(exec=True, uexec=True))
    rw = f.normalize(base.with_(writable=True))
    rwx = f.normalize(base.with_(writable=True, exec=True, uexec=True))
    mem.write_u64(0x1000 + 8 * f.index(TEXT_VA, 3), f.table(0x2000, 3))
    mem.write_u64(0x2000 + 8 * f.index(TEXT_VA, 2), f.table(0x3000, 2))
    mem.write_u64(0x3000 + 8 * f.index(TEXT_VA, 1), f.leaf(0x20_0000, rx, 1))
    mem.write_u64(0x3000 + 8 * f.index(DATA_VA, 1), f.table(0x4000, 1))
    mem.write_u64(0x4000 + 8 * f.index(DATA_VA, 0), f.leaf(0x5000, rw, 0))
    mem.write_u64(0x4000 + 8 * f.index(WX_VA, 0), f.leaf(0x6000, rwx, 0))
    return 0x1000


@pytest.fixture
def x86(tmp_path):
    return make_x86_files(tmp_path)


def make_x86_files(tmp_path) -> dict:
    """An x86 core with VMCOREINFO, a bare core (CR3 note only) and a raw image of one RAM."""
    mem = SparseMemory(RAM)
    root = build_x86(mem)
    vmci = ("OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=0\n"
            f"SYMBOL(init_top_pgt)={0xFFFFFFFF80000000 + root:x}\n"
            "NUMBER(pgtable_l5_enabled)=0\n")
    loads = loads_from_sparse(mem, [(0, 0x8000)])
    loads[0] = type(loads[0])(0, loads[0].data, memsz=RAM)  # rest of RAM: zero tail
    core = tmp_path / "x86.core"
    write_core(core, "x86_64", loads, [*cpu_notes("x86_64", cr3=root), vmcoreinfo_note(vmci)])
    bare = tmp_path / "bare.core"  # no VMCOREINFO: root from the QEMU note's CR3
    write_core(bare, "x86_64", loads, cpu_notes("x86_64", cr3=root | 0x18))
    raw = tmp_path / "ram.raw"
    raw.write_bytes(bytes(0x1000) + mem.read(0, 0x8000))  # RAM at file offset 0x1000
    return {"core": str(core), "bare": str(bare), "raw": str(raw), "root": root}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["info", "--elf", "/nonexistent/x.core"], "cannot open /nonexistent/x.core"),
        (["translate", "--elf", "{core}", "0xzz"], "bad VA '0xzz'"),
        (["translate", "--elf", "{core}", "--format", "sparc-9level", "0x0"],
         "unknown format 'sparc-9level'"),
        (["translate", "--elf", "{core}", "0x0000900000000000"], "outside x86_64-4level"),
        (["translate", "--elf", "{core}", "--format", "arm64-4k-48", "0x0"], "core is x86_64"),
        (["walk", "--raw", "{raw}"], "--format NAME is required"),
        (["walk", "--raw", "{raw}", "--format", "x86_64-4level"], "pass --root PA"),
        (["walk", "--raw", "{raw}", "--vmcoreinfo", "scan"], "no VMCOREINFO note found"),
        (["walk", "--raw", "{raw}", "--vmcoreinfo", "/nonexistent"], "cannot read VMCOREINFO"),
        (["walk", "--raw", "{raw}", "--region", "0:0x1000", "--format", "x86_64-4level",
          "--root", "0x1000"], "bad region"),
        (["walk", "--raw", "{raw}", "--region", "0:0x1000:1G", "--format", "x86_64-4level",
          "--root", "0x1000"], "beyond the end"),
        (["walk", "--elf", "{core}", "--root", "0x1001"], "not a 0x1000-aligned"),
        (["walk", "--elf", "{core}", "--root", "0x40000000"], "outside the memory"),
        (["walk", "--elf", "{core}", "--start", "0x900000000000"], "outside x86_64-4level"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
        (["info"], "no input"),
        (["info", "--elf", "{core}", "--raw", "{raw}"], "not both"),
        (["translate", "--elf", "{raw}", "0x0"], "not an ELF file"),
    ],
)
def test_bad_input_one_line_exit_2(x86, argv, pattern):
    argv = [a.format(**x86) for a in argv]
    code, out, err = run(*argv)
    assert code == 2, (out, err)
    assert err.startswith("ptlab: error: ") and err.count("\n") == 1, err
    assert pattern in err, err


def test_info_infers_format_and_root(x86):
    code, out, err = run("--elf", x86["core"], "info")
    assert code == 0 and err == ""
    assert "machine: x86_64" in out and "format: x86_64-4level" in out
    assert f"root: {x86['root']:#x}" in out and "VMCOREINFO init_top_pgt" in out
    assert "OSRELEASE=6.1.0-test" in out and "cr3=0x1000" in out
    code, out, _ = run("info", "--elf", x86["bare"])
    assert code == 0 and f"root: {x86['root']:#x}" in out and "CR3 0x1018" in out
    code, out, _ = run("info", "--raw", x86["raw"])
    assert code == 0 and "format: unknown" in out


def test_translate_through_every_level(x86):
    code, out, err = run("translate", "--elf", x86["core"], hex(TEXT_VA + 0x12345))
    assert code == 0, err
    assert "=> PA 0x212345" in out and "2M page at pmd" in out
    lines = [ln.split()[0] for ln in out.splitlines()[1:-1]]
    assert lines == ["pgd", "pud", "pmd"]
    code, out, _ = run("translate", "--elf", x86["bare"], hex(DATA_VA + 8))
    assert code == 0 and "=> PA 0x5008" in out and "rw kern nx" in out
    code, out, _ = run("translate", "--elf", x86["core"], hex(TEXT_VA + (4 << 21)))
    assert code == 1 and "=> fault:" in out


def test_raw_image_with_region(x86):
    code, out, err = run("translate", "--raw", x86["raw"], "--region", "0:0x1000:0x8000",
                         "--format", "x86_64-4level", "--root", "0x1000", hex(WX_VA + 1))
    assert code == 0, err
    assert "=> PA 0x6001" in out


def test_walk_and_wx(x86):
    code, out, err = run("walk", "--elf", x86["core"])
    assert code == 0, err
    runs = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(runs) == 3
    assert runs[0].startswith(f"{TEXT_VA:#018x}-{TEXT_VA + (2 << 20):#018x}")
    assert "pa 0x00000020000" in runs[0] and "ro kern x" in runs[0]
    assert runs[1].startswith(f"{DATA_VA:#018x}") and "rw kern nx" in runs[1]
    assert runs[2].startswith(f"{WX_VA:#018x}") and "rw kern x" in runs[2]
    code, out, _ = run("walk", "--elf", x86["core"], "--start", hex(DATA_VA),
                       "--end", hex(WX_VA))
    assert code == 0 and len([ln for ln in out.splitlines() if not ln.startswith("#")]) == 1
    code, out, _ = run("wx", "--elf", x86["core"])
    assert code == 1 and "FAILED, 1 W+X pages found" in out and f"{WX_VA:#018x}" in out
    code, out, _ = run("wx", "--elf", x86["core"], "--end", hex(WX_VA))
    assert code == 0 and "passed, no W+X pages found" in out


def test_ptdump_kernel_text(x86):
    code, out, err = run("ptdump", "--elf", x86["core"])
    assert code == 0, err
    assert "---[ High Kernel Mapping ]---" in out and "---[ User Space ]---" in out
    mapped = [r for r in dump.parse(out) if r.mapped]
    assert [(r.va, r.size, r.level) for r in mapped] == [
        (TEXT_VA, 2 << 20, "pmd"), (DATA_VA, 4096, "pte"), (WX_VA, 4096, "pte")]
    assert "NX" in mapped[1].flags and "x" in mapped[2].flags and "PSE" in mapped[0].flags
    code, part, err = run("ptdump", "--elf", x86["core"], "--start", hex(TEXT_VA),
                          "--end", hex(WX_VA))
    lines = part.splitlines()
    assert code == 0 and lines[0] == "---[ High Kernel Mapping ]---", part
    assert len(lines) == 3 and all(ln in out for ln in lines[1:])


def test_subprocess_entry_point(x86):
    script = Path(sys.executable).parent / "ptlab"  # the console script, if installed
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ptlab.cli"]
    p = subprocess.run([*cmd, "info", "--elf", x86["core"]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "format: x86_64-4level" in p.stdout, p.stderr
    p = subprocess.run([*cmd, "translate", "--elf", x86["core"], "nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr == "ptlab: error: bad VA 'nope' " \
        "(use decimal or 0x-prefixed hex)\n" and p.stdout == ""


def test_arm64_inferred_from_vmcoreinfo(tmp_path):
    f = by_name("arm64-4k-48")
    ram, root, voff = 0x4000_0000, 0x4000_1000, 0xFFFF_7FFF_C800_0000
    va = 0xFFFF_8000_0820_0000  # kernel image VA
    mem = SparseMemory(ram + (8 << 20))
    kx = f.normalize(Attrs(present=True, exec=True, accessed=True, global_=True))
    mem.write_u64(root + 8 * f.index(va, 3), f.table(0x4000_2000, 3))
    mem.write_u64(0x4000_2000 + 8 * f.index(va, 2), f.table(0x4000_3000, 2))
    mem.write_u64(0x4000_3000 + 8 * f.index(va, 1), f.leaf(0x4060_0000, kx, 1))
    vmci = ("OSRELEASE=6.1.0-arm64\nPAGESIZE=4096\nNUMBER(VA_BITS)=48\n"
            f"SYMBOL(swapper_pg_dir)={root + voff:x}\nNUMBER(kimage_voffset)={voff:#x}\n"
            "NUMBER(TCR_EL1_T1SZ)=0x10\n")
    loads = loads_from_sparse(mem, [(ram, ram + 0x4000)])
    core = tmp_path / "arm64.core"
    write_core(core, "arm64", loads, [*cpu_notes("arm64"), vmcoreinfo_note(vmci)])
    code, out, err = run("info", "--elf", str(core))
    assert code == 0 and "format: arm64-4k-48\n" in out and f"root: {root:#x}" in out, out
    code, out, err = run("translate", "--elf", str(core), hex(va + 0x1234))
    assert code == 0 and "=> PA 0x40601234" in out and "ro kern x" in out, out + err
    code, out, err = run("translate", "--elf", str(core), "0x1000")  # TTBR0 half
    assert code == 2 and "outside arm64-4k-48" in err
    code, out, err = run("translate", "--elf", str(core), "--format", "x86_64-4level", "0x0")
    assert code == 2 and "core is arm64" in err


def test_vmcoreinfo_file_and_scan(x86, tmp_path):
    mem = SparseMemory(RAM)
    root = build_x86(mem)
    text = ("OSRELEASE=6.1.0-scan\nPAGESIZE=4096\nNUMBER(phys_base)=0\n"
            f"SYMBOL(init_top_pgt)={0xFFFFFFFF80000000 + root:x}\n"
            "NUMBER(pgtable_l5_enabled)=0\n")
    mem.write(0x7000, vmcoreinfo_note(text))  # where /sys/kernel/vmcoreinfo would point
    mem.write(0x6800, b"VMCOREINFO\0\0 decoy without a note header")
    raw = tmp_path / "ram.raw"
    raw.write_bytes(mem.read(0, 0x8000))
    code, out, err = run("info", "--raw", str(raw), "--vmcoreinfo", "scan")
    assert code == 0, err
    assert "OSRELEASE=6.1.0-scan" in out and "found in memory at PA 0x7000" in out
    assert "format: x86_64-4level" in out and f"root: {root:#x}" in out
    code, out, err = run("translate", "--raw", str(raw), "--vmcoreinfo", "scan", hex(WX_VA))
    assert code == 0 and "=> PA 0x6000" in out, err
    vfile = tmp_path / "vmcoreinfo.txt"
    vfile.write_text(text.replace("6.1.0-scan", "6.1.0-file"))
    code, out, err = run("info", "--elf", x86["bare"], "--vmcoreinfo", str(vfile))
    assert code == 0 and "OSRELEASE=6.1.0-file" in out and "VMCOREINFO init_top_pgt" in out
    code, out, err = run("translate", "--raw", str(raw), "--vmcoreinfo", str(vfile),
                         "--format", "arm64-4k-48", "0xffff800000000000")
    assert code == 2 and "VMCOREINFO describes x86_64" in err

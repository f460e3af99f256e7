"""ElfCore over generated QEMU-shaped and kdump-shaped ELF cores."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from ptlab.memory import ElfCore, ElfCoreError, MemoryError_, OutOfRange, WrongArch
from ptlab.memory.elfwrite import LoadSpec, cpu_notes, note, vmcoreinfo_note, write_core

VMCI = "OSRELEASE=6.1.0\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff82a0a000\n" \
       "NUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)=0\n"


def pages(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 2**64, n * 512, dtype=np.uint64).tobytes()


@pytest.fixture
def x86core(tmp_path):
    low, high = pages(2, 1), pages(1, 2)
    loads = [
        LoadSpec(0, low, memsz=4 * 4096),  # 2 pages in the file + 2 zero pages
        LoadSpec(0x1_0000_0000, high),
    ]
    notes = cpu_notes("x86_64", cr3=0x2A0A000 | 0x800, cr4=0x1000 | 0x20, ncpus=2,
                      regs={"rip": 0xFFFFFFFF81000000, "rsp": 0x1234})
    notes.append(vmcoreinfo_note(VMCI))
    path = tmp_path / "x86.core"
    write_core(path, "x86_64", loads, notes)
    return path, low, high


def test_qemu_shaped_x86_core(x86core):
    path, low, high = x86core
    with ElfCore(path) as core:
        assert core.machine == "x86_64"
        assert [(ld.paddr, ld.filesz, ld.memsz) for ld in core.loads] == [
            (0, 8192, 16384), (0x1_0000_0000, 4096, 4096)]
        assert core.ranges() == [(0, 16384), (0x1_0000_0000, 0x1_0000_1000)]
        assert core.read(0, 8192) == low and core.read(0x1_0000_0000, 4096) == high
        t = core.read_table(4096, 512)
        assert t.tobytes() == low[4096:] and not t.flags.owndata
        z = core.read_table(8192, 512)  # zero-filled tail
        assert not z.any() and z.size == 512
        assert core.read(8192 - 8, 16) == low[-8:] + bytes(8)  # file part + tail
        assert core.read_u64(16384 - 8) == 0
        with pytest.raises(OutOfRange):
            core.read_u64(16384)
        names = [(n.name, n.type) for n in core.notes]
        assert names == [("CORE", 1), ("CORE", 1), ("QEMU", 0), ("QEMU", 0), ("VMCOREINFO", 0)]
        assert len(core.cpus) == 2 and [c.pid for c in core.cpus] == [1, 2]
        assert core.cpus[0].cr3 == 0x2A0A800 and core.cpus[1].cr4 == 0x1020
        assert core.cpus[0].regs["rip"] == 0xFFFFFFFF81000000
        assert core.cpus[0].regs["rsp"] == 0x1234
        assert core.vmcoreinfo is not None
        assert core.vmcoreinfo.kernel_root() == 0x2A0A000


def test_kdump_shaped_arm64_core(tmp_path):
    data = pages(4, 3)
    path = tmp_path / "vmcore"
    vmci = "OSRELEASE=6.1.0-arm64\nSYMBOL(swapper_pg_dir)=ffff800009ad1000\n" \
           "NUMBER(kimage_voffset)=0xffff7fffc8000000\nNUMBER(VA_BITS)=48\n"
    regs = {"pc": 0xFFFF800008001234, "sp": 0xFFFF80000A000000, "x0": 7}
    notes = cpu_notes("arm64", regs=regs) + [vmcoreinfo_note(vmci)]
    write_core(path, "arm64", [LoadSpec(0x4000_0000, data)], notes)
    with ElfCore(path, arch="arm64") as core:
        assert core.machine == "arm64" and core.ranges() == [(0x4000_0000, 0x4000_4000)]
        assert core.cpus[0].regs["pc"] == 0xFFFF800008001234 and core.cpus[0].regs["x0"] == 7
        assert core.cpus[0].cr3 is None
        assert core.vmcoreinfo.kernel_root() == 0x41AD1000
        assert core.read(0x4000_1000, 4096) == data[4096:8192]


def test_pn_xnum_and_aliases(tmp_path):
    data = pages(1, 4)
    # QEMU paging=true dumps alias one PA from several virtual mappings
    loads = [LoadSpec(0x2000, data, vaddr=0xFFFF888000002000),
             LoadSpec(0x2800, data[2048:], vaddr=0xFFFFFFFF81000000),
             LoadSpec(0x1000, data + data[:2048], memsz=0x2000)]
    path = tmp_path / "xnum.core"
    write_core(path, "x86_64", loads, force_xnum=True)
    with ElfCore(path) as core:
        assert len(core.loads) == 3 and core.ranges() == [(0x1000, 0x3000)]
        assert core.read(0x1000, 4096) == data
        assert core.read(0x2000, 2048) == data[:2048]
        assert core.read(0x2800, 2048) == bytes(2048)  # from the zero tail of the first load


def test_many_segments_use_pn_xnum(tmp_path):
    n = 70_000
    loads = [LoadSpec(i * 4096, b"", memsz=4096) for i in range(n)]
    loads[12345] = LoadSpec(12345 * 4096, b"\x11" * 8, memsz=4096)
    path = tmp_path / "many.core"
    write_core(path, "x86_64", loads)
    raw = path.read_bytes()
    assert struct.unpack_from("<H", raw, 56)[0] == 0xFFFF
    with ElfCore(path) as core:
        assert len(core.loads) == n
        assert core.read_u64(12345 * 4096) == 0x1111111111111111
        assert core.ranges() == [(0, n * 4096)]


def _variants(good: bytes):
    def patch(off, fmt, val):
        b = bytearray(good)
        struct.pack_into(fmt, b, off, val)
        return bytes(b)

    return [
        ("not-elf", b"MZ\x90\x00" + good[4:], "not an ELF file"),
        ("flat", b"makedumpfile\0\0\0\0" + bytes(4096), "flattened kdump"),
        ("kdump", b"KDUMP   " + bytes(4096), "kdump-compressed"),
        ("tiny", good[:3], "not an ELF file"),
        ("empty", b"", "not an ELF file"),
        ("short-header", good[:40], "truncated ELF header"),
        ("elf32", patch(4, "<B", 1), "32-bit"),
        ("big-endian", patch(5, "<B", 2), "big-endian"),
        ("exec", patch(16, "<H", 2), "not a core file"),
        ("arm32", patch(18, "<H", 40), "unsupported machine arm \\(EM_ARM\\)"),
        ("ppc", patch(18, "<H", 21), "unsupported machine e_machine 21"),
        ("phdrs-cut", good[:100], "program headers .* truncated"),
        ("data-cut", good[:-100], "PT_LOAD #2 .* truncated"),
        ("phnum-huge", patch(56, "<H", 5000), "program headers .* truncated"),
    ]


def test_bad_files_one_clear_error(x86core, tmp_path):
    path, _, _ = x86core
    good = path.read_bytes()
    for name, blob, pattern in _variants(good):
        p = tmp_path / f"bad-{name}"
        p.write_bytes(blob)
        with pytest.raises(ElfCoreError, match=pattern) as e:
            ElfCore(p)
        assert isinstance(e.value, MemoryError_), name
        assert "\n" not in str(e.value) and str(p) in str(e.value), name


def test_note_overrun_and_no_loads(tmp_path):
    p = tmp_path / "badnote"
    bad_note = struct.pack("<III", 5, 4000, 1) + b"CORE\0\0\0\0"
    write_core(p, "x86_64", [LoadSpec(0, b"\0" * 4096)], [bad_note])
    with pytest.raises(ElfCoreError, match="note at offset 0x0 .* runs past"):
        ElfCore(p)
    write_core(p, "x86_64", [], [note("CORE", 1, b"")])
    with pytest.raises(ElfCoreError, match="no PT_LOAD"):
        ElfCore(p)


def test_wrong_arch(x86core):
    path, _, _ = x86core
    with pytest.raises(WrongArch, match="core is x86_64, not arm64"):
        ElfCore(path, arch="arm64")


def test_missing_file(tmp_path):
    with pytest.raises(MemoryError_, match="cannot open"):
        ElfCore(tmp_path / "none")


def test_mutated_headers_never_crash(x86core, tmp_path):
    """Random byte flips in the headers and notes: a core or one ElfCoreError, nothing else."""
    path, _, _ = x86core
    good = path.read_bytes()
    head = good.find(b"VMCOREINFO") + 64  # ELF header, phdrs and notes
    rng = np.random.default_rng(11)
    p = tmp_path / "mutant"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        b = bytearray(good)
        for pos in rng.integers(0, head, rng.integers(1, 6)):
            b[pos] = int(rng.integers(0, 256))
        p.write_bytes(b)
        try:
            with ElfCore(p) as core:
                for s, e in core.ranges()[:4]:
                    core.read(s, min(64, e - s))
            outcomes["ok"] += 1
        except ElfCoreError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]


def test_gdb_reads_our_prstatus(tmp_path):
    """gdb, an independent ELF core reader, sees the registers elfwrite put in NT_PRSTATUS.
    (gdb is a host dependency: images/host-packages.txt.)"""
    import subprocess

    regs = {"rip": 0xFFFFFFFF81000123, "rsp": 0x1234, "rax": 0xAAAA, "r15": 0xF15, "cs": 0x10}
    path = tmp_path / "c.core"
    write_core(path, "x86_64", [LoadSpec(0, bytes(4096))], cpu_notes("x86_64", regs=regs))
    out = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "set architecture i386:x86-64", "-ex",
         f"core-file {path}", "-ex", "info registers rip rsp rax r15 cs"],
        capture_output=True, text=True, timeout=60).stdout
    seen = {ln.split()[0]: int(ln.split()[1], 16) for ln in out.splitlines()
            if ln.split() and ln.split()[0] in regs}
    assert seen == regs, out
    with ElfCore(path) as core:
        assert {k: core.cpus[0].regs[k] for k in regs} == regs

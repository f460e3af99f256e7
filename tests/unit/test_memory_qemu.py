"""Real QEMU ``dump-guest-memory`` output read by ElfCore and the CLI (no guest kernel).

Each test starts a tiny TCG VM in a private 0700 directory (QMP on a unix socket that the test
listens on), dumps it, and checks ElfCore against QEMU's own monitor (HMP ``xp``, ``info
registers``, ``gva2gpa``) — oracles ptlab did not write. QEMU is a host dependency
(images/host-packages.txt): a missing binary fails these tests.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from ptlab.cli import main
from ptlab.formats.catalog import by_name
from ptlab.memory import ElfCore, ElfCoreError
from qemu.qmp import legacy as qmp_legacy


class VM:
    def __init__(self, qmp, proc: subprocess.Popen, rundir: Path) -> None:
        self.qmp, self.proc, self.rundir = qmp, proc, rundir

    def hmp(self, line: str) -> str:
        return str(self.qmp.cmd("human-monitor-command", **{"command-line": line}))

    def dump(self, name: str = "dump.elf") -> Path:
        out = self.rundir / name
        self.qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}")
        return out

    def registers(self) -> dict[str, int]:
        text = self.hmp("info registers")
        return {k.lower(): int(v, 16) for k, v in re.findall(r"\b([A-Z][A-Z0-9]*)=([0-9a-f]+)\b",
                                                               text)}


@contextmanager
def qemu_vm(binary: str, *args: str, mem_mb: int = 64, serial: str = "none") -> Iterator[VM]:
    assert shutil.which(binary), f"{binary} not installed (make host-deps)"
    rundir = Path(tempfile.mkdtemp(prefix="ptlab-qemu-"))  # mkdtemp: mode 0700
    proc = qmp = None
    try:
        sock = str(rundir / "qmp.sock")
        qmp = qmp_legacy.QEMUMonitorProtocol(sock, server=True)
        proc = subprocess.Popen(
            [binary, *args, "-m", str(mem_mb), "-accel", "tcg", "-nodefaults", "-display",
             "none", "-serial", serial, "-monitor", "none", "-qmp", f"unix:{sock}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        qmp.accept(timeout=20)
        yield VM(qmp, proc, rundir)
    finally:
        if qmp is not None:
            try:
                qmp.close()
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        if proc is not None:
            proc.kill()
            proc.wait(timeout=20)
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(rundir, ignore_errors=True)


def check_against_xp(vm: VM, core: ElfCore, samples: int, seed: int) -> int:
    """Compare u64s read through ElfCore with HMP ``xp`` at random PAs of every load."""
    rng = np.random.default_rng(seed)
    nonzero = 0
    for s, e in core.ranges():
        for pa in sorted({s & ~7, (e - 16) & ~7, *(int(x) & ~7 for x in
                                                    rng.integers(s, e - 16, samples))}):
            text = vm.hmp(f"xp /2gx {pa:#x}")
            want = [int(v, 16) for v in text.split(":", 1)[1].split()]
            got = [core.read_u64(pa), core.read_u64(pa + 8)]
            assert got == want, (hex(pa), text)
            nonzero += any(want)
    return nonzero


def test_x86_q35_bios_dump(tmp_path):
    """SeaBIOS runs until it finds nothing to boot; its RAM and ROMs must read as QEMU says."""
    with qemu_vm("qemu-system-x86_64", "-machine", "q35") as vm:
        time.sleep(0.4)  # let SeaBIOS fill RAM (shadowed BIOS, tables)
        vm.qmp.cmd("stop")
        regs = vm.registers()
        path = vm.dump()
        with ElfCore(path) as core:
            # QEMU writes EM_386 when the CPU is not in long mode (SeaBIOS never enters it)
            assert core.machine == "x86_64" and core.e_machine == 3
            assert core.ranges()[0][0] == 0 and sum(ld.memsz for ld in core.loads) >= 64 << 20
            assert [n.name for n in core.notes] == ["CORE", "QEMU"]
            cpu = core.cpus[0]
            assert cpu.cr is not None
            assert (cpu.cr[0], cpu.cr[3], cpu.cr[4]) == (regs["cr0"], regs["cr3"], regs["cr4"])
            assert "rip" not in regs and cpu.regs["rip"] == regs["eip"]  # HMP: EIP, not RIP
            assert check_against_xp(vm, core, 20, seed=1) > 0
            # the reset vector in the BIOS ROM: a far jump (EA) as SeaBIOS puts there
            assert core.read(0xFFFF_FFF0, 1) == b"\xea"


def test_arm64_virt_dump():
    with qemu_vm("qemu-system-aarch64", "-machine", "virt", "-cpu", "max", "-S") as vm:
        path = vm.dump()
        regs = vm.registers()
        with ElfCore(path, arch="arm64") as core:
            assert core.machine == "arm64"
            assert core.ranges() == [(0x4000_0000, 0x4000_0000 + (64 << 20))]
            names = [(n.name, n.type) for n in core.notes]
            assert names[:2] == [("CORE", 1), ("CORE", 2)]  # NT_PRSTATUS, NT_PRFPREG
            assert core.cpus[0].regs["pc"] == regs["pc"]
            assert core.cpus[0].pid == 1
            check_against_xp(vm, core, 8, seed=2)
        # QEMU's kdump formats are the flattened makedumpfile stream: one clear error
        flat = vm.rundir / "dump.kdump"
        vm.qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{flat}",
                   format="kdump-zlib")
        with pytest.raises(ElfCoreError, match="flattened kdump"):
            ElfCore(flat)
        code = main(["info", "--elf", str(path)], out=(out := io.StringIO()),
                    err=(err := io.StringIO()))
        assert code == 0, err.getvalue()
        assert "machine: arm64" in out.getvalue()
        assert "cannot infer the arm64 format without VMCOREINFO" in out.getvalue()


# --- a long-mode guest with hand-made page tables ---------------------------------------------
LOAD = 0x10_0000  # multiboot kernels load at 1 MiB
PML4, PDPT_LO, PD_LO, PDPT_HI, PD_HI, PT, PML5 = (LOAD + i * 0x1000 for i in range(1, 8))
P, RW, US, ACC, PS, G, NX = 1, 2, 4, 0x20, 0x80, 0x100, 1 << 63
KVA = 0xFFFF_FFFF_8000_0000


def _code(levels: int) -> bytes:
    """32-bit code: CR3 = top table, CR4.PAE (|LA57), EFER.LME|NXE, CR0.PG -> long (compat)
    mode; hlt."""
    root, cr4 = (PML5, 0x1020) if levels == 5 else (PML4, 0x20)
    return b"".join([
        b"\xb8" + struct.pack("<I", root), b"\x0f\x22\xd8",  # mov eax, root; mov cr3, eax
        b"\x0f\x20\xe0", b"\x0d" + struct.pack("<I", cr4), b"\x0f\x22\xe0",  # cr4 |= ...
        b"\xb9\x80\x00\x00\xc0", b"\x0f\x32",  # mov ecx, IA32_EFER; rdmsr
        b"\x0d\x00\x09\x00\x00", b"\x0f\x30",  # eax |= LME | NXE; wrmsr
        b"\x0f\x20\xc0", b"\x0d\x00\x00\x00\x80", b"\x0f\x22\xc0",  # cr0 |= PG
        b"\xf4\xeb\xfd",  # 1: hlt; jmp 1b
    ])


def _tables(levels: int = 4) -> dict[int, int]:
    """Raw entries by PA, encoded by hand from the SDM bits (not by ptlab's codec); with 5
    levels a PML5 on top whose entries 0 and 511 both lead to the PML4."""
    e = {
        PML4 + 8 * 0: PDPT_LO | P | RW,
        PML4 + 8 * 256: PDPT_HI | P | RW,  # alias: two top entries share one PDPT
        PML4 + 8 * 511: PDPT_HI | P | RW | US,
        PDPT_LO: PD_LO | P | RW,
        PD_LO: 0 | P | RW | PS,  # identity 2M: the code runs here
        PDPT_HI + 8 * 510: PD_HI | P | RW | US,
        PD_HI + 8 * 0: 0x20_0000 | P | RW | PS | G | NX | ACC,
        PD_HI + 8 * 1: PT | P | RW | US,
        PD_HI + 8 * 3: 0x60_0000 | P | PS,  # read-only executable 2M
        PT + 8 * 0: 0x30_0000 | P,
        PT + 8 * 1: 0x30_1000 | P | RW | NX,
        PT + 8 * 3: 0x30_5000 | P | US,
        PT + 8 * 4: 0x30_7000 | P | RW,  # W+X 4K page
    }
    if levels == 5:
        e[PML5] = PML4 | P | RW
        e[PML5 + 8 * 511] = PML4 | P | RW | US
    return e


def multiboot_elf(levels: int = 4) -> bytes:
    """A minimal ELF32 multiboot kernel: header, code and page tables, loaded at 1 MiB."""
    img = bytearray(0x8000)
    entry = LOAD + 0x100
    struct.pack_into("<16sHHIIIIIHHHHHH", img, 0, b"\x7fELF\x01\x01\x01" + bytes(9), 2, 3, 1,
                     entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)
    struct.pack_into("<8I", img, 52, 1, 0, LOAD, LOAD, len(img), len(img), 7, 0x1000)
    magic, flags = 0x1BADB002, 0
    struct.pack_into("<III", img, 0x80, magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    code = _code(levels)
    img[0x100 : 0x100 + len(code)] = code
    for pa, raw in _tables(levels).items():
        struct.pack_into("<Q", img, pa - LOAD, raw)
    return bytes(img)


def info_tlb(text: str) -> dict[int, tuple[int, str]]:
    """QEMU ``info tlb`` lines ``VA: PA FLAGS`` -> {va: (pa, flags)}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"([0-9a-f]+): ([0-9a-f]+) (\S+)", line.strip())
        if m:
            out[int(m[1], 16)] = (int(m[2], 16), m[3])
    return out


@pytest.mark.parametrize("levels", [4, 5])
def test_x86_long_mode_guest_tables(tmp_path, levels):
    kernel = tmp_path / "mb.elf"
    kernel.write_bytes(multiboot_elf(levels))
    root = PML5 if levels == 5 else PML4
    cpu = "max" if levels == 5 else "qemu64"  # qemu64 has no LA57
    with qemu_vm("qemu-system-x86_64", "-machine", "q35", "-cpu", cpu,
                 "-kernel", str(kernel)) as vm:
        deadline = time.monotonic() + 20
        while not vm.registers().get("cr0", 0) & (1 << 31):
            assert time.monotonic() < deadline, vm.hmp("info registers")
            time.sleep(0.05)
        vm.qmp.cmd("stop")
        regs = vm.registers()
        path = vm.dump()
        with ElfCore(path) as core:
            assert core.e_machine == 62  # EM_X86_64: QEMU saw long mode (EFER.LMA)
            assert core.cpus[0].cr3 == regs["cr3"] == root
            assert core.cpus[0].cr4 == regs["cr4"]
            # NT_PRSTATUS of a long-mode CPU (HMP prints EIP/ESP in compatibility mode)
            assert core.cpus[0].regs["rip"] == regs["eip"] > LOAD
            assert core.cpus[0].regs["rsp"] == regs["esp"]
            # the tables as QEMU's guest RAM holds them (the CPU's walks set A/D bits)
            ad = ACC | 0x40
            for pa, raw in _tables(levels).items():
                assert core.read_u64(pa) & ~ad == raw & ~ad, hex(pa)
            assert core.read_u64(root) & ACC  # the code's own fetches walked entry 0

        # paging=true: QEMU writes one PT_LOAD per virtual mapping, aliasing PAs (both PML4
        # entries 256 and 511 reach the same PDPT) and leaving out unmapped RAM
        paged = vm.rundir / "paged.elf"
        vm.qmp.cmd("dump-guest-memory", paging=True, protocol=f"file:{paged}")
        with ElfCore(paged) as pcore, ElfCore(path) as core:
            pas = [ld.paddr for ld in pcore.loads]
            assert len(pas) > len(set(pas))  # aliases present
            assert KVA in {ld.vaddr for ld in pcore.loads}
            assert pcore.ranges() == [(0, 0x40_0000), (0x60_0000, 0x80_0000)]
            rng = np.random.default_rng(3)
            for s, e in pcore.ranges():
                for pa in [*_tables(levels), *(int(x) & ~7 for x in rng.integers(s, e - 8, 200))]:
                    if s <= pa < e:
                        assert pcore.read_u64(pa) == core.read_u64(pa), hex(pa)

        def cli(*argv: str) -> tuple[int, str]:
            out, err = io.StringIO(), io.StringIO()
            code = main([*argv, "--elf", str(path)], out=out, err=err)
            assert code in (0, 1), err.getvalue()
            return code, out.getvalue()

        code, out = cli("info")
        assert f"format: x86_64-{levels}level" in out and f"root: {root:#x}" in out, out
        # translate vs QEMU's own walker (gva2gpa)
        vas = [0x1234, KVA + 0x1_2345, KVA + 0x20_0008, KVA + 0x20_1ff8, KVA + 0x20_3010,
               KVA + 0x60_0000 + 0x1F_FFF8, 0xFFFF_8000_0000_0000 + (510 << 30) + 0x40,
               KVA + 0x20_2000, KVA + 0x40_0000, 0x4000_0000]
        for va in vas:
            code, out = cli("translate", hex(va))
            qemu = vm.hmp(f"gva2gpa {va:#x}")
            if "gpa:" in qemu:
                want = int(qemu.split("gpa:")[1].split()[0], 16)
                assert code == 0 and f"=> PA {want:#x} " in out, (hex(va), qemu, out)
            else:
                assert code == 1 and "fault" in out, (hex(va), qemu, out)
        # every leaf page of the walk vs QEMU's info tlb (VA -> PA, W and NX bits)
        code, out = cli("walk")
        ours = {}
        for line in out.splitlines():
            if line.startswith("#"):
                continue
            f = line.split()
            va, pa, count = int(f[0].split("-")[0], 16), int(f[3], 16), int(f[4])
            size = {"4K": 1 << 12, "2M": 1 << 21, "1G": 1 << 30}[f[6]]
            rw, nx = "rw" in f[8:], "nx" in f[8:]
            for i in range(count):
                ours[va + i * size] = (pa + i * size, rw, nx)
        tlb = info_tlb(vm.hmp("info tlb"))
        assert len(tlb) >= 9
        assert {va: (pa, "W" in fl, fl[0] == "X") for va, (pa, fl) in tlb.items()} == ours
        code, out = cli("wx")
        assert code == 1 and f"{KVA + 0x20_4000:#018x}" in out
        # the format's decode of the hand-encoded entries says what the SDM bits say, and what
        # the walk (checked against info tlb above) printed for that page
        f4 = by_name("x86_64-4level")
        big = f4.decode(_tables()[PD_HI], 1)
        assert (big.oa, big.attrs.global_, big.attrs.writable, big.attrs.exec) == (
            0x20_0000, True, True, False)
        pte = f4.decode(_tables()[PT + 8], 0)  # 0x30_1000 | P | RW | NX
        assert (pte.oa, pte.attrs.present, pte.attrs.writable, pte.attrs.user,
                pte.attrs.exec) == (0x30_1000, True, True, False, False)
        assert ours[KVA + 0x20_1000] == (pte.oa, pte.attrs.writable, not pte.attrs.exec)

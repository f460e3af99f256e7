"""The 5-level entry of the uncompressed vmlinux (ptharness.image_entry): its code as binutils'
objdump reads it, its page tables walked by hand, the setup header it keeps and changes, and
bad inputs. (Booting it is the x86_64-la57 profile's real-guest tests.)"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from ptharness import image as image_mod
from ptharness.image_elf import ElfError
from ptharness.image_entry import (
    PAYLOAD_BASE,
    entry_code,
    entry_payload,
    la57_entry_image,
    setup_code,
    vmlinux_entry,
)

ENTRY = 0x1000000


def objdump(code: bytes, machine: str, start: int, tmp_path) -> list[str]:
    """``mnemonic operands`` lines of ``code`` (loaded at PAYLOAD_BASE) from its offset
    ``start`` as objdump disassembles them."""
    if shutil.which("objdump") is None:
        pytest.skip("binutils' objdump is not installed")
    f = tmp_path / "code.bin"
    f.write_bytes(code)
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", machine, f"--start-address={PAYLOAD_BASE + start}",
         f"--adjust-vma={PAYLOAD_BASE:#x}", str(f)],
        capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].strip().endswith(":"):
            lines.append(" ".join(parts[2].split()))
    return lines


def test_entry_code_as_objdump_reads_it(tmp_path):
    code = entry_code(ENTRY)
    far = code.index(b"\xea")
    protected = objdump(code[:far + 7], "i386", 0, tmp_path)
    assert protected == [
        "cli", "cld",
        "orb $0x2,0x211(%esi)",  # boot_params.hdr.loadflags |= KASLR_FLAG
        f"lgdtl {PAYLOAD_BASE + 0xF0:#x}",
        "mov %cr4,%eax", "or $0x1020,%eax", "mov %eax,%cr4",  # PAE | LA57
        f"mov ${PAYLOAD_BASE + 0x1000:#x},%eax", "mov %eax,%cr3",  # the PML5 table
        "mov $0xc0000080,%ecx", "rdmsr", "bts $0x8,%eax", "wrmsr",  # EFER.LME
        "mov %cr0,%eax", "or $0x80000001,%eax", "mov %eax,%cr0",
        f"ljmp $0x10,${PAYLOAD_BASE + far + 7:#x}",
    ]
    long = objdump(code, "i386:x86-64", far + 7, tmp_path)
    assert long == [
        "mov $0x18,%eax", "mov %eax,%ds", "mov %eax,%es", "mov %eax,%ss", "mov %eax,%fs",
        "mov %eax,%gs", "mov %esi,%esi", f"mov ${ENTRY:#x},%eax", "jmp *%rax",
    ]
    assert b"\x80\x8e" not in entry_code(ENTRY, kaslr=False)


def table_walk(payload: bytes, va: int) -> int | None:
    """PA of ``va`` through the payload's 5-level tables (None where not mapped)."""
    def entry(table_pa: int, index: int) -> int:
        off = table_pa - PAYLOAD_BASE + 8 * index
        assert 0 <= off < len(payload), f"table at {table_pa:#x} is outside the payload"
        return int(struct.unpack_from("<Q", payload, off)[0])

    table = PAYLOAD_BASE + 0x1000
    for shift in (48, 39, 30, 21):
        e = entry(table, (va >> shift) & 511)
        if not e & 1:
            return None
        if e & 0x80:
            assert shift == 21, "only 2 MiB leaves"
            return (e & 0x000F_FFFF_FFE0_0000) | (va & 0x1F_FFFF)
        table = e & 0x000F_FFFF_FFFF_F000
    raise AssertionError("no leaf")


def test_page_tables_map_the_low_4GiB_one_to_one():
    p = entry_payload(ENTRY)
    for va in (0, 0x1234, PAYLOAD_BASE, ENTRY, 0x3FFF_FFFF, 0x4000_0000, 0xFFFF_FFFF,
               0xDEAD_B000):
        assert table_walk(p, va) == va
    assert table_walk(p, 1 << 32) is None  # nothing above
    assert table_walk(p, 1 << 48) is None  # a 57-bit VA only a 5-level walk reaches
    limit, base = struct.unpack_from("<HI", p, 0xF0)
    gdt = struct.unpack_from("<4Q", p, base - PAYLOAD_BASE)
    assert limit == 31 and gdt[2] >> 53 & 1 == 1 and gdt[2] >> 47 & 1 == 1  # L, P: 64-bit CS


def fake_bzimage(*, code32: int = PAYLOAD_BASE, loadflags: int = 1) -> bytes:
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    setup[0x202:0x206] = b"HdrS"
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, code32)
    return bytes(setup) + b"\x90" * 5000  # a "decompressor"


def fake_vmlinux(entry: int = ENTRY, machine: int = 62) -> bytes:
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HH", ehdr, 16, 2, machine)
    struct.pack_into("<Q", ehdr, 24, entry)
    return bytes(ehdr)


def test_entry_image_keeps_the_setup_and_replaces_the_payload():
    bz = fake_bzimage()
    img = la57_entry_image(bz, fake_vmlinux())
    assert img[:0x1F4] == bz[:0x1F4] and img[0x1F8:5 * 512] == bz[0x1F8:5 * 512]
    (syssize,) = struct.unpack_from("<I", img, 0x1F4)
    payload = img[5 * 512:]
    assert payload == entry_payload(ENTRY) and syssize * 16 == len(payload)


@pytest.mark.parametrize("bz, vm, msg", [
    (b"MZ" + b"\0" * 1000, fake_vmlinux(), "no HdrS"),
    (fake_bzimage(loadflags=0), fake_vmlinux(), "not loaded high"),
    (fake_bzimage(code32=0x200000), fake_vmlinux(), "code32_start"),
    (fake_bzimage(), fake_vmlinux(machine=183), "not an x86-64 ELF"),
    (fake_bzimage(), b"\0" * 64, "not an x86-64 ELF"),
    (fake_bzimage(), fake_vmlinux(entry=0xFFFFFFFF81000000), "below 4 GiB"),
])
def test_bad_inputs_are_one_clear_error(bz, vm, msg):
    with pytest.raises(ElfError, match=msg):
        la57_entry_image(bz, vm)


def test_real_kernel_entry():
    """Debian's bzImage and vmlinux of the current x86_64 image: the setup sectors as
    packaged, ``startup_64`` at 16 MiB (LOAD_PHYSICAL_ADDR), the image's entry file."""
    img = image_mod.ensure_image("x86_64", progress=lambda s: None)
    bz, vm = img.kernel.read_bytes(), img.vmlinux.read_bytes()
    assert vmlinux_entry(vm) == ENTRY
    setup = setup_code(bz)
    assert len(setup) == (bz[0x1F1] + 1) * 512
    assert img.la57_entry is not None
    assert img.la57_entry.read_bytes() == la57_entry_image(bz, vm)

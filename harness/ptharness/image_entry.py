"""A 5-level entry into the uncompressed x86 vmlinux, without the bzImage's decompressor.

Linux enables 5-level paging only when it is entered with CR4.LA57 already set
(``check_la57_support()``, arch/x86/kernel/head64.c): the bzImage's decompressor does that
(arch/x86/boot/compressed/head_64.S, pgtable_64.c), the PVH entry does not (it enables long
mode with CR4.PAE only, arch/x86/platform/pvh/head.S). Under TCG the decompressor costs more than
the rest of the boot (XZ on 6.1, ZSTD on 6.12), so the ``x86_64-la57`` profile boots this
instead:

- ``-kernel``: the bzImage's own real-mode setup (arch/x86/boot: e820 from the firmware, the
  command line and the initrd as QEMU's loader put them into the setup header) with a 32 KiB
  protected-mode payload in place of the compressed kernel. The setup jumps to it
  (``code32_start``, 1 MiB) in 32-bit protected mode with %esi = boot_params, as it would jump
  to the decompressor.
- The payload does what the decompressor does before it hands over, minus decompression and
  choosing a random load address: it builds identity page tables for the low 4 GiB (5 levels,
  2 MiB leaves), sets CR4.PAE|LA57, EFER.LME and CR0.PG, and jumps in 64-bit mode to the
  vmlinux ELF entry (``startup_64``) with %rsi = boot_params: the 64-bit boot protocol of
  Documentation/arch/x86/boot.rst.
- ``-device loader,file=vmlinux``: QEMU puts the ELF's PT_LOAD segments at their physical
  addresses (LOAD_PHYSICAL_ADDR, where the decompressor would put them without KASLR).
- KASLR: the payload sets ``KASLR_FLAG`` in ``boot_params.hdr.loadflags``, as the decompressor
  does when KASLR is on (it also does when it happens to keep the default address): the kernel
  then randomises its memory regions (direct map, vmalloc, vmemmap bases, arch/x86/mm/kaslr.c)
  and module load offsets as on the bzImage boot. The kernel image itself stays at its link
  address (``Kernel Offset: 0x0``).
"""

from __future__ import annotations

import struct

from .image_elf import ElfError

PAYLOAD_BASE = 0x100000  # code32_start: where QEMU's loader puts the protected-mode payload
SETUP_SECTS = 0x1F1  # setup header fields (Documentation/arch/x86/boot.rst)
SYSSIZE = 0x1F4
HDR_MAGIC = 0x202
LOADFLAGS = 0x211
CODE32_START = 0x214
KASLR_FLAG = 0x02
LOADED_HIGH = 0x01

# payload layout (offsets from PAYLOAD_BASE)
GDT_DESC = 0xF0
GDT = 0x100
PML5 = 0x1000
P4D = 0x2000
PUD = 0x3000
PMDS = 0x4000  # four tables: 0-4 GiB in 2 MiB leaves
PAYLOAD_SIZE = PMDS + 4 * 0x1000

BOOT_CS = 0x10  # the selectors of the setup's boot GDT (and of ours): __BOOT_CS, __BOOT_DS
BOOT_DS = 0x18
TABLE = 0x003  # present | writable
LEAF_2M = 0x083  # present | writable | page size

MSR_EFER = 0xC0000080
EFER_LME_BIT = 8
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR0_PE_PG = 0x80000001


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def entry_code(entry: int, *, kaslr: bool = True) -> bytes:
    """The payload's code at PAYLOAD_BASE: 32-bit protected mode in, 64-bit ``startup_64`` out."""
    if not 0 < entry < 1 << 32:
        raise ElfError(f"vmlinux entry {entry:#x} is not a physical address below 4 GiB")
    code = bytearray()
    code += b"\xfa\xfc"  # cli; cld
    if kaslr:
        code += b"\x80\x8e" + _u32(LOADFLAGS) + bytes([KASLR_FLAG])  # orb $2, 0x211(%esi)
    code += b"\x0f\x01\x15" + _u32(PAYLOAD_BASE + GDT_DESC)  # lgdt GDT_DESC
    code += b"\x0f\x20\xe0"  # mov %cr4, %eax
    code += b"\x0d" + _u32(CR4_PAE | CR4_LA57)  # or $(PAE|LA57), %eax
    code += b"\x0f\x22\xe0"  # mov %eax, %cr4 (LA57 may change while paging is off)
    code += b"\xb8" + _u32(PAYLOAD_BASE + PML5)  # mov $PML5, %eax
    code += b"\x0f\x22\xd8"  # mov %eax, %cr3
    code += b"\xb9" + _u32(MSR_EFER)  # mov $MSR_EFER, %ecx
    code += b"\x0f\x32"  # rdmsr
    code += b"\x0f\xba\xe8" + bytes([EFER_LME_BIT])  # bts $LME, %eax
    code += b"\x0f\x30"  # wrmsr
    code += b"\x0f\x20\xc0"  # mov %cr0, %eax
    code += b"\x0d" + _u32(CR0_PE_PG)  # or $(PE|PG), %eax
    code += b"\x0f\x22\xc0"  # mov %eax, %cr0: IA-32e mode, compatibility submode
    far = len(code) + 7
    code += b"\xea" + _u32(PAYLOAD_BASE + far) + struct.pack("<H", BOOT_CS)  # ljmp to 64-bit
    # 64-bit mode from here
    code += b"\xb8" + _u32(BOOT_DS)  # mov $BOOT_DS, %eax
    for sreg_modrm in (0xD8, 0xC0, 0xD0, 0xE0, 0xE8):  # mov %eax, %ds/%es/%ss/%fs/%gs
        code += bytes([0x8E, sreg_modrm])
    code += b"\x89\xf6"  # mov %esi, %esi: %rsi = boot_params, upper half cleared
    code += b"\xb8" + _u32(entry)  # mov $entry, %eax (zero-extends into %rax)
    code += b"\xff\xe0"  # jmp *%rax
    assert len(code) <= GDT_DESC
    return bytes(code)


def entry_payload(entry: int, *, kaslr: bool = True) -> bytes:
    """The whole protected-mode payload: code, GDT and the 5-level identity tables."""
    p = bytearray(PAYLOAD_SIZE)
    code = entry_code(entry, kaslr=kaslr)
    p[:len(code)] = code
    gdt = [0, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF]  # null, null, 64-bit code, data
    struct.pack_into("<HI", p, GDT_DESC, 8 * len(gdt) - 1, PAYLOAD_BASE + GDT)
    struct.pack_into(f"<{len(gdt)}Q", p, GDT, *gdt)
    struct.pack_into("<Q", p, PML5, PAYLOAD_BASE + P4D | TABLE)
    struct.pack_into("<Q", p, P4D, PAYLOAD_BASE + PUD | TABLE)
    for i in range(4):
        struct.pack_into("<Q", p, PUD + 8 * i, PAYLOAD_BASE + PMDS + 0x1000 * i | TABLE)
        for j in range(512):
            pa = ((i << 9) + j) << 21
            struct.pack_into("<Q", p, PMDS + 0x1000 * i + 8 * j, pa | LEAF_2M)
    return bytes(p)


def setup_code(bzimage: bytes) -> bytes:
    """The bzImage's real-mode part: boot sector and setup sectors."""
    if len(bzimage) < 0x260 or bzimage[HDR_MAGIC:HDR_MAGIC + 4] != b"HdrS":
        raise ElfError("not a bzImage (no HdrS setup header)")
    if not bzimage[LOADFLAGS] & LOADED_HIGH:
        raise ElfError("the bzImage's protected-mode code is not loaded high")
    (code32,) = struct.unpack_from("<I", bzimage, CODE32_START)
    if code32 != PAYLOAD_BASE:
        raise ElfError(f"the bzImage's code32_start is {code32:#x}, not {PAYLOAD_BASE:#x}")
    sects = bzimage[SETUP_SECTS] or 4
    return bzimage[:(sects + 1) * 512]


def vmlinux_entry(vmlinux: bytes) -> int:
    """The ELF entry (``e_entry``: ``startup_64``'s physical address) of an x86-64 vmlinux."""
    if len(vmlinux) < 64 or vmlinux[:5] != b"\x7fELF\x02" or vmlinux[18:20] != b"\x3e\x00":
        raise ElfError("not an x86-64 ELF vmlinux")
    return int(struct.unpack_from("<Q", vmlinux, 24)[0])


def la57_entry_image(bzimage: bytes, vmlinux: bytes, *, kaslr: bool = True) -> bytes:
    """The ``-kernel`` file of the 5-level entry: setup sectors + :func:`entry_payload`."""
    setup = bytearray(setup_code(bzimage))
    payload = entry_payload(vmlinux_entry(vmlinux), kaslr=kaslr)
    struct.pack_into("<I", setup, SYSSIZE, (len(payload) + 15) // 16)
    return bytes(setup) + payload

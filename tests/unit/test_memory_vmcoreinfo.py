"""VMCOREINFO parsing and the kernel-root rules (__pa_symbol on x86-64 and arm64)."""

from __future__ import annotations

import pytest
from ptlab.memory import MemoryError_, VmcoreInfo, VmcoreInfoError

X86 = """OSRELEASE=6.1.0-56-amd64
BUILD-ID=0123abcd
PAGESIZE=4096
SYMBOL(init_uts_ns)=ffffffffa5a136a0
OFFSET(uts_namespace.name)=0
SYMBOL(swapper_pg_dir)=ffffffffa560a000
SIZE(page)=64
OFFSET(page.flags)=0
LENGTH(zone.free_area)=11
NUMBER(NR_FREE_PAGES)=0
NUMBER(PG_head_mask)=65536
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
NUMBER(phys_base)=436207616
SYMBOL(init_top_pgt)=ffffffffa560a000
NUMBER(pgtable_l5_enabled)=1
KERNELOFFSET=23e00000
NUMBER(KERNEL_IMAGE_SIZE)=1073741824
NUMBER(sme_mask)=0
CONFIG_KALLSYMS=y
"""

ARM64 = """OSRELEASE=6.1.0-56-arm64
PAGESIZE=4096
SYMBOL(swapper_pg_dir)=ffff80000a3a1000
NUMBER(VA_BITS)=48
NUMBER(kimage_voffset)=0xffff7fffc7e00000
NUMBER(PHYS_OFFSET)=0x40000000
NUMBER(TCR_EL1_T1SZ)=0x10
KERNELOFFSET=2000000
NUMBER(KERNELPACMASK)=0xff7f000000000000
"""


def test_x86_typed_access_and_root():
    v = VmcoreInfo(X86)
    assert v.osrelease == "6.1.0-56-amd64" and v.page_size == 4096
    assert v.symbol("init_top_pgt") == 0xFFFFFFFFA560A000
    assert v.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129
    assert v.number("phys_base") == 436207616 == 0x1A000000
    assert v.size("page") == 64 and v.length("zone.free_area") == 11
    assert v.offset("uts_namespace", "name") == 0
    assert v.kernel_offset == 0x23E00000 and v.config("KALLSYMS")
    assert v.arch == "x86_64" and v.pgtable_l5_enabled is True
    # __pa_symbol: VA - __START_KERNEL_map + phys_base
    assert v.kernel_root() == 0xFFFFFFFFA560A000 - 0xFFFFFFFF80000000 + 0x1A000000
    assert v.kernel_root() == 0x3F60A000
    assert v.value("KERNELOFFSET") == 0x23E00000
    assert v.value("NUMBER(KERNEL_IMAGE_SIZE)") == 1 << 30


def test_arm64_hex_numbers_and_root():
    v = VmcoreInfo(ARM64.encode() + b"\0\0\0")  # note desc padding
    assert v.arch == "arm64"
    assert v.number("kimage_voffset") == 0xFFFF7FFFC7E00000
    assert v.va_bits == 48 and v.tcr_el1_t1sz == 16 and v.kernel_va_bits == 48
    assert v.pgtable_l5_enabled is None
    assert v.kernel_root() == 0xFFFF80000A3A1000 - 0xFFFF7FFFC7E00000 == 0x425A1000


def test_t1sz_overrides_va_bits():
    v = VmcoreInfo(ARM64.replace("VA_BITS)=48", "VA_BITS)=52").replace("=0x10", "=0xc"))
    assert v.va_bits == 52 and v.kernel_va_bits == 52
    v = VmcoreInfo(ARM64.replace("VA_BITS)=48", "VA_BITS)=52"))
    assert v.kernel_va_bits == 48  # 52-bit build on hardware without LVA: T1SZ 16


def test_missing_and_malformed():
    v = VmcoreInfo("OSRELEASE=x\ngarbage line\nNUMBER(bad)=12zz\n\n")
    assert v.malformed == ["garbage line"]
    with pytest.raises(VmcoreInfoError, match=r"no SYMBOL\(init_top_pgt\)") as e:
        v.symbol("init_top_pgt")
    assert isinstance(e.value, MemoryError_)
    with pytest.raises(VmcoreInfoError, match="not a number"):
        v.number("bad")
    assert v.arch is None
    with pytest.raises(VmcoreInfoError, match="which architecture"):
        v.kernel_root()


def test_root_sanity_checked():
    bad = X86.replace("NUMBER(phys_base)=436207616", "NUMBER(phys_base)=5")
    with pytest.raises(VmcoreInfoError, match="not a table address"):
        VmcoreInfo(bad).kernel_root()


def test_real_figures_from_debian_6_1_guests():
    """Values read from real Debian 6.1 guests under QEMU 7.2 (KASLR on): the x86 kernel had
    a negative phys_base and CR3 == 0xaa10000; on arm64 the walk from the derived root agreed
    with QEMU's gva2gpa."""
    x86 = VmcoreInfo("OSRELEASE=6.1.0-56-amd64\nNUMBER(phys_base)=-587202560\n"
                     "SYMBOL(init_top_pgt)=ffffffffada10000\nNUMBER(pgtable_l5_enabled)=0\n"
                     "KERNELOFFSET=2b000000\n")
    assert x86.number("phys_base") == -0x23000000
    assert x86.kernel_root() == 0xAA10000
    arm = VmcoreInfo("OSRELEASE=6.1.0-56-arm64\nPAGESIZE=4096\n"
                     "SYMBOL(swapper_pg_dir)=ffffcdd7a5c58000\nNUMBER(VA_BITS)=48\n"
                     "NUMBER(kimage_voffset)=0xffffcdd764400000\nNUMBER(TCR_EL1_T1SZ)=0x10\n"
                     "KERNELOFFSET=4dd79c600000\n")
    assert arm.kernel_root() == 0x41858000 and arm.kernel_va_bits == 48

"""ptlab.arch: the per-architecture registry, its rules, and that nobody else branches on an
architecture name."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from ptlab.arch import (
    END,
    ArchError,
    ArchOps,
    all_arches,
    arch_for,
    arch_for_elf,
    kernel_root,
    vmcoreinfo_arch,
)
from ptlab.formats.base import Entry, Kind
from ptlab.formats.catalog import all_configs, by_name
from ptlab.memory import SparseMemory, VmcoreInfo

CONFIGS = all_configs()
IDS = [f.name for f in CONFIGS]
ROOT = Path(__file__).resolve().parents[2]
# Arm ARM D17.2.131 TCR_EL1: TG1 encodings, written here independently of ptlab.arch.
TG1 = {4096: 0b10, 16384: 0b01, 65536: 0b11}

X86_VMCI = ("OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=0x1a000000\n"
            "SYMBOL(init_top_pgt)=ffffffff8260a000\nNUMBER(pgtable_l5_enabled)=0\n")
ARM64_VMCI = ("OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(VA_BITS)=48\n"
              "SYMBOL(swapper_pg_dir)=ffff80000a3a1000\nNUMBER(kimage_voffset)=0xffff7fffc7e00000\n"
              "NUMBER(PHYS_OFFSET)=0x40000000\nNUMBER(TCR_EL1_T1SZ)=0x10\n")


# --- the registry --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CONFIGS, ids=IDS)
def test_every_format_has_its_arch_and_level_names(fmt):
    ops = arch_for(fmt)
    assert isinstance(ops, ArchOps) and ops.name == fmt.arch and ops is arch_for(fmt.arch)
    assert fmt.name in {f.name for f in ops.formats()}
    names = [fmt.level_name(lvl) for lvl in range(fmt.levels)]
    assert names[0] == "pte" and names[-1] == "pgd" and len(set(names)) == fmt.levels
    # the kernel folds missing levels top-down: pmd exists from 3 levels, pud from 4, p4d at 5
    expected = {2: ["pte", "pgd"], 3: ["pte", "pmd", "pgd"], 4: ["pte", "pmd", "pud", "pgd"],
                5: ["pte", "pmd", "pud", "p4d", "pgd"]}[fmt.levels]
    assert names == expected
    from ptlab.walk import level_name
    assert [level_name(fmt, lvl) for lvl in range(fmt.levels)] == names
    with pytest.raises(ValueError):
        fmt.level_name(fmt.levels)


def test_registry_lists_each_arch_once():
    names = [ops.name for ops in all_arches()]
    assert sorted(names) == sorted({f.arch for f in CONFIGS}) == ["arm64", "x86_64"]
    machines = [m for ops in all_arches() for m in ops.elf_machines]
    assert len(machines) == len(set(machines))
    assert arch_for_elf(62).name == "x86_64" and arch_for_elf(183).name == "arm64"  # elf-em.h
    assert arch_for_elf(40) is None
    with pytest.raises(ArchError, match="unknown architecture 'sparc'"):
        arch_for("sparc")
    with pytest.raises(ArchError):
        arch_for(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("ops", all_arches(), ids=lambda o: o.name)
def test_prstatus_layout_fits(ops):
    # pr_reg starts at offset 112 of struct elf_prstatus and holds one u64 per register
    assert 112 + 8 * len(ops.prstatus_regs) <= ops.prstatus_size
    assert len(set(ops.prstatus_regs)) == len(ops.prstatus_regs)


@pytest.mark.parametrize("fmt", CONFIGS, ids=IDS)
def test_va_halves_agree_with_canonical(fmt):
    ranges = fmt.va_ranges()
    assert sum(e - s for s, e in ranges) == fmt.va_span
    for low in (0, fmt.va_span // 2 - 1, fmt.va_span // 2, fmt.va_span - 1):
        va = fmt.canonical(low)
        assert fmt.covers(va) and va & (fmt.va_span - 1) == low
    assert fmt.va_halves in ("both", "upper", "lower")
    assert fmt.covers((1 << 64) - 1) == (fmt.va_halves != "lower")
    assert fmt.covers(0) == (fmt.va_halves != "upper")


# --- ptdump --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CONFIGS, ids=IDS)
def test_ptdump_markers_ranges_and_depths(fmt):
    ops = arch_for(fmt)
    marks = ops.ptdump_markers(fmt)
    assert marks[-1] == END and all(m.name for m in marks[:-1])
    assert len({m.name for m in marks}) == len(marks)
    # (not sorted: x86 5-level's LDT remap sits after PAGE_OFFSET, as in the kernel's enum)
    lo, hi = fmt.va_ranges()[0][0], fmt.va_ranges()[-1][1]
    assert all(lo <= m.start <= hi for m in marks[:-1]), [hex(m.start) for m in marks]
    for s, e in ops.ptdump_ranges(fmt):
        assert s < e and any(rs <= s and e <= re_ for rs, re_ in fmt.va_ranges())
    assert ops.ptdump_ranges(fmt)[-1][1] == fmt.va_ranges()[-1][1]  # up to the last page
    names = ops.ptdump_names(fmt)
    assert len(names) == 5
    for level in range(fmt.levels):
        for hole in (False, True):
            assert 0 <= ops.ptdump_depth(fmt, level, hole) <= 4
    assert ops.ptdump_depth(fmt, 0, False) == 4  # a pte is printed at pte depth
    assert ops.ptdump_depth(fmt, fmt.top_level, True) == 0  # real_depth(): holes at pgd


@pytest.mark.parametrize("fmt", CONFIGS, ids=IDS)
def test_ptdump_line_round_trip(fmt):
    ops = arch_for(fmt)
    for level in sorted(fmt.leaf_levels):
        raw = fmt.encode(Entry(Kind.LEAF, 0, fmt.normalize(ops.page_kernel)), level)
        depth = ops.ptdump_depth(fmt, level, False)
        _key, words = ops.ptdump_prot(raw, raw, depth)
        assert words and "RW" in words and "x" not in words  # PAGE_KERNEL: RW, not exec
        name = ops.ptdump_names(fmt)[depth]
        va = fmt.va_ranges()[-1][0]
        line = ops.ptdump_line(va, va + fmt.entry_size(level), words, name)
        assert line.startswith(f"0x{va:016x}-0x{va + fmt.entry_size(level):016x}   ")
        assert ops.ptdump_words(line.split()[2:]) == (name, words)
        assert ops.ptdump_size_text(fmt.entry_size(level)).strip() == line.split()[1]
    others = [o for o in all_arches() if o is not ops]
    hole = ops.ptdump_line(0, 1 << 30, (), ops.ptdump_names(fmt)[0])
    assert all(o.ptdump_words(hole.split()[2:]) is None for o in others)


def test_wx_rules():
    run = SimpleNamespace
    w = run(size=8192, attrs=SimpleNamespace(writable=True, exec=True, uexec=False), own=None)
    ux = run(size=4096, attrs=SimpleNamespace(writable=False, exec=False, uexec=True),
             own=None)
    x86, arm = arch_for("x86_64"), arch_for("arm64")
    c = x86.wx_count([w, ux], 4096)
    assert (c.wx_pages, c.uxn_pages, c.runs) == (2, 0, [w])
    assert x86.wx_message(c) == "x86/mm: Checked W+X mappings: FAILED, 2 W+X pages found."
    c = arm.wx_count([w, ux], 4096)
    assert (c.wx_pages, c.uxn_pages) == (2, 1)
    assert arm.wx_message(c) == ("Checked W+X mappings: FAILED, 2 W+X pages found, "
                                 "1 non-UXN pages found")
    assert arm.wx_message(arm.wx_count([], 4096)) == \
        "Checked W+X mappings: passed, no W+X pages found"
    # arm64 judges the leaf's own bits (a PXNTable above does not hide it), x86 effective ones
    hidden = run(size=4096, attrs=SimpleNamespace(writable=True, exec=False, uexec=False),
                 own=SimpleNamespace(writable=True, exec=True, uexec=False))
    assert arm.wx_count([hidden], 4096).wx_pages == 1
    assert x86.wx_count([hidden], 4096).wx_pages == 0


# --- VMCOREINFO and registers ----------------------------------------------------------------
def test_vmcoreinfo_roots():
    x86, arm = VmcoreInfo(X86_VMCI), VmcoreInfo(ARM64_VMCI)
    assert vmcoreinfo_arch(x86).name == "x86_64" and vmcoreinfo_arch(arm).name == "arm64"
    assert vmcoreinfo_arch(VmcoreInfo("OSRELEASE=x\n")) is None
    # x86 __pa_symbol: VA - __START_KERNEL_map + phys_base
    assert kernel_root(arch_for("x86_64"), x86) == (0x0260A000 + 0x1A000000,
                                                    "VMCOREINFO init_top_pgt")
    # arm64 __kimg_to_phys: VA - kimage_voffset
    assert kernel_root(arch_for("arm64"), arm)[0] == 0xFFFF80000A3A1000 - 0xFFFF7FFFC7E00000
    with pytest.raises(ArchError, match="no VMCOREINFO and no registers"):
        kernel_root(arch_for("arm64"))


def test_x86_registers():
    ops = arch_for("x86_64")
    cr3 = (1 << 63) | 0x1234_4000 | 0x005  # NOFLUSH and a PCID around the PGD
    root, why = ops.root_from_registers({"cr0": 0x8005_0033, "cr3": cr3}, "CPU 1")
    assert root == 0x1234_4000 and why.startswith("CPU 1 CR3") and "PTI" not in why
    root, why = ops.root_from_registers({"cr3": 0x1234_5000})
    assert root == 0x1234_5000 and "user PGD" in why  # bit 12: PTI's user half
    with pytest.raises(ArchError, match="paging is off"):
        ops.root_from_registers({"cr0": 0x11, "cr3": 0x1000})
    assert ops.format_from({"cr4": 1 << 12}, None)[0].name == "x86_64-5level"  # CR4.LA57
    assert ops.format_from({"cr4": 0}, None)[0].name == "x86_64-4level"
    fmt, why = ops.format_from(None, VmcoreInfo(X86_VMCI))
    assert fmt.name == "x86_64-4level" and "pgtable_l5_enabled" in why
    with pytest.raises(ArchError, match="LA57=True but VMCOREINFO pgtable_l5_enabled=False"):
        ops.format_from({"cr4": 1 << 12}, VmcoreInfo(X86_VMCI), "vCPU")
    assert ops.user_regime({"cr3": 0x5000 | 0x1000}, 0x4000)
    assert not ops.user_regime({"cr3": 0x4000}, 0x4000)


def test_x86_check_root_compares_the_kernel_half():
    ops = arch_for("x86_64")
    mem = SparseMemory(1 << 20)
    init, mm = 0x10000, 0x20000
    for pgd in (init, mm):
        mem.write_u64(pgd + 8 * 300, 0x3000 | 0x63)  # the same kernel pgd entry
    mem.write_u64(mm + 8 * 5, 0x4000 | 0x67)  # a user entry only the process has
    ops.check_root({"cr3": init}, init, mem, isolation=False)
    ops.check_root({"cr3": mm | 7}, init, mem, isolation=False)  # another mm: same kernel half
    ops.check_root({"cr3": init | 0x1000}, init, mem, isolation=True)  # PTI user PGD
    mem.write_u64(mm + 8 * 511, 0x5000 | 0x63)
    with pytest.raises(ArchError, match="disagree on the kernel half"):
        ops.check_root({"cr3": mm}, init, mem, isolation=False)

    def vmci(pgd: int) -> VmcoreInfo:
        return VmcoreInfo(X86_VMCI.replace("1a000000", "0").replace(
            "ffffffff8260a000", f"{0xFFFFFFFF80000000 + pgd:x}"))

    mem.write_u64(mm + 8 * 511, 0)
    root, why = kernel_root(ops, vmci(init), {"cr3": mm}, mem=mem)
    assert (root, why) == (init, "VMCOREINFO init_top_pgt")  # checked against CR3's table
    with pytest.raises(ArchError, match="disagree"):  # an empty table is not init_top_pgt
        kernel_root(ops, vmci(0x30000), {"cr3": mm}, mem=mem)


@pytest.mark.parametrize("fmt", [f for f in CONFIGS if f.arch == "arm64" and f.upper],
                         ids=lambda f: f.name)
def test_arm64_format_from_tcr(fmt):
    ops = arch_for(fmt)
    t1sz = 64 - fmt.va_bits
    tcr = TG1[fmt.table_bytes] << 30 | t1sz << 16 | 0x19  # T0SZ etc. below
    assert ops.format_from({"tcr_el1": tcr}, None)[0] is fmt
    vmci = VmcoreInfo(f"PAGESIZE={fmt.table_bytes}\nNUMBER(TCR_EL1_T1SZ)={t1sz}\n"
                      "NUMBER(kimage_voffset)=0x0\n")
    assert ops.format_from({"tcr_el1": tcr}, vmci)[0] is fmt
    assert ops.format_from(None, vmci)[0] is fmt
    other = (t1sz + 1) if t1sz < 39 else (t1sz - 1)
    with pytest.raises(ArchError, match="VMCOREINFO says"):
        ops.format_from({"tcr_el1": tcr & ~(0x3F << 16) | other << 16}, vmci)


def test_arm64_registers():
    ops = arch_for("arm64")
    with pytest.raises(ArchError, match="reserved TG1"):
        ops.format_from({"tcr_el1": 0}, None)
    with pytest.raises(ArchError, match="without VMCOREINFO"):
        ops.format_from({}, None)
    ttbr1 = (0x42 << 48) | 0x4123_4000 | 1  # ASID and CnP around swapper_pg_dir
    assert ops.root_from_registers({"ttbr1_el1": ttbr1})[0] == 0x4123_4000
    ops.check_root({"ttbr1_el1": ttbr1}, 0x4123_4000, None, isolation=False)
    tramp = {"ttbr1_el1": 0x4123_2000}  # KPTI at EL0: tramp_pg_dir, two pages below
    ops.check_root(tramp, 0x4123_4000, None, isolation=True)
    assert ops.user_regime(tramp, 0x4123_4000)
    with pytest.raises(ArchError, match="is not swapper_pg_dir"):
        ops.check_root(tramp, 0x4123_4000, None, isolation=False)


def test_direct_maps():
    arm = arch_for("arm64")
    base, phys = arm.direct_map(lambda: VmcoreInfo(ARM64_VMCI), None)
    assert (base, phys) == (0xFFFF_0000_0000_0000, 0x4000_0000)  # -(1 << 48), PHYS_OFFSET
    x86 = arch_for("x86_64")
    asked = []
    base, phys = x86.direct_map(None, lambda name: asked.append(name) or 0xFFFF_9000_0000_0000)
    assert (base, phys, asked) == (0xFFFF_9000_0000_0000, 0, ["page_offset_base"])
    assert x86.linear_map_base(by_name("x86_64-4level")) == 0xFFFF_8880_0000_0000
    assert arm.linear_map_base(by_name("arm64-4k-39")) == (1 << 64) - (1 << 39)


def test_harness_uses_the_registry():
    from ptharness import scenarios
    from ptharness.profiles import BOARDS, PROFILES

    assert set(BOARDS) == {ops.name for ops in all_arches()}
    assert {p.arch for p in PROFILES.values()} == set(BOARDS)
    g = SimpleNamespace(profile=PROFILES["arm64"], vmcoreinfo=lambda: VmcoreInfo(ARM64_VMCI))
    assert scenarios.direct_map(g).va(0x4000_0000) == 0xFFFF_0000_0000_0000
    assert scenarios.in_user_regime(g, {"ttbr1_el1": 0x4000_1000}, 0x4000_3000)
    g = SimpleNamespace(profile=PROFILES["x86_64-pti"])
    assert scenarios.in_kernel_regime(g, {"cr3": 0x4000}, 0x4000)  # no EL to ask on x86
    assert not scenarios.in_kernel_regime(g, {"cr3": 0x5000}, 0x4000)


def test_no_arch_name_branches_outside_the_arch_modules():
    """The issue's rule: outside ptlab.arch (and the entry codecs) nothing compares with an
    architecture name; per-arch harness facts are table lookups."""
    pattern = re.compile(r'(==|!=) ?"(x86_64|arm64|aarch64|amd64)"|'
                         r'"(x86_64|arm64|aarch64|amd64)" ?(==|!=)|'
                         r'in \(("(x86_64|arm64|aarch64|amd64)",? ?)+\)')
    allowed = {ROOT / "pylib/ptlab/formats/x86.py", ROOT / "pylib/ptlab/formats/arm64.py"}
    hits = []
    for top in ("pylib", "harness", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path in allowed or (ROOT / "pylib/ptlab/arch") in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# --- arm64 kernel layouts: Debian's 6.1 (48-bit) and 6.12 (52-bit LPA2) ----------------------
def test_arm64_layout_generations():
    from ptlab.arch import arm64

    old = arm64.layout(48, 12)  # 6.1, written out from memory.h / pgtable.h by hand
    assert (old["MODULES_VADDR"], old["MODULES_END"]) == (0xFFFF_8000_0000_0000,
                                                          0xFFFF_8000_0800_0000)
    assert old["VMEMMAP_START"] == 0xFFFF_FC00_0000_0000
    assert old["FIXADDR_TOP"] == 0xFFFF_FBFF_FE00_0000
    assert arm64.layout(48, 12, top_vmemmap=False) == old
    new = arm64.layout(52, 12)  # a 4K 52-bit kernel is LPA2, 6.9+: the new layout
    assert arm64.lpa2_kernel(52, 12) and not arm64.lpa2_kernel(52, 16)
    assert new["PAGE_OFFSET"] == 0xFFF0_0000_0000_0000
    assert (new["MODULES_VADDR"], new["MODULES_END"]) == (0xFFFF_8000_0000_0000,
                                                          0xFFFF_8000_8000_0000)
    # vmemmap covers the 52-bit linear map up to _PAGE_END(48), 64 bytes per 4K page
    assert new["VMEMMAP_END"] == 0xFFFF_FFFF_C000_0000
    assert new["VMEMMAP_START"] == 0xFFFF_FFFF_C000_0000 - ((1 << 52) - (1 << 47)) // 64
    assert (new["PCI_IO_START"], new["FIXADDR_TOP"]) == (0xFFFF_FFFF_C080_0000,
                                                         0xFFFF_FFFF_FF80_0000)
    # NUMBER()s of Debian's 6.12.117 arm64 (VMCOREINFO of a real guest)
    real = {"MODULES_VADDR": 0xFFFF_8000_0000_0000, "MODULES_END": 0xFFFF_8000_8000_0000,
            "VMALLOC_START": 0xFFFF_8000_8000_0000, "VMALLOC_END": 0xFFFF_C1FF_BF80_0000,
            "VMEMMAP_START": 0xFFFF_C1FF_C000_0000, "VMEMMAP_END": 0xFFFF_FFFF_C000_0000}
    assert {k: new[k] for k in real} == real
    ordered = [m.start for m in arm64.markers(52, 12)]
    assert ordered == sorted(ordered)  # ptdump needs ascending markers
    vmci = VmcoreInfo("OSRELEASE=6.12.117+deb12-arm64\nPAGESIZE=4096\nNUMBER(VA_BITS)=52\n" +
                      "".join(f"NUMBER({k})=0x{new[k]:x}\n" for k in arm64.VMCOREINFO_RANGES))
    assert arm64.layout_from_vmcoreinfo(vmci) == new
    assert arm64.layout_from_vmcoreinfo(VmcoreInfo(ARM64_VMCI)) == old  # no ranges: formula
    vmci = VmcoreInfo(ARM64_VMCI + "NUMBER(VMEMMAP_END)=0xffffffffc0000000\n"
                      "NUMBER(MODULES_END)=0xffff800008000000\n")  # 6.9+ vmemmap, 6.1 modules
    with pytest.raises(ArchError, match="MODULES_END"):
        arm64.layout_from_vmcoreinfo(vmci)


def test_arm64_ttbr_with_52_bit_pa():
    ops = arch_for("arm64")
    # phys_to_ttbr(): PA[51:48] in TTBR bits 5:2; a 128-byte LPA2 pgd (pgd_cache) is fine
    pa = 0x000A_0000_4123_4080
    ttbr = (0x42 << 48) | (pa | pa >> 46) & 0x0000_FFFF_FFFF_FFFC
    assert ops.root_from_registers({"ttbr1_el1": ttbr})[0] == pa


def test_ttbr0_formats_by_name():
    from ptlab.formats.catalog import by_name

    f = by_name("arm64-4k-52-ttbr0")
    assert (f.levels, f.upper, f.va_bits) == (5, False, 52) and by_name(f.name) is f
    assert by_name("arm64-4k-48-ttbr0").va_bits == 48
    for bad in ("x86_64-4level-ttbr0", "arm64-4k-52-ttbr0-ttbr0", "arm64-4k-47-ttbr0"):
        with pytest.raises(ValueError, match="unknown format"):
            by_name(bad)

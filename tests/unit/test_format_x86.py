"""x86-64 format specifics: kernel bit values, indices of kernel VAs, L1TF inversion, anomalies,
the one-NX-bit normalization, effective permissions from RW/US/NX bits.

What every format must satisfy (radix geometry, page sizes, OA 0/max, attribute and raw round
trips, vectorised helpers, table restrictions) is checked in test_format_conformance.py.

Expected raw values are computed by hand from the kernel's definitions
(arch/x86/include/asm/pgtable_types.h, pgtable.h pfn_pte/pte_pfn, pgtable-invert.h,
arch/x86/mm/pat/set_memory.c), not from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from ptlab.formats import EMPTY, Attrs, Entry, FormatError, Kind, combine
from ptlab.formats.x86 import CONFIGS, SW_MASK, SW_NO_PS, X86_64

F4, F5 = X86_64(4), X86_64(5)
BOTH = pytest.mark.parametrize("fmt", [F4, F5], ids=["4level", "5level"])
MAX_PA = 1 << 52

# Kernel constants written out by hand (pgtable_types.h).
PAGE_KERNEL = 0x8000_0000_0000_0163  # P RW A D G NX
PAGE_KERNEL_LARGE_EXEC = 0x1E3  # P RW A D PSE G
KERNPG_TABLE = 0x063  # P RW A D
PAGE_TABLE = 0x067  # P RW US A D
PTE_PFN_MASK = 0x000F_FFFF_FFFF_F000
# A non-present entry with no bit set (NX clear): the only attributes that can encode to 0.
NOTHING = Attrs(present=False, exec=True, uexec=True)


# --- geometry ---------------------------------------------------------------------------------
def test_configs_and_names():
    assert [f.name for f in CONFIGS] == ["x86_64-4level", "x86_64-5level"]
    for f, levels, va_bits in ((F4, 4, 48), (F5, 5, 57)):
        assert (f.arch, f.levels, f.va_bits, f.pa_bits) == ("x86_64", levels, va_bits, 52)
        assert (f.page_shift, f.bits_per_level, f.upper) == (12, 9, False)
    assert [F5.level_name(i) for i in range(5)] == ["pte", "pmd", "pud", "p4d", "pgd"]
    assert F4.level_name(3) == "pgd"
    with pytest.raises(FormatError):
        X86_64(3)


def test_index_of_known_vas():
    # __START_KERNEL_map + 16M (kernel text): pgd 511, pud 510, pmd 8, pte 0.
    va = 0xFFFF_FFFF_8100_0000
    assert [F4.index(va, lvl) for lvl in (3, 2, 1, 0)] == [511, 510, 8, 0]
    # 4-level direct map base 0xffff888000000000: pgd 273 (0x111).
    assert F4.index(0xFFFF_8880_0000_0000, 3) == 0x111
    # 5-level direct map base 0xff11000000000000: pgd 0x111 (bits 56:48), p4d 0.
    assert F5.index(0xFF11_0000_0000_0000, 4) == 0x111
    assert F5.index(0xFF11_0000_0000_0000, 3) == 0
    # A user address: 0x7f12_3456_7000 -> pgd 254, pud 72, pmd 418, pte 359.
    va = 0x7F12_3456_7000
    assert [F4.index(va, lvl) for lvl in (3, 2, 1, 0)] == [
        va >> 39 & 511, va >> 30 & 511, va >> 21 & 511, va >> 12 & 511
    ] == [254, 72, 418, 359]


def test_canonical_and_ranges():
    assert F4.canonical(0x7FFF_FFFF_F000) == 0x7FFF_FFFF_F000
    assert F4.canonical(0x8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert F4.canonical(0xFFFF_FFFF_FFFF) == 0xFFFF_FFFF_FFFF_FFFF
    assert F5.canonical(0x1FF_FFFF_FFFF_FFFF) == (1 << 64) - 1
    assert F5.canonical(0xFF_FFFF_FFFF_FFFF) == 0xFF_FFFF_FFFF_FFFF
    assert F5.canonical(1 << 56) == 0xFF00_0000_0000_0000
    assert F5.canonical(0x8000_0000_0000) == 0x8000_0000_0000  # user half under LA57
    assert F4.va_ranges() == [(0, 1 << 47), (0xFFFF_8000_0000_0000, 1 << 64)]
    assert F5.va_ranges() == [(0, 1 << 56), (0xFF00_0000_0000_0000, 1 << 64)]
    assert F4.covers(0xFFFF_8000_0000_0000) and not F4.covers(0x8000_0000_0000)
    assert F5.covers(0x8000_0000_0000) and not F5.covers(0xFE00_0000_0000_0000)


# --- codec: known kernel values ---------------------------------------------------------------
@BOTH
def test_kernel_entries_decode(fmt):
    pte = fmt.decode(0x1234_5000 | PAGE_KERNEL, 0)
    assert pte == Entry(
        Kind.LEAF, 0x1234_5000,
        Attrs(writable=True, global_=True, accessed=True, dirty=True),
    )
    text = fmt.decode(0x100_0000 | PAGE_KERNEL_LARGE_EXEC, 1)
    assert text.kind is Kind.LEAF and text.oa == 0x100_0000
    assert text.attrs.exec and text.attrs.uexec and text.attrs.writable and text.attrs.global_
    for lvl in range(1, fmt.levels):
        assert fmt.table(0x7000, lvl) == 0x7000 | KERNPG_TABLE
        t = fmt.decode(0x7000 | PAGE_TABLE, lvl)
        assert t == Entry(Kind.TABLE, 0x7000, fmt.table_attrs().with_(user=True))
    assert fmt.decode(0, 0) is EMPTY and fmt.encode(EMPTY, 2) == 0


@BOTH
def test_pat_sw_pkey_placement(fmt):
    base = Attrs(accessed=True)
    assert fmt.leaf(0, base.with_(cache=4), 0) == 0x1 | 0x20 | 0x80 | 1 << 63
    assert fmt.leaf(0, base.with_(cache=4), 1) == 0x1 | 0x20 | 0x80 | 0x1000 | 1 << 63
    assert fmt.leaf(0, base.with_(cache=3), 2) == 0x1 | 0x20 | 0x18 | 0x80 | 1 << 63
    # sw bit i -> bits 9, 10, 11, 52..58
    assert SW_MASK == 0x07F0_0000_0000_0E00
    for i, bit in enumerate((9, 10, 11, 52, 53, 54, 55, 56, 57, 58)):
        raw = fmt.leaf(0x2000, base.with_(sw=1 << i, exec=True), 0)
        assert raw == 0x2000 | 0x21 | 1 << bit
        assert fmt.decode(raw, 0).attrs.sw == 1 << i
    raw = fmt.leaf(0, base.with_(pkey=0b1010, exec=True), 0)
    assert raw == 0x21 | 0b1010 << 59
    # a pte's bit 7 is PAT, not PS: no anomaly, decodes as a 4K leaf with cache bit 2
    assert fmt.anomalies(0x80 | 0x1, 0) == []
    assert fmt.decode(0x81, 0).attrs.cache == 4


# --- L1TF inversion ---------------------------------------------------------------------------
@BOTH
def test_l1tf_secretmem_direct_map_pte(fmt):
    """memfd_secret page: its direct-map pte after set_direct_map_invalid_noflush.

    Present: pfn 0x12345 with PAGE_KERNEL. __set_pages_np clears P|RW (6.1; later kernels
    also clear D), pgprot_clear_protnone_bits clears G, pfn_pte inverts the PFN bits 51:12.
    """
    present = 0x1234_5000 | PAGE_KERNEL
    assert present == 0x8000_0000_1234_5163
    for clear, expected in ((0x103, 0x800F_FFFF_EDCB_A060), (0x143, 0x800F_FFFF_EDCB_A020)):
        flags = PAGE_KERNEL & ~clear
        raw = flags | (~0x1234_5000 & PTE_PFN_MASK)
        assert raw == expected  # written out by hand above
        e = fmt.decode(raw, 0)
        assert e.kind is Kind.LEAF and e.oa == 0x1234_5000
        assert not e.attrs.present and not e.attrs.writable and not e.attrs.global_
        assert e.attrs.accessed and e.attrs.dirty == (clear == 0x103) and not e.attrs.exec
        assert fmt.anomalies(raw, 0) == []
        assert fmt.encode(e, 0) == raw
        # the model's own set_direct_map_invalid: same entry, present/writable cleared
        made = fmt.decode(present, 0)
        made = Entry(Kind.LEAF, made.oa, made.attrs.with_(
            present=False, writable=False, global_=False, dirty=clear == 0x103))
        assert fmt.encode(made, 0) == raw
        assert fmt.oas(np.array([raw, present], np.uint64), 0).tolist() == [0x1234_5000] * 2


@BOTH
def test_l1tf_protnone_and_large(fmt):
    # PROT_NONE user pte: PAGE_NONE = _PAGE_PROTNONE(G) | A; pfn 1 inverted.
    raw = 0x120 | (~0x1000 & PTE_PFN_MASK)
    assert raw == 0x000F_FFFF_FFFF_E120
    e = fmt.decode(raw, 0)
    assert (e.oa, e.attrs.present, e.attrs.global_) == (0x1000, False, True)
    # 2M direct-map leaf made not present by pfn_pmd: inverted with PHYSICAL_PMD_PAGE_MASK.
    raw = 0x8000_0000_0000_00E2 | (~0x4000_0000 & 0x000F_FFFF_FFE0_0000)
    assert raw == 0x800F_FFFF_BFE0_00E2
    e = fmt.decode(raw, 1)
    assert (e.kind, e.oa, e.attrs.present, e.attrs.cache) == (Kind.LEAF, 0x4000_0000, False, 0)
    assert fmt.encode(e, 1) == raw
    # CPA keeping the 2M page (__should_split_large_page) writes pfn_pte(old_pfn, prot):
    # inverted with the 4K mask, so bits 20:12 read back as ones. pmd_pfn still gives the PA;
    # bit 12 reads as PAT_LARGE (as pmd_pgprot sees it) and 20:13 are reported, not kept.
    raw = 0x8000_0000_0000_00E2 | (~0x4000_0000 & PTE_PFN_MASK)
    assert raw == 0x800F_FFFF_BFFF_F0E2
    e = fmt.decode(raw, 1)
    assert (e.kind, e.oa, e.attrs.present, e.attrs.cache) == (Kind.LEAF, 0x4000_0000, False, 4)
    assert any("20:13" in a and "non-present" in a for a in fmt.anomalies(raw, 1))
    assert fmt.oas(np.array([raw], np.uint64), 1)[0] == 0x4000_0000
    # Linux 6.12 PTI, free_kernel_image_pages -> set_memory_np_noalias on a whole 2M page:
    # __should_split_large_page clears _PAGE_PSE with _PAGE_PRESENT (so that pmd_present()
    # stays false) and writes pfn_pte(old_pfn, prot). Raw value from a real guest (PA 0x3400000).
    raw = 0x800F_FFFF_FCBF_F062
    for lvl in (1, 2):
        e = fmt.decode(raw, lvl)
        assert (e.kind, e.oa, e.attrs.present, e.attrs.cache) == (Kind.LEAF, 0x340_0000, False, 0)
        assert e.attrs.sw >> SW_NO_PS & 1 and e.attrs.writable and not e.attrs.exec
        assert fmt.anomalies(raw, lvl) == [] and fmt.encode(e, lvl) == raw
        a = np.array([raw], np.uint64)
        assert (fmt.kinds(a, lvl)[0], fmt.oas(a, lvl)[0]) == (Kind.LEAF, 0x340_0000)
    # without PS the OA needs only 4K alignment and bit 12 is an OA bit, not PAT
    raw = ~0x1000 & PTE_PFN_MASK | 0x20
    e = fmt.decode(raw, 1)
    assert (e.oa, e.attrs.cache) == (0x1000, 0) and fmt.encode(e, 1) == raw
    with pytest.raises(FormatError):
        fmt.encode(Entry(Kind.LEAF, 0x1000, e.attrs), 0)  # no PS to drop in a pte
    with pytest.raises(FormatError):
        fmt.encode(Entry(Kind.LEAF, 0x1000, e.attrs.with_(cache=4)), 1)
    # 1G pud likewise with bits 51:30
    raw = 0x80 | 0x20 | (~0x1_4000_0000 & 0x000F_FFFF_C000_0000)
    assert fmt.decode(raw, 2).oa == 0x1_4000_0000
    # p4d/pgd values are never inverted (p4d_pfn, pgd_pfn); such entries are anomalies
    top = fmt.levels - 1
    e = fmt.decode(0x5000 | 0x62, top)
    assert (e.kind, e.oa, e.attrs.present) == (Kind.TABLE, 0x5000, False)
    assert fmt.anomalies(0x5000 | 0x62, top)
    assert fmt.oas(np.array([0x5062], np.uint64), top)[0] == 0x5000
    # OA 0 non-present pte: all PFN bits set on disk
    assert fmt.leaf(0, Attrs(present=False, accessed=True), 0) == PTE_PFN_MASK | 0x20 | 1 << 63


# --- anomalies --------------------------------------------------------------------------------
@BOTH
def test_anomalies(fmt):
    for lvl in range(3, fmt.levels):  # PS in pgd/p4d: reserved
        raw = 0x4000_0000 | 0x80 | KERNPG_TABLE
        assert any("PS" in a for a in fmt.anomalies(raw, lvl))
        assert fmt.decode(raw, lvl).kind is Kind.TABLE
    assert any("20:13" in a for a in fmt.anomalies(0x20_2000 | 0xE3, 1))
    assert any("29:13" in a for a in fmt.anomalies(0x4000_2000 | 0xE3, 2))
    assert fmt.decode(0x20_2000 | 0xE3, 1).oa == 0x20_0000
    assert any("62:59" in a for a in fmt.anomalies(0x5000 | 1 << 60 | KERNPG_TABLE, 1))
    assert any("non-present non-zero" in a for a in fmt.anomalies(0x5000 | 0x62, 3))
    assert fmt.anomalies(0x20_0000 | 0xE3, 1) == [] and fmt.anomalies(0, 3) == []
    assert fmt.anomalies(0x1234_5000 | 0x80 | 1 << 62, 0) == []  # pte: PAT + pkey, fine


@BOTH
def test_bad_input(fmt):
    for bad in (-1, 1 << 64, "x", "12", 1.0, None, True):
        with pytest.raises(FormatError):
            fmt.decode(bad, 0)
    assert fmt.decode(np.uint64(0x1063), np.int64(1)) == fmt.decode(0x1063, 1)
    for lvl in (-1, fmt.levels, 1.5, True, "1"):
        with pytest.raises(FormatError):
            fmt.decode(1, lvl)
    # Leaves at the p4d/pgd, tables below the pte and misaligned or too high OAs are
    # checked for every format in test_format_conformance.py.
    bad_entries = [
        (Entry(Kind.LEAF, MAX_PA - 4096, NOTHING), 0),  # all PFN bits inverted to 0
        (Entry(Kind.TABLE, 0, NOTHING), fmt.levels - 1),  # would encode to 0
        (Entry(Kind.LEAF, 0, Attrs(cache=8)), 0),
        (Entry(Kind.LEAF, 0, Attrs(pkey=16)), 0),
        (Entry(Kind.LEAF, 0, Attrs(sw=1 << 10)), 0),
    ]
    for entry, lvl in bad_entries:
        with pytest.raises(FormatError):
            fmt.encode(entry, lvl)


def test_normalize():
    arm_user_code = Attrs(user=True, exec=False, uexec=True, ns=True, dbm=True, contiguous=True,
                          shareability=3, pkey=3, cache=6)
    n = F4.normalize(arm_user_code)
    assert (n.exec, n.uexec, n.ns, n.dbm, n.contiguous, n.shareability) == (
        True, True, False, False, False, 0)
    assert (n.pkey, n.cache) == (3, 6)
    k = F4.normalize(Attrs(exec=True, uexec=False))  # kernel page: exec governs
    assert k.exec and k.uexec
    t = F4.normalize(arm_user_code, Kind.TABLE)
    assert (t.pkey, t.cache) == (0, 2)
    assert F4.normalize(arm_user_code, Kind.EMPTY) == Attrs()
    assert F4.normalize(F4.table_attrs(), Kind.TABLE) == F4.table_attrs()


# --- effective permissions --------------------------------------------------------------------
@BOTH
def test_effective_permissions(fmt):
    user_rwx = fmt.decode(0x9000 | 0x67, 0)  # P RW US A D, no NX
    assert user_rwx.attrs.writable and user_rwx.attrs.user and user_rwx.attrs.uexec
    top = fmt.levels - 1
    open_path = [fmt.decode(0x1000 | PAGE_TABLE, lvl).attrs for lvl in range(top, 0, -1)]
    eff = combine(open_path, user_rwx.attrs)
    assert eff == user_rwx.attrs
    cases = {
        "writable": PAGE_TABLE & ~0x2,  # table clears RW
        "user": PAGE_TABLE & ~0x4,  # table clears US
        "exec": PAGE_TABLE | 1 << 63,  # table sets NX
    }
    for field, table_raw in cases.items():
        path = list(open_path)
        path[1] = fmt.decode(0x1000 | table_raw, top - 1).attrs
        eff = combine(path, user_rwx.attrs)
        assert getattr(eff, field) is False
        if field == "exec":
            assert eff.uexec is False
        others = {"writable", "user", "exec"} - {field}
        assert all(getattr(eff, o) for o in others)


# --- accessed/dirty ---------------------------------------------------------------------------
@BOTH
def test_ad_mask(fmt):
    """ad_mask() is _PAGE_ACCESSED | _PAGE_DIRTY: attribute keys of entries differing only in
    A/D become equal once it is cleared (what the walker's run merging relies on)."""
    assert fmt.ad_mask() == 0x60
    a = np.array([0x5000 | PAGE_KERNEL, 0x5000 | (PAGE_KERNEL & ~0x60)], np.uint64)
    k = fmt.attr_keys(a, 0)
    assert k[0] != k[1]
    k &= np.uint64(~fmt.ad_mask() & (1 << 64) - 1)
    assert k[0] == k[1]

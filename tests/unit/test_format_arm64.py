"""arm64 stage-1 format specifics: configurations and their levels, kernel descriptor values,
invalid/reserved descriptors, 52-bit OA placement (LPA, LPA2), table attribute bits, anomalies,
hierarchical permissions from raw bits, RES0 handling.

What every format must satisfy (radix geometry, page sizes, OA 0/max and range, attribute round
trips, vectorised helpers, table restrictions) is checked in test_format_conformance.py.

Expected values are written from the Arm ARM as Linux reflects it
(arch/arm64/include/asm/pgtable-hwdef.h, pgtable-prot.h, pgtable.h __phys_to_pte_val),
not from the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ptlab.formats import EMPTY, Attrs, Entry, FormatError, Kind, combine
from ptlab.formats.arm64 import CONFIGS, SW_BIT1_FLIP, SW_RESERVED, Arm64

ALL = pytest.mark.parametrize("fmt", CONFIGS, ids=[f.name for f in CONFIGS])
F48 = Arm64(4096, 48)
G, K, M = 1 << 30, 1 << 10, 1 << 20
U64 = (1 << 64) - 1
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Kernel values written out by hand (pgtable-hwdef.h / pgtable-prot.h, 6.1).
PTE_TYPE_PAGE, PTE_AF, PTE_SHARED, PTE_NG = 3, 1 << 10, 3 << 8, 1 << 11
PTE_RDONLY, PTE_USER, PTE_DBM, PTE_CONT = 1 << 7, 1 << 6, 1 << 51, 1 << 52
PTE_PXN, PTE_UXN, PTE_DIRTY, PTE_PROT_NONE = 1 << 53, 1 << 54, 1 << 55, 1 << 58
PAGE_KERNEL = PTE_TYPE_PAGE | PTE_AF | PTE_SHARED | PTE_PXN | PTE_UXN | PTE_DBM | PTE_DIRTY
PAGE_NONE = (PTE_TYPE_PAGE | PTE_AF | PTE_SHARED) & ~1 | PTE_PROT_NONE | PTE_RDONLY | PTE_NG
PAGE_NONE |= PTE_PXN | PTE_UXN
PXN_TABLE, UXN_TABLE, AP_NO_EL0, AP_RDONLY, NS_TABLE = (1 << b for b in range(59, 64))

# (granule, va_bits) -> levels, root entries, pa_bits (page sizes: test_format_conformance.py).
GEOMETRY = {
    (4096, 39): (3, 512, 48),
    (4096, 48): (4, 512, 48),
    (4096, 52): (5, 16, 52),
    (16384, 36): (2, 2048, 48),
    (16384, 47): (3, 2048, 48),
    (16384, 48): (4, 2, 48),
    (16384, 52): (4, 32, 52),
    (65536, 42): (2, 8192, 48),
    (65536, 48): (3, 64, 48),
    (65536, 52): (3, 1024, 52),
}
CONTIG = {4096: (16, 16), 16384: (128, 32), 65536: (32, 32)}


def lpa2(fmt: Arm64) -> bool:
    return fmt.pa_bits == 52 and fmt.page_shift != 16


def phys_to_pte(fmt: Arm64, pa: int) -> int:
    """__phys_to_pte_val written out: 64K LPA folds PA[51:48] into 15:12 (shift 36),
    LPA2 folds PA[51:50] into 9:8 (shift 42)."""
    if fmt.pa_bits == 48:
        return pa
    if fmt.page_shift == 16:
        return (pa | pa >> 36) & (((1 << 48) - 1) & ~0xFFF)
    return (pa | pa >> 42) & (((1 << 50) - 1) & ~0xFF)


# --- geometry ---------------------------------------------------------------------------------
def test_configs_and_names():
    names = [f.name for f in CONFIGS]
    assert names == [
        "arm64-4k-39",
        "arm64-4k-48",
        "arm64-4k-52",
        "arm64-16k-36",
        "arm64-16k-47",
        "arm64-16k-48",
        "arm64-16k-52",
        "arm64-64k-42",
        "arm64-64k-48",
        "arm64-64k-52",
        "arm64-4k-48-ttbr0",
    ]
    assert all(f.upper for f in CONFIGS[:-1]) and not CONFIGS[-1].upper
    assert all(f.arch == "arm64" for f in CONFIGS)
    for bad in ((8192, 48), (4096, 47), (16384, 39), (65536, 36), ("4k", 48)):
        with pytest.raises(FormatError):
            Arm64(*bad)


@ALL
def test_geometry(fmt):
    levels, root, pa_bits = GEOMETRY[(fmt.table_bytes, fmt.va_bits)]
    assert (fmt.levels, fmt.pa_bits, fmt.entries(fmt.top_level)) == (levels, pa_bits, root)
    contig = CONTIG[fmt.table_bytes]
    assert [fmt.contig_count(lvl) for lvl in range(levels)] == list(contig) + [1] * (levels - 2)
    assert [fmt.arm_level(lvl) for lvl in range(levels)] == list(range(3, 3 - levels, -1))
    assert fmt.level_name(0) == "pte" and fmt.level_name(fmt.top_level) == "pgd"


def test_index_4k_48_kernel_va():
    # The arm64 4K/48 linear map starts at 0xffff000000000000 (pgd 0); kernel image area
    # 0xffff800008000000: pgd 256, pud 0, pmd 64, pte 0.
    va = 0xFFFF_8000_0800_0000
    assert [F48.index(va, lvl) for lvl in (3, 2, 1, 0)] == [256, 0, 64, 0]
    assert F48.index(0xFFFF_0000_0000_0000, 3) == 0


@ALL
def test_canonical_and_ranges(fmt):
    span = 1 << fmt.va_bits
    if fmt.upper:
        assert fmt.va_ranges() == [((1 << 64) - span, 1 << 64)]
        assert fmt.canonical(0) == (1 << 64) - span
        assert fmt.canonical(span - 1) == U64
        assert not fmt.covers(0) and fmt.covers(U64)
    else:
        assert fmt.va_ranges() == [(0, span)]
        assert fmt.canonical(span - 1) == span - 1
        assert fmt.covers(0) and not fmt.covers(U64)


# --- codec: hand-computed values -------------------------------------------------------------
def test_page_kernel_pte():
    raw = PAGE_KERNEL | 0x4123_4000
    e = F48.decode(raw, 0)
    assert e.kind is Kind.LEAF and e.oa == 0x4123_4000
    a = e.attrs
    assert (a.present, a.writable, a.user, a.exec, a.uexec) == (True, True, False, False, False)
    assert (a.accessed, a.dirty, a.dbm, a.global_, a.shareability, a.cache) == (
        True,
        True,
        True,
        True,
        3,
        0,
    )
    assert F48.encode(e, 0) == raw
    # Same bits at the pmd level (bit 1 clear): a 2M block.
    block = (PAGE_KERNEL & ~2) | 0x4020_0000
    assert F48.decode(block, 1) == Entry(Kind.LEAF, 0x4020_0000, a)
    assert F48.encode(F48.decode(block, 1), 1) == block


def test_prot_none_and_invalidated_entries_keep_every_bit():
    raw = PAGE_NONE | 0x8765_4000
    e = F48.decode(raw, 0)
    assert e.kind is Kind.LEAF and not e.attrs.present and e.oa == 0x8765_4000
    assert not e.attrs.writable and not e.attrs.global_
    assert F48.encode(e, 0) == raw and F48.anomalies(raw, 0) == []
    # set_direct_map_invalid_noflush clears PTE_VALID only.
    inval = (PAGE_KERNEL | 0x4000_0000) & ~1
    assert F48.encode(F48.decode(inval, 0), 0) == inval
    # A swap entry: type in bits 3..8, offset from bit 9 up to 58, bit 1 clear.
    swap = (0x1F << 3) | (0x3_FFFF_FFFF_FFFF << 9) & ((1 << 59) - 1)
    assert swap & 3 == 0
    assert F48.decode(swap, 0).kind is Kind.LEAF
    assert F48.encode(F48.decode(swap, 0), 0) == swap
    # 6.1 pmd_mkinvalid: PMD_SECT_VALID cleared, PMD_PRESENT_INVALID (bit 59) set.
    pmd = (PAGE_KERNEL & ~3) | 0x4020_0000 | 1 << 59
    assert F48.encode(F48.decode(pmd, 1), 1) == pmd


@ALL
def test_oa_placement_matches_phys_to_pte(fmt):
    """The highest OA of a page/block and of a table lands where __phys_to_pte_val puts it
    (round trips of OA 0 and OA max: test_format_conformance.py)."""
    top = 1 << fmt.pa_bits
    attrs = Attrs(accessed=True)
    for lvl in sorted(fmt.leaf_levels):
        oa = top - fmt.entry_size(lvl)
        raw = fmt.leaf(oa, attrs, lvl)
        high = 0x300 if lpa2(fmt) else 0xF000 if fmt.pa_bits == 52 else 0  # PA[51:50] / [51:48]
        oa_bits = ((1 << 50) - 1) & ~0xFFF & ~(fmt.entry_size(lvl) - 1) | high
        assert raw & oa_bits == phys_to_pte(fmt, oa) & oa_bits
    for lvl in range(1, fmt.levels):
        for oa in (0, top - fmt.table_bytes):
            assert fmt.table(oa, lvl) == phys_to_pte(fmt, oa) | 3


@pytest.mark.parametrize("fmt", [f for f in CONFIGS if f.pa_bits == 52], ids=lambda f: f.name)
def test_52bit_pa_encoding(fmt):
    pa = (1 << 52) - fmt.table_bytes
    raw = fmt.leaf(pa, Attrs(accessed=True), 0)
    if fmt.page_shift == 16:  # LPA: PA[51:48] in bits 15:12
        assert raw >> 12 & 0xF == 0xF and raw >> 16 & 0xFFFF_FFFF == 0xFFFF_FFFF
        assert raw >> 48 & 3 == 0
    else:  # LPA2: PA[51:50] in bits 9:8, bits 49:page_shift in place, no SH
        assert (
            raw >> 8 & 3 == 3
            and (raw >> fmt.page_shift) & ((1 << (50 - fmt.page_shift)) - 1)
            == (1 << (50 - fmt.page_shift)) - 1
        )
    assert raw == phys_to_pte(fmt, pa) | 3 | PTE_AF | PTE_NG | PTE_RDONLY | PTE_PXN | PTE_UXN
    assert fmt.decode(raw, 0).oa == pa
    # Bit 48 of the PA alone.
    raw = fmt.leaf(1 << 48, Attrs(), 0)
    assert fmt.decode(raw, 0).oa == 1 << 48
    if fmt.page_shift == 16:
        assert raw & 0xF000 == 0x1000
    else:
        assert raw & (1 << 48) and not raw & 0x300
    if lpa2(fmt):
        assert fmt.normalize(Attrs(shareability=3)).shareability == 0


# --- codec: bad input -------------------------------------------------------------------------
def test_errors():
    # Blocks where none exist, tables below the pte and bad OAs: test_format_conformance.py.
    with pytest.raises(FormatError):
        F48.encode(Entry(Kind.TABLE, 0x1000, Attrs(present=False)), 1)
    with pytest.raises(FormatError):
        F48.encode(Entry(Kind.LEAF, 0, Attrs(cache=8)), 0)
    with pytest.raises(FormatError):
        F48.encode(Entry(Kind.LEAF, 0, Attrs(sw=1 << 9)), 0)  # wider than a valid leaf's sw
    with pytest.raises(FormatError):  # "valid bit of a reserved descriptor" on a page shape
        F48.encode(Entry(Kind.LEAF, 0, Attrs(present=False, sw=1 << SW_RESERVED)), 0)
    with pytest.raises(FormatError):  # everything clear at the pmd: would read back as empty
        F48.encode(
            Entry(
                Kind.LEAF,
                0,
                Attrs(present=False, writable=True, exec=True, uexec=True, global_=True),
            ),
            1,
        )
    for bad in (-1, 1 << 64, "x", None):
        with pytest.raises(FormatError):
            F48.decode(bad, 0)
    for lvl in (-1, 4, 1.0):
        with pytest.raises(FormatError):
            F48.decode(0, lvl)
    assert F48.decode(0, 2) is EMPTY and F48.encode(EMPTY, 2) == 0


# --- anomalies -------------------------------------------------------------------------------
def test_anomalies():
    page = PAGE_KERNEL | 0x4000_0000
    assert F48.anomalies(page, 0) == []
    # bit 1 clear in a valid pte: reserved, the CPU faults.
    assert F48.anomalies(page & ~2, 0) and not F48.decode(page & ~2, 0).attrs.present
    # A block at the pgd of 4K/48 (no 512G blocks without LPA2).
    blk = (PAGE_KERNEL & ~2) | 0x80_0000_0000
    assert F48.anomalies(blk, 3) and not F48.decode(blk, 3).attrs.present
    assert Arm64(4096, 52).anomalies(blk, 3) == []
    # A 2M block whose OA has bits below 2M set; decode drops them.
    mis = (PAGE_KERNEL & ~2) | 0x4020_0000 | 0x1000
    assert any("aligned" in r for r in F48.anomalies(mis, 1))
    assert F48.decode(mis, 1).oa == 0x4020_0000
    # RES0 bits 49:48 in a 48-bit-PA page; bit 50 in a table entry.
    assert F48.anomalies(page | 1 << 48, 0)
    assert F48.anomalies(0x4000_0003 | 1 << 50, 2)
    assert F48.anomalies(0x4000_0003 | UXN_TABLE, 2) == []
    # 16K: bits 13:12 are RES0 in a page.
    assert Arm64(16384, 47).anomalies(PAGE_KERNEL | 0x1000, 0)
    # An invalid non-zero pgd entry is "bad"; an invalid pmd (a PROT_NONE-like leaf) is not.
    assert F48.anomalies(0x4000_0000, 3) and F48.anomalies(0x4000_0000, 1) == []


# --- table attributes and effective permissions ----------------------------------------------
def test_table_attrs():
    t = F48.table_attrs()
    assert (t.writable, t.user, t.exec, t.uexec) == (True, True, True, True)
    raw = F48.table(0x4000_0000, 2)
    assert raw == 0x4000_0003
    assert F48.decode(raw, 2) == Entry(Kind.TABLE, 0x4000_0000, F48.normalize(t, Kind.TABLE))
    # Linux's kernel tables (PMD_TYPE_TABLE | PMD_TABLE_UXN): no EL0 execution below.
    a = F48.decode(raw | UXN_TABLE, 2).attrs
    assert (a.writable, a.user, a.exec, a.uexec) == (True, True, True, False)
    a = F48.decode(raw | AP_NO_EL0 | AP_RDONLY | PXN_TABLE | NS_TABLE, 2).attrs
    assert (a.writable, a.user, a.exec, a.uexec, a.ns) == (False, False, False, True, True)


def arch_effective(tables: list[int], leaf: int) -> tuple[bool, bool, bool, bool]:
    """(writable, EL0-accessible, privileged-exec, user-exec) by the Arm ARM's hierarchical
    rules: APTable[1] removes write, APTable[0] removes EL0 access, PXNTable / UXNTable force
    PXN / UXN, all on top of the leaf's AP[2:1], PXN, UXN."""
    writable = not leaf & PTE_RDONLY and not any(t & AP_RDONLY for t in tables)
    el0 = bool(leaf & PTE_USER) and not any(t & AP_NO_EL0 for t in tables)
    pexec = not leaf & PTE_PXN and not any(t & PXN_TABLE for t in tables)
    uexec = not leaf & PTE_UXN and not any(t & UXN_TABLE for t in tables)
    return writable, el0, pexec, uexec


def test_effective_permissions_examples():
    table = F48.table(0x1000, 1)
    kernel_rwx = PTE_TYPE_PAGE | PTE_AF | PTE_UXN | 0x5000  # RW, PXN clear: kernel RWX
    eff = combine([F48.decode(table | AP_RDONLY, 1).attrs], F48.decode(kernel_rwx, 0).attrs)
    assert not eff.writable and eff.exec and not eff.uexec
    user_rw = PTE_TYPE_PAGE | PTE_AF | PTE_USER | PTE_PXN | 0x6000  # user RW, UXN clear
    eff = combine([F48.decode(table | AP_NO_EL0, 1).attrs], F48.decode(user_rw, 0).attrs)
    assert (eff.writable, eff.user, eff.uexec) == (True, False, True)
    path = [
        F48.decode(table | UXN_TABLE, 3).attrs,
        F48.decode(table, 2).attrs,
        F48.decode(table | PXN_TABLE, 1).attrs,
    ]
    eff = combine(path, F48.decode(PTE_TYPE_PAGE | PTE_AF | 0x7000, 0).attrs)
    assert (eff.writable, eff.exec, eff.uexec) == (True, False, False)
    # No restriction anywhere: the leaf's own bits.
    leaf = F48.decode(user_rw, 0).attrs
    assert combine([F48.decode(table, 1).attrs] * 3, leaf) == leaf


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 31), min_size=0, max_size=3), st.integers(0, 15))
def test_effective_permissions_match_architecture(table_bits, leaf_bits):
    tables = [0x1000 | 3 | b << 59 for b in table_bits]
    leaf = 0x2000 | PTE_TYPE_PAGE | PTE_AF
    leaf |= (leaf_bits & 1) * PTE_RDONLY | (leaf_bits >> 1 & 1) * PTE_USER
    leaf |= (leaf_bits >> 2 & 1) * PTE_PXN | (leaf_bits >> 3 & 1) * PTE_UXN
    levels = range(len(tables), 0, -1)
    path = [F48.decode(t, lvl).attrs for t, lvl in zip(tables, levels, strict=True)]
    eff = combine(path, F48.decode(leaf, 0).attrs)
    assert (eff.writable, eff.user, eff.exec, eff.uexec) == arch_effective(tables, leaf)


# --- round trips (hypothesis) ----------------------------------------------------------------
def invalid_attrs(fmt: Arm64) -> st.SearchStrategy[Attrs]:
    """Attrs of an invalid descriptor, ``sw`` as wide as it is (bit-1 flip, reserved valid bit
    and the RES0-when-valid spare bits included)."""
    b = st.booleans()
    return st.builds(
        Attrs, present=st.just(False), writable=b, user=b, exec=b, uexec=b, global_=b,
        accessed=b, dirty=b, cache=st.integers(0, 7), contiguous=b, ns=b, dbm=b,
        sw=st.integers(0, (1 << fmt.sw_width(Kind.LEAF, False)) - 1),
        shareability=st.just(0) if lpa2(fmt) else st.integers(0, 3),
    )


@ALL
@SETTINGS
@given(data=st.data())
def test_invalid_entry_round_trip(fmt, data):
    """Invalid and reserved descriptors keep every bit through decode/encode (present leaves
    and tables: test_format_conformance.py)."""
    level = data.draw(st.integers(0, fmt.levels - 1))
    top = (1 << fmt.pa_bits) // fmt.table_bytes - 1
    oa = data.draw(st.one_of(st.just(0), st.just(top), st.integers(0, top))) * fmt.table_bytes
    attrs = data.draw(invalid_attrs(fmt))
    # The valid bit may only come back in a shape the CPU treats as reserved.
    bit1 = (level == 0) != bool(attrs.sw >> SW_BIT1_FLIP & 1)
    reserved_shape = not bit1 and (level == 0 or level not in fmt.leaf_levels)
    if not reserved_shape:
        attrs = attrs.with_(sw=attrs.sw & ~(1 << SW_RESERVED))
    e = Entry(Kind.LEAF, oa, attrs)
    try:
        raw = fmt.encode(e, level)
    except FormatError:
        assert oa == 0 and not bit1  # only the all-clear invalid entry
        return
    assert 0 < raw <= U64
    assert fmt.decode(raw, level) == e
    assert bool(raw & 1) == bool(attrs.sw >> SW_RESERVED & 1)
    assert bool(raw & 2) == bit1


def clean(fmt: Arm64, raw: int, level: int) -> int:
    """``raw`` with the bits the architecture makes RES0 for its descriptor type cleared."""
    if not raw & 1:
        return raw
    res0 = 0 if lpa2(fmt) else 3 << 48
    lpa = fmt.pa_bits == 52 and fmt.page_shift == 16
    if level > 0 and raw & 2:  # table
        low = fmt.page_shift
        res0 |= 1 << 50
    elif level == 0 or level in fmt.leaf_levels:  # page / block
        low = fmt.shift(level)
    else:
        return raw
    res0 |= ((1 << low) - 1) & ~0xFFF & ~(0xF000 if lpa else 0)
    return raw & ~res0


@ALL
@SETTINGS
@given(data=st.data())
def test_raw_round_trip(fmt, data):
    level = data.draw(st.integers(0, fmt.levels - 1))
    raw = data.draw(st.integers(0, U64))
    e = fmt.decode(raw, level)
    if raw == 0:
        assert e == EMPTY and fmt.encode(e, level) == 0 and fmt.anomalies(0, level) == []
        return
    # decode is a projection: re-encoding what it read gives a fixed point.
    assert fmt.decode(fmt.encode(e, level), level) == e
    reserved = raw & 3 == 1 and (level == 0 or level not in fmt.leaf_levels)
    if not raw & 1 or reserved:  # invalid or reserved: every bit recoverable
        assert not e.attrs.present and fmt.encode(e, level) == raw
        assert (fmt.anomalies(raw, level) != []) == (reserved or level not in fmt.leaf_levels)
        return
    raw = clean(fmt, raw, level)
    e = fmt.decode(raw, level)
    assert fmt.anomalies(raw, level) == []
    assert fmt.encode(e, level) == raw
    assert e.kind is (Kind.TABLE if raw & 3 == 3 and level > 0 else Kind.LEAF)


def test_ad_mask():
    # AF and the software PTE_DIRTY; a DBM page's hardware-dirty state (AP[2] clear) is a
    # permission and stays out (what clearing it does: test_format_conformance.py).
    assert F48.ad_mask() == PTE_AF | PTE_DIRTY


def test_contiguous_and_level_names():
    # A CONT_PTES run: 16 ptes with PTE_CONT mapping 64K of 4K pages.
    attrs = Attrs(writable=True, accessed=True, contiguous=True)
    raws = [F48.leaf(0x4000_0000 + i * 4096, attrs, 0) for i in range(F48.contig_count(0))]
    assert all(r & PTE_CONT for r in raws) and len(raws) * 4096 == 64 * K
    assert all(F48.decode(r, 0).attrs.contiguous for r in raws)
    assert not F48.decode(raws[0] & ~PTE_CONT, 0).attrs.contiguous
    assert [Arm64(65536, 48).level_name(i) for i in range(3)] == ["pte", "pmd", "pgd"]
    assert [Arm64(16384, 36).level_name(i) for i in range(2)] == ["pte", "pgd"]
    assert [Arm64(4096, 52).level_name(i) for i in range(5)] == ["pte", "pmd", "pud", "p4d", "pgd"]
    # 16K/48: the 2-entry root splits the 48-bit half at bit 47.
    f = Arm64(16384, 48)
    assert f.index(0xFFFF_8000_0000_0000, 3) == 1 and f.index(0xFFFF_7FFF_FFFF_FFFF, 3) == 0

"""Format conformance: every configuration of ``catalog.all_configs()`` passes the same checks.

After the kunit checks Linux runs on every generic_pt format
(drivers/iommu/generic_pt/kunit_generic_pt.h: ``check_all_levels``, ``test_table_radix``,
``test_entry_possible_sizes``, ``test_entry_oa``, ``test_best_pgsize``,
``test_attr_from_entry``): radix coverage of every level, the page sizes the architecture
allows, OA 0 and OA max, attribute round trips, the vectorised helpers against the scalar
codec, the best page size against a brute-force reference and against the engine's map(),
and table restrictions combined with leaf attributes. Architecture facts (page sizes, which
table restrictions exist) are written here from the manuals and kernel headers, not read from
the code under test. Format-specific bit positions stay in test_format_x86.py /
test_format_arm64.py.

Random inputs come from ``PTLAB_SEED`` (default :data:`DEFAULT_SEED`), hypothesis included;
the seed is printed in the test output and in the failure messages of the random tests, so
``PTLAB_SEED=<n> pytest ...`` replays a failure.
"""

from __future__ import annotations

import functools
import itertools
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from ptlab.engine import PageTable
from ptlab.formats import PERM_FIELDS, Attrs, Entry, Format, FormatError, Kind, combine
from ptlab.formats.catalog import all_configs
from ptlab.formats.pgsize import best_page_size
from ptlab.memory.sparse import SparseMemory

DEFAULT_SEED = 20261129
SEED = int(os.environ.get("PTLAB_SEED", str(DEFAULT_SEED)))
CONFIGS = all_configs()
ALL = pytest.mark.parametrize("fmt", CONFIGS, ids=[f.name for f in CONFIGS])
U64 = (1 << 64) - 1
K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WHY = f"(PTLAB_SEED={SEED})"


@pytest.fixture(scope="module", autouse=True)
def _print_seed(request: pytest.FixtureRequest) -> None:
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"format conformance: PTLAB_SEED={SEED} (set it to replay)")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A generator seeded from PTLAB_SEED and the test's id (order-independent)."""
    print(f"PTLAB_SEED={SEED}")
    return random.Random(f"{SEED}:{request.node.nodeid}")


# --- architecture facts -----------------------------------------------------------------------
# Leaf page sizes by (arch, granule): (always, added with a 52-bit output address).
# x86-64: SDM vol. 3 "4-Level Paging and 5-Level Paging": 4K PTE, 2M PDE with PS, 1G PDPTE with
#   PS; nothing larger, whatever the PA width.
# arm64: Arm ARM D8 (VMSAv8-64 translation table format), the sizes Linux names in
#   arch/arm64/include/asm/pgtable-hwdef.h (ARM64_HW_PGTABLE_LEVEL_SHIFT(n) =
#   (PAGE_SHIFT - 3) * (4 - n) + 3): 4K granule blocks at levels 2/1 (2M, 1G) and at level 0
#   (512G) only with FEAT_LPA2; 16K blocks at level 2 (32M) and level 1 (64G) only with LPA2;
#   64K blocks at level 2 (512M) and level 1 (4T) only with FEAT_LPA (52-bit PA).
ARCH_PAGE_SIZES: dict[tuple[str, int], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("x86_64", 4 * K): ((4 * K, 2 * M, 1 * G), ()),
    ("arm64", 4 * K): ((4 * K, 2 * M, 1 * G), (512 * G,)),
    ("arm64", 16 * K): ((16 * K, 32 * M), (64 * G,)),
    ("arm64", 64 * K): ((64 * K, 512 * M), (4 * T,)),
}

# Restrictions a table entry can hold (False = denied below), as groups of Attrs fields that
# share one bit. x86: RW, U/S and XD of a paging-structure entry (SDM "Access Rights"): one XD
# bit for both privilege levels. arm64: APTable[1] (write), APTable[0] (EL0), PXNTable,
# UXNTable (Arm ARM "Hierarchical control of data/instruction access permissions").
TABLE_RESTRICTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "x86_64": (("writable",), ("user",), ("exec", "uexec")),
    "arm64": (("writable",), ("user",), ("exec",), ("uexec",)),
}


def expected_page_sizes(fmt: Format) -> list[int]:
    """The architecture's leaf sizes for this configuration: a leaf is one entry of a table
    that has at least two entries, so it is smaller than the VA span."""
    always, wide_oa = ARCH_PAGE_SIZES[(fmt.arch, fmt.table_bytes)]
    sizes = always + (wide_oa if fmt.pa_bits == 52 else ())
    return sorted(s for s in sizes if s < 1 << fmt.va_bits)


# --- helpers ----------------------------------------------------------------------------------
def low(fmt: Format, va: int) -> int:
    return va & (fmt.va_span - 1)


def sample_vas(fmt: Format, rng: random.Random, n: int = 64) -> list[int]:
    """Edges of every VA range, page and top-entry boundaries, and random VAs in each."""
    out = []
    for s, e in fmt.va_ranges():
        top = fmt.entry_size(fmt.top_level)
        out += [s, e - 1, s + fmt.table_bytes, e - fmt.table_bytes, s + top, e - top - 1]
        out += [s + (e - s) // 2, s + (e - s) // 2 - 1]
        out += [rng.randrange(s, e) for _ in range(n)]
    return out


@functools.cache
def sw_width(fmt: Format, kind: Kind, present: bool = True) -> int:
    """Widest all-ones ``sw`` value ``normalize`` accepts for ``kind`` (probed)."""
    width = 0
    while width < 64:
        try:
            fmt.normalize(Attrs(present=present, sw=(1 << (width + 1)) - 1), kind)
        except FormatError:
            break
        width += 1
    return width


def attrs_strategy(fmt: Format, present: bool) -> st.SearchStrategy[Attrs]:
    """Any Attrs in the value ranges every format accepts; ``sw`` as wide as a present leaf
    of this format allows (the extra bits an invalid arm64 descriptor keeps are
    format-specific and tested in test_format_arm64.py)."""
    b = st.booleans()
    return st.builds(
        Attrs,
        present=st.just(present), writable=b, user=b, exec=b, uexec=b, global_=b,
        accessed=b, dirty=b, cache=st.integers(0, 7), contiguous=b,
        sw=st.integers(0, (1 << sw_width(fmt, Kind.LEAF)) - 1), pkey=st.integers(0, 15),
        ns=b, shareability=st.integers(0, 3), dbm=b,
    )


def aligned_oa(fmt: Format, align: int) -> st.SearchStrategy[int]:
    top = (1 << fmt.pa_bits) // align - 1
    return st.one_of(st.just(0), st.just(top), st.integers(0, top)).map(lambda n: n * align)


def restriction(bits: tuple[bool, ...]) -> Attrs:
    """A table entry's attributes with the permission fields set to ``bits``."""
    return Attrs(present=True, **dict(zip(PERM_FIELDS, bits, strict=True)))


def one(fmt: Format, raw: int, level: int) -> tuple[int, int, int]:
    """(kind, oa, key) of ``raw`` through the vectorised helpers."""
    a = np.array([raw], np.uint64)
    return (int(fmt.kinds(a, level)[0]), int(fmt.oas(a, level)[0]),
            int(fmt.attr_keys(a, level)[0]))


# --- radix coverage ---------------------------------------------------------------------------
@ALL
def test_levels_tile_the_va_span(fmt):
    """kunit test_table_radix: the index fields of the levels are contiguous, do not overlap
    and together with the page offset decode exactly the VA bits; no one-entry tables."""
    assert fmt.table_bytes == 1 << fmt.page_shift and fmt.shift(0) == fmt.page_shift
    bit, decoded = fmt.page_shift, fmt.table_bytes - 1
    for lvl in range(fmt.levels):
        n = fmt.entries(lvl)
        assert n >= 2 and n & (n - 1) == 0
        if lvl < fmt.top_level:
            assert n * 8 == fmt.table_bytes  # a full table of u64 entries
        else:
            assert n * 8 <= fmt.table_bytes  # the root may be smaller, never bigger
        assert fmt.shift(lvl) == bit and fmt.entry_size(lvl) == 1 << bit
        field = (n - 1) << bit
        assert decoded & field == 0  # not decoding bits another level does
        decoded |= field
        bit += n.bit_length() - 1
    assert bit == fmt.va_bits and decoded == fmt.va_span - 1
    assert fmt.entries(fmt.top_level) * fmt.entry_size(fmt.top_level) == fmt.va_span
    # The last VA is the last index of every level; clearing one field gives index 0 there.
    last = fmt.va_span - 1
    for lvl in range(fmt.levels):
        assert fmt.index(last, lvl) == fmt.entries(lvl) - 1
        cleared = last & ~((fmt.entries(lvl) - 1) << fmt.shift(lvl))
        assert [fmt.index(cleared, x) for x in range(fmt.levels)] == [
            0 if x == lvl else fmt.entries(x) - 1 for x in range(fmt.levels)
        ]


@ALL
def test_indices_compose_back_to_the_va(fmt, rng):
    for va in sample_vas(fmt, rng):
        path = [fmt.index(va, lvl) for lvl in range(fmt.levels)]
        assert all(0 <= i < fmt.entries(lvl) for lvl, i in enumerate(path)), (hex(va), WHY)
        composed = sum(i << fmt.shift(lvl) for lvl, i in enumerate(path))
        composed |= va & (fmt.table_bytes - 1)
        assert composed == low(fmt, va), (hex(va), WHY)
        assert fmt.canonical(composed) == va and fmt.covers(va), (hex(va), WHY)


@ALL
def test_va_ranges_are_distinct_index_paths(fmt, rng):
    ranges = fmt.va_ranges()
    assert all(0 <= s < e <= 1 << 64 for s, e in ranges)
    # The ranges' low images are disjoint and tile [0, 2**va_bits): each index path is one VA.
    images = sorted((low(fmt, s), low(fmt, s) + (e - s)) for s, e in ranges)
    assert images[0][0] == 0 and images[-1][1] == fmt.va_span
    assert all(a[1] == b[0] for a, b in itertools.pairwise(images))
    # Root indices of different ranges never meet.
    roots = [set(range(fmt.index(s, fmt.top_level), fmt.index(e - 1, fmt.top_level) + 1))
             for s, e in ranges]
    assert sum(map(len, roots)) == len(set().union(*roots)) == fmt.entries(fmt.top_level)
    paths: dict[tuple[int, ...], int] = {}
    for va in sample_vas(fmt, rng, 32):
        page = va - va % fmt.table_bytes
        path = tuple(fmt.index(va, lvl) for lvl in range(fmt.levels))
        assert paths.setdefault(path, page) == page, (hex(va), WHY)
    # Just outside every range is not covered (unless another range starts there).
    starts = {s for s, _ in ranges}
    ends = {e for _, e in ranges}
    for s, e in ranges:
        if s > 0 and s not in ends:
            assert not fmt.covers(s - 1)
        if e < 1 << 64 and e not in starts:
            assert not fmt.covers(e)


@ALL
def test_canonical_inverts_the_low_va_mask(fmt, rng):
    for va in sample_vas(fmt, rng):
        assert fmt.canonical(low(fmt, va)) == va, (hex(va), WHY)
    for lo in [0, fmt.va_span - 1, fmt.va_span // 2, fmt.va_span // 2 - 1] + [
        rng.randrange(fmt.va_span) for _ in range(64)
    ]:
        va = fmt.canonical(lo)
        assert fmt.covers(va) and low(fmt, va) == lo, (hex(lo), WHY)


# --- possible page sizes ----------------------------------------------------------------------
@ALL
def test_page_sizes_are_the_architectures(fmt):
    expected = expected_page_sizes(fmt)
    sizes = fmt.page_sizes()
    assert sorted(sizes.values()) == expected
    assert set(sizes) == set(fmt.leaf_levels)
    assert fmt.leaf_levels == frozenset(range(len(expected)))  # from the pte level up, no gaps
    assert all(sizes[lvl] == fmt.entry_size(lvl) for lvl in sizes)
    assert fmt.entry_size(0) == fmt.table_bytes  # the smallest page is the granule


@ALL
def test_no_leaf_where_the_architecture_has_none(fmt):
    attrs = fmt.normalize(Attrs(writable=True, accessed=True))
    for lvl in range(fmt.levels):
        if lvl in fmt.leaf_levels:
            assert fmt.decode(fmt.leaf(0, attrs, lvl), lvl).kind is Kind.LEAF
            continue
        for oa in (0, fmt.entry_size(lvl) if fmt.entry_size(lvl) < 1 << fmt.pa_bits else 0):
            with pytest.raises(FormatError):
                fmt.encode(Entry(Kind.LEAF, oa, attrs), lvl)
    with pytest.raises(FormatError):  # nothing below the pte level
        fmt.encode(Entry(Kind.TABLE, fmt.table_bytes, fmt.table_attrs()), 0)


# --- OA 0 and OA max --------------------------------------------------------------------------
def entries_at(fmt: Format, lvl: int, oas: list[int]) -> list[Entry]:
    """Present and non-present leaves (leaf levels) and table entries (above the pte level)
    for every OA of ``oas`` that is aligned for them."""
    out = []
    if lvl in fmt.leaf_levels:
        for present in (True, False):
            attrs = fmt.normalize(Attrs(present=present, writable=True, accessed=True))
            out += [Entry(Kind.LEAF, oa, attrs) for oa in oas if oa % fmt.entry_size(lvl) == 0]
    if lvl > 0:
        attrs = fmt.normalize(fmt.table_attrs(), Kind.TABLE)
        out += [Entry(Kind.TABLE, oa, attrs) for oa in oas if oa % fmt.table_bytes == 0]
    return out


@ALL
def test_oa_zero_and_max_round_trip(fmt):
    """kunit test_entry_oa: the boundary OAs, and every OA bit on its own, at every level."""
    top = 1 << fmt.pa_bits
    for lvl in range(fmt.levels):
        align = fmt.entry_size(lvl) if lvl in fmt.leaf_levels else fmt.table_bytes
        oas = [0, top - align, top - fmt.table_bytes]
        oas += [1 << b for b in range(fmt.page_shift, fmt.pa_bits)]
        cases = entries_at(fmt, lvl, oas)
        assert {e.oa for e in cases} >= {0, top - align}
        for e in cases:
            raw = fmt.encode(e, lvl)
            assert 0 < raw <= U64
            assert fmt.decode(raw, lvl) == e, (lvl, e)
            kind, oa, _ = one(fmt, raw, lvl)
            assert (kind, oa) == (e.kind, e.oa), (lvl, e)
            if e.attrs.present:
                assert fmt.anomalies(raw, lvl) == [], (lvl, e)


@ALL
def test_oa_beyond_pa_bits_or_misaligned_is_refused(fmt):
    top = 1 << fmt.pa_bits
    for lvl in range(fmt.levels):
        kinds = []
        if lvl in fmt.leaf_levels:
            # A non-present leaf needs only a granule-aligned OA (arm64 keeps an invalid
            # block's bits as they are); a present one needs its page size.
            kinds += [(Kind.LEAF, fmt.entry_size(lvl), True),
                      (Kind.LEAF, fmt.table_bytes, False)]
        if lvl > 0:
            kinds.append((Kind.TABLE, fmt.table_bytes, True))
        for kind, align, present in kinds:
            attrs = fmt.table_attrs() if kind is Kind.TABLE else Attrs(
                present=present, accessed=True)
            bad = [top, top + align, 1 << 63, -align, 1, align // 2, top - align // 2, None,
                   float(align)]
            if align > fmt.table_bytes:
                bad.append(fmt.table_bytes)  # granule-aligned, not block-aligned
            for oa in bad:
                with pytest.raises(FormatError):
                    fmt.encode(Entry(kind, oa, attrs), lvl)
                    pytest.fail(f"level {lvl} {kind.name} present={present} OA {oa!r}")


# --- attribute round trip ---------------------------------------------------------------------
@ALL
@hypothesis_seed(SEED)
@HYP
@given(data=st.data())
def test_leaf_attrs_round_trip(fmt, data):
    """kunit test_attr_from_entry: normalize -> encode -> decode gives the normalized Attrs
    back, present or not (x86 L1TF-inverted OAs included), at every leaf level."""
    present = data.draw(st.booleans(), "present")
    attrs = data.draw(attrs_strategy(fmt, present), "attrs")
    norm = fmt.normalize(attrs)
    assert fmt.normalize(norm) == norm and norm.present == present
    for level in sorted(fmt.leaf_levels):
        oa = data.draw(aligned_oa(fmt, fmt.entry_size(level)), f"oa at level {level}")
        entry = Entry(Kind.LEAF, oa, norm)
        try:
            raw = fmt.encode(entry, level)
        except FormatError as err:  # only an entry whose every bit is clear cannot be stored
            assert not present and "empty" in str(err), (level, err)
            continue
        assert fmt.decode(raw, level) == entry, level
        assert fmt.encode(Entry(Kind.LEAF, oa, attrs), level) == raw, level  # normalizes
        assert one(fmt, raw, level)[:2] == (Kind.LEAF, oa), level
        if present:
            assert fmt.anomalies(raw, level) == [], level


@ALL
def test_kernel_table_attrs_round_trip(fmt):
    attrs = fmt.table_attrs()
    assert attrs.present and fmt.normalize(attrs, Kind.TABLE) == attrs
    for lvl in range(1, fmt.levels):
        raw = fmt.table(fmt.table_bytes, lvl)
        assert fmt.decode(raw, lvl) == Entry(Kind.TABLE, fmt.table_bytes, attrs)
        assert fmt.anomalies(raw, lvl) == []


# --- vectorised helpers == scalar codec -------------------------------------------------------
def random_table(fmt: Format, level: int, rng: random.Random, n: int = 768) -> list[int]:
    """Encoded entries from a small pool of attributes (so keys repeat) with random OAs,
    zeros, random garbage, and encoded entries with a few bits flipped."""
    pool = []
    if level in fmt.leaf_levels:
        for _ in range(6):
            present = rng.random() < 0.7
            pool.append((Kind.LEAF, fmt.entry_size(level), fmt.normalize(Attrs(
                present=present, writable=rng.random() < .5, user=rng.random() < .5,
                exec=rng.random() < .5, uexec=rng.random() < .5, global_=rng.random() < .5,
                accessed=rng.random() < .5, dirty=rng.random() < .5, cache=rng.randrange(8),
                sw=rng.randrange(1 << sw_width(fmt, Kind.LEAF)), pkey=rng.randrange(16),
                shareability=rng.randrange(4), ns=rng.random() < .5, dbm=rng.random() < .5,
            ))))
    if level > 0:
        for _ in range(4):
            bits = tuple(rng.random() < .5 for _ in PERM_FIELDS)
            pool.append((Kind.TABLE, fmt.table_bytes, fmt.normalize(restriction(bits),
                                                                    Kind.TABLE)))
    raws = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15 or not pool:
            raws.append(0 if r < 0.1 or not pool else rng.getrandbits(64))
            continue
        kind, align, attrs = rng.choice(pool)
        oa = rng.randrange((1 << fmt.pa_bits) // align) * align
        try:
            raw = fmt.encode(Entry(kind, oa, attrs), level)
        except FormatError:
            raw = 0
        if r > 0.9:
            for _ in range(rng.randrange(1, 4)):
                raw ^= 1 << rng.randrange(64)
        raws.append(raw)
    return raws


@ALL
def test_vectorised_helpers_match_decode(fmt, rng):
    """kinds()/oas()/attr_keys() over a table agree with decode() of each entry; equal keys
    mean equal Attrs (per kind) and back; every decoded OA is aligned and below 2**pa_bits."""
    for level in range(fmt.levels):
        raws = random_table(fmt, level, rng)
        arr = np.array(raws, np.uint64)
        kinds, oas, keys = fmt.kinds(arr, level), fmt.oas(arr, level), fmt.attr_keys(arr, level)
        assert (kinds.dtype, oas.dtype, keys.dtype) == (np.uint8, np.uint64, np.uint64)
        assert kinds.shape == oas.shape == keys.shape == arr.shape
        by_key: dict[tuple[int, int], Attrs] = {}
        by_attrs: dict[tuple[int, Attrs], int] = {}
        seen = set()
        for raw, kind, oa, key in zip(raws, kinds.tolist(), oas.tolist(), keys.tolist(),
                                      strict=True):
            e = fmt.decode(raw, level)
            where = (level, hex(raw), WHY)
            assert kind == e.kind, where
            seen.add(e.kind)
            if e.kind is Kind.EMPTY:
                assert raw == 0, where
                continue
            assert oa == e.oa and 0 <= e.oa < 1 << fmt.pa_bits, where
            assert by_key.setdefault((kind, key), e.attrs) == e.attrs, where
            assert by_attrs.setdefault((kind, e.attrs), key) == key, where
            if e.kind is Kind.TABLE:
                assert level > 0 and e.oa % fmt.table_bytes == 0, where
            elif e.attrs.present:
                assert level in fmt.leaf_levels and e.oa % fmt.entry_size(level) == 0, where
        assert len(by_key) < int((kinds != 0).sum())  # the pool made keys repeat
        assert Kind.EMPTY in seen and (Kind.TABLE in seen or level == 0)
        assert Kind.LEAF in seen or level not in fmt.leaf_levels


@ALL
def test_decode_encode_is_a_projection(fmt, rng):
    """A well-formed raw (no anomalies) round-trips bit for bit; re-encoding any decoded raw
    gives a fixed point (or is refused when decode kept none of a malformed raw's bits)."""
    for level in range(fmt.levels):
        for raw in random_table(fmt, level, rng, 384):
            e = fmt.decode(raw, level)
            clean = not fmt.anomalies(raw, level)
            try:
                again = fmt.encode(e, level)
            except FormatError:
                assert not clean, (level, hex(raw), WHY)
                continue
            if clean:
                assert again == raw, (level, hex(raw), hex(again), WHY)
            assert fmt.decode(again, level) == e and fmt.encode(e, level) == again


@ALL
def test_ad_mask_clears_only_accessed_and_dirty(fmt, rng):
    mask = fmt.ad_mask()
    assert mask
    for lvl in sorted(fmt.leaf_levels):
        for raw in random_table(fmt, lvl, rng, 128):
            e = fmt.decode(raw, lvl)
            if e.kind is not Kind.LEAF or not e.attrs.present or fmt.anomalies(raw, lvl):
                continue
            cleared = fmt.decode(raw & ~mask, lvl)
            assert cleared == Entry(Kind.LEAF, e.oa, e.attrs.with_(accessed=False, dirty=False))


@ALL
def test_vectorised_helpers_refuse_bad_input(fmt):
    good = [0, fmt.table(fmt.table_bytes, 1),
            fmt.leaf(fmt.table_bytes, Attrs(accessed=True, exec=True, uexec=True), 0)]
    assert all(0 <= raw < 1 << 63 for raw in good)
    arr = np.array(good, np.uint64)
    for method in (fmt.kinds, fmt.oas, fmt.attr_keys):
        expected = method(arr, 1).tolist()
        assert method(good, 1).tolist() == expected  # a list of ints
        assert method(arr.astype(np.int64), 1).tolist() == expected  # non-negative int64
        assert method(arr[:0], 0).shape == (0,)
        for bad in ([-1], ["a"], [1.5], [1 << 64], np.array([-1]), np.array([1.5]), 5, None):
            with pytest.raises(FormatError):
                method(bad, 0)
        with pytest.raises(FormatError):
            method(arr, fmt.levels)


# --- best page size ---------------------------------------------------------------------------
def ref_best_page_size(fmt: Format, va: int, pa: int, size: int, allowed: set[int]) -> int:
    """Brute force the constraints (kunit ref_best_pgsize): every power of two, largest first,
    that is allowed, starts VA and PA, lies in one aligned block and ends inside the range."""
    for lg2 in range(63, -1, -1):
        p = 1 << lg2
        if (p in allowed and va % p == 0 and pa % p == 0 and va + p - 1 <= va + size - 1
                and va // p == (va + p - 1) // p and pa // p == (pa + p - 1) // p):
            return p
    return 0


def best_page_size_cases(fmt: Format, rng: random.Random) -> list[tuple[int, int, int]]:
    """(va, pa, size): random prefixes with every alignment suffix (kunit test_best_pgsize),
    and the edges of the VA ranges and of the PA space."""
    top = 1 << fmt.pa_bits
    lg2s = range(fmt.page_shift - 2, fmt.shift(fmt.top_level) + 2)
    out = []
    for a, b, c in itertools.product(lg2s, repeat=3):
        if rng.random() > 0.12:
            continue
        s, e = rng.choice(fmt.va_ranges())
        va = s + (rng.getrandbits(64) << a) % (e - s)
        pa = (rng.getrandbits(64) << b) % top
        size = rng.choice([1 << c, (1 << c) - 1, (1 << c) + fmt.table_bytes,
                           rng.randrange(1, 1 << c)])
        out.append((va, pa, size))
    for s, e in fmt.va_ranges():
        for p in fmt.page_sizes().values():
            out += [(s, 0, p), (s, 0, p - 1), (s, p, 2 * p + 1), (e - p, top - p, p),
                    (e - 2 * p, top - p, 2 * p), (s + p // 2, p // 2, p), (s, 0, 1)]
    clipped = []
    for va, pa, size in out:
        s, e = next((s, e) for s, e in fmt.va_ranges() if s <= va < e)
        size = min(size, e - va, top - pa)
        if size > 0:
            clipped.append((va, pa, size))
    return clipped


@ALL
def test_best_page_size_matches_brute_force(fmt, rng):
    sizes = sorted(fmt.page_sizes().values())
    subsets = [set(sizes), set()] + [{p} for p in sizes] + [
        set(c) for c in itertools.combinations(sizes, 2)
    ]
    for va, pa, size in best_page_size_cases(fmt, rng):
        allowed = rng.choice(subsets)
        got = best_page_size(fmt, va, pa, size, allowed)
        want = ref_best_page_size(fmt, va, pa, size, allowed)
        assert got == want, (hex(va), hex(pa), hex(size), sorted(allowed), WHY)
        assert best_page_size(fmt, va, pa, size) == ref_best_page_size(
            fmt, va, pa, size, set(sizes))


@ALL
def test_best_page_size_refuses_bad_input(fmt):
    s, e = fmt.va_ranges()[0]
    g = fmt.table_bytes
    top = 1 << fmt.pa_bits
    bad = [
        (s, 0, 0, None), (s, 0, -g, None), (e - g, 0, 2 * g, None),  # size / VA range
        (s, -g, g, None), (s, top - g, 2 * g, None),  # PA below 0 / above pa_bits
        (s, 0, g, [3 * K]), (s, 0, g, [g * 2]), (s, 0, g, "4096"), (s, 0, g, 4096),
        (None, 0, g, None), (s, 0.0, g, None), (s, 0, True, None),
    ]
    if fmt.arch == "x86_64":
        bad.append((1 << (fmt.va_bits - 1), 0, g, None))  # non-canonical
    for va, pa, size, allowed in bad:
        with pytest.raises(FormatError):
            best_page_size(fmt, va, pa, size, allowed)


def greedy_leaves(fmt: Format, va: int, pa: int, size: int, allowed: set[int],
                  limit: int) -> list[tuple[int, int, int]] | None:
    """(va, level, pa) of the leaves a greedy loop over best_page_size picks; None when
    there would be more than ``limit``."""
    level_of = {p: lvl for lvl, p in fmt.page_sizes().items()}
    out = []
    end = va + size
    while va < end:
        p = best_page_size(fmt, va, pa, end - va, allowed)
        assert p, (hex(va), hex(pa), hex(end - va), WHY)
        out.append((va, level_of[p], pa))
        if len(out) > limit:
            return None
        va, pa = va + p, pa + p
    return out


def map_case(fmt: Format, rng: random.Random, edge: bool) -> tuple[int, int, int, set[int]]:
    """A random (va, pa, size, allowed) for map(): a head of smaller pages up to a boundary of a
    big page size, big pages, a tail; PA congruent to VA modulo a random page size or only the
    smallest; sometimes a subset of the page sizes."""
    sizes = sorted(fmt.page_sizes().values())
    allowed = set(sizes)
    if rng.random() < 0.4:
        allowed = set(rng.sample(sizes, rng.randrange(1, len(sizes) + 1)))
    ordered = sorted(allowed)
    congruent = ordered[-1] if rng.random() < 0.5 else rng.choice(ordered)
    fits = [p for p in ordered if p <= congruent * 512]
    big = fits[-1] if rng.random() < 0.7 else rng.choice(fits)
    small = [p for p in ordered if p <= min(big, congruent * 8)]
    head, tail = (sum(rng.randrange(16) * rng.choice(small) for _ in range(2)) for _ in "ht")
    top = 1 << fmt.pa_bits
    s, e = rng.choice(fmt.va_ranges())
    size = min(head + rng.randrange(1, 3) * big + tail, (e - s) // 2, top // 2)
    if edge:  # the last pages of the VA range and of the PA space
        return e - size, top - size, size, allowed
    # va = a big-page boundary minus the head, inside the range with the whole size
    first, last = -(-(s + head) // big), (e - size + head) // big
    va = rng.randrange(first, last + 1) * big - head
    pa = rng.randrange((top - size) // congruent) * congruent + va % congruent
    return va, pa, size, allowed


@ALL
def test_map_picks_the_greedy_best_page_sizes(fmt, rng):
    """The engine's map() writes exactly the leaves a greedy loop over best_page_size
    predicts (PageTable over SparseMemory, compared through leaves())."""
    attrs = fmt.normalize(Attrs(writable=True, accessed=True, dirty=True))
    done = 0
    while done < 8:
        va, pa, size, allowed = map_case(fmt, rng, edge=done == 0)
        want = greedy_leaves(fmt, va, pa, size, allowed, limit=3000)
        if want is None:
            continue
        pt = PageTable(fmt, SparseMemory())
        sizes = None if allowed == set(fmt.page_sizes().values()) else sorted(allowed)
        pt.map(va, pa, size, attrs, page_sizes=sizes)
        leaves = list(pt.leaves())
        case = (hex(va), hex(pa), hex(size), sorted(allowed), WHY)
        assert [(v, lvl, e.oa) for v, lvl, e in leaves] == want, case
        assert all(e.kind is Kind.LEAF and e.attrs == attrs for _, _, e in leaves), case
        done += 1


# --- table restrictions combined with leaf attributes -----------------------------------------
@ALL
def test_table_restrictions_round_trip(fmt):
    """Every combination of restrictions on a table entry: what the format stores comes back
    exactly; restrictions sharing one bit are normalized to one value, consistently."""
    groups = TABLE_RESTRICTIONS[fmt.arch]
    assert sorted(f for g in groups for f in g) == sorted(PERM_FIELDS)
    for lvl in range(1, fmt.levels):
        raws = set()
        for bits in itertools.product((True, False), repeat=len(PERM_FIELDS)):
            want = restriction(bits)
            norm = fmt.normalize(want, Kind.TABLE)
            assert fmt.normalize(norm, Kind.TABLE) == norm and norm.present
            for group in groups:
                values = {getattr(norm, f) for f in group}
                assert len(values) == 1, (lvl, bits, group)  # one bit, one value
                assert values <= {getattr(want, f) for f in group}, (lvl, bits, group)
            raw = fmt.encode(Entry(Kind.TABLE, fmt.table_bytes, want), lvl)
            assert raw == fmt.encode(Entry(Kind.TABLE, fmt.table_bytes, norm), lvl)
            assert fmt.decode(raw, lvl) == Entry(Kind.TABLE, fmt.table_bytes, norm)
            assert fmt.anomalies(raw, lvl) == []
            raws.add(raw)
        assert len(raws) == 1 << len(groups)  # every stored restriction has its own bit


def effective_reference(path: list[Attrs], leaf: Attrs) -> Attrs:
    """A permission is granted only if the leaf grants it and no table on the path denies
    it (x86 SDM "Determination of Access Rights"; Arm ARM hierarchical permissions)."""
    return leaf.with_(**{f: getattr(leaf, f) and all(getattr(t, f) for t in path)
                         for f in PERM_FIELDS})


@ALL
def test_table_restrictions_combine_with_leaf_attrs(fmt, rng):
    for lvl in sorted(fmt.leaf_levels):
        for _ in range(48):
            requested = [restriction(tuple(rng.random() < 0.7 for _ in PERM_FIELDS))
                         for _ in range(fmt.top_level - lvl)]
            path = [fmt.decode(fmt.encode(Entry(Kind.TABLE, fmt.table_bytes, t), tl), tl).attrs
                    for t, tl in zip(requested, range(fmt.top_level, lvl, -1), strict=True)]
            leaf_attrs = fmt.normalize(Attrs(
                writable=rng.random() < .5, user=rng.random() < .5, exec=rng.random() < .5,
                uexec=rng.random() < .5, accessed=True, global_=rng.random() < .5,
                cache=rng.randrange(8)))
            leaf = fmt.decode(fmt.leaf(0, leaf_attrs, lvl), lvl).attrs
            eff = combine(path, leaf)
            assert eff == effective_reference(path, leaf), (lvl, requested, leaf, WHY)
            normalized = [fmt.normalize(t, Kind.TABLE) for t in requested]
            assert eff == combine(normalized, leaf), (lvl, requested, leaf, WHY)
            if not path:
                assert eff == leaf

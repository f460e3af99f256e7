"""The QEMU-side oracles (ptharness.oracle) on real captured QEMU 7.2 output.

tests/data/info-tlb-x86_64-*.txt.xz are ``info tlb`` dumps captured from QEMU 7.2.22 (TCG,
``-m 1G``) running Debian's 6.1.0-56-amd64 kernel stopped with a static ``init`` asleep:
``-cpu max,-la57`` (4-level), ``-cpu max`` (LA57, 5-level) and ``-cpu max,-la57`` with
``pti=on``.
"""

from __future__ import annotations

import functools
import lzma
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ptharness import oracle
from ptharness.oracle import (
    AMBIGUOUS,
    SZ_1G,
    SZ_2M,
    SZ_4K,
    OracleError,
    TlbLeaf,
    TlbLine,
)
from ptlab.formats.base import Attrs

DATA = Path(__file__).resolve().parent.parent / "data"
CAPTURES = {
    "4level": "info-tlb-x86_64-4level.txt.xz",
    "la57": "info-tlb-x86_64-la57.txt.xz",
    "pti": "info-tlb-x86_64-4level-pti.txt.xz",
}
KERNEL_HALF_4 = 0xFFFF_8000_0000_0000
KERNEL_HALF_5 = 0xFF00_0000_0000_0000


@functools.cache
def load(name: str) -> str:
    return lzma.decompress((DATA / CAPTURES[name]).read_bytes()).decode()


@pytest.fixture(scope="module", params=sorted(CAPTURES))
def capture(request: pytest.FixtureRequest) -> tuple[str, str, list[TlbLine]]:
    text = load(request.param)
    return request.param, text, oracle.parse_info_tlb(text)


def canonical(va: int, va_bits: int) -> bool:
    top = va >> (va_bits - 1)
    return top in (0, (1 << (65 - va_bits)) - 1)


def test_every_line_parsed(capture):
    name, text, lines = capture
    nonblank = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == len(nonblank) > 70_000
    first = nonblank[0].strip()
    assert first == f"{lines[0].va:016x}: {lines[0].pa:016x} {lines[0].flags}"


def test_vas_canonical_sorted_unique(capture):
    name, _, lines = capture
    va_bits = 57 if name == "la57" else 48
    vas = [ln.va for ln in lines]
    assert all(canonical(va, va_bits) for va in vas)
    assert vas == sorted(vas) and len(set(vas)) == len(vas)
    kernel = [va for va in vas if va >> 63]
    assert kernel, "no kernel-half leaves"
    if name == "la57":
        # real 5-level addresses: the kernel half uses bits 56..48 beyond a 4-level sign
        assert any(not canonical(va, 48) for va in kernel)
    else:
        assert all(va >= KERNEL_HALF_4 for va in kernel)


def test_sizes_resolved_and_disjoint(capture):
    _, _, lines = capture
    leaves = oracle.resolve_sizes(lines)
    assert [lf.va for lf in leaves] == [ln.va for ln in lines]
    sizes = {lf.page_size for lf in leaves}
    assert SZ_4K in sizes and SZ_2M in sizes and AMBIGUOUS not in sizes
    prev_end = 0
    for lf in sorted(leaves, key=lambda lf: lf.va):
        assert lf.va % lf.page_size == 0 and lf.pa % lf.page_size == 0, oracle.fmt_leaf(lf)
        assert lf.va >= prev_end, f"overlap at {lf.va:#x}"
        prev_end = lf.va + lf.page_size
        assert (lf.page_size > SZ_4K) == (lf.flags[2] == "P")


def test_coalesce_round_trip(capture):
    _, _, lines = capture
    leaves = oracle.qemu_leaves(lines, start=1 << 63)
    runs = oracle.coalesce(leaves)
    assert len(runs) < len(leaves)
    back = [
        TlbLeaf(r.va + i * r.page_size, r.pa + i * r.page_size, r.page_size, r.flags)
        for r in runs
        for i in range(r.count)
    ]
    assert back == leaves
    for a, b in zip(runs, runs[1:], strict=False):  # maximal: neighbours could not merge
        assert not (
            a.end == b.va
            and a.pa + a.size == b.pa
            and a.flags == b.flags
            and a.page_size == b.page_size
        )


def test_compare_detects_each_kind_of_difference(capture):
    _, _, lines = capture
    q = oracle.qemu_leaves(lines, start=1 << 63)
    assert oracle.compare_leaves(list(q), q).equal
    i, j, k = 7, len(q) // 2, len(q) - 3
    w = list(q)
    w[i] = TlbLeaf(q[i].va, q[i].pa + SZ_4K * 512, q[i].page_size, q[i].flags)  # wrong PA
    flip = "-" if q[j].flags[8] == "W" else "W"
    w[j] = TlbLeaf(q[j].va, q[j].pa, q[j].page_size, q[j].flags[:8] + flip)  # wrong W
    del w[k]  # a leaf the walk missed
    w.append(TlbLeaf(0xFFFF_FFFF_FFFF_F000, 0x1000, SZ_4K, "XG-------"))  # an extra leaf
    d = oracle.compare_leaves(w, q)
    assert not d.equal
    assert [x.va for x, _ in d.differ] == [q[i].va, q[j].va]
    assert [x.va for x in d.only_qemu] == [q[k].va]
    assert [x.va for x in d.only_walker] == [0xFFFF_FFFF_FFFF_F000]
    assert "differ" in d.summary()


def test_accessed_dirty_normalised():
    assert oracle.normalise_flags("XGPDACTUW") == "XGP--CTUW"
    assert oracle.normalise_flags("XGPDACTUW", ignore_ad=False) == "XGPDACTUW"
    lines = [TlbLine(0xFFFF_8880_0000_0000, 0, "XG-DA---W")]
    other = [TlbLeaf(0xFFFF_8880_0000_0000, 0, SZ_4K, "XG------W")]
    assert oracle.compare_leaves(other, oracle.qemu_leaves(lines)).equal
    assert not oracle.compare_leaves(other, oracle.qemu_leaves(lines, ignore_ad=False)).equal


def test_flags_attrs_round_trip():
    for n in range(1 << 9):
        flags = "".join(c if n >> i & 1 else "-" for i, c in enumerate(oracle.TLB_FLAGS))
        size = SZ_2M if flags[2] == "P" else SZ_4K
        attrs = oracle.tlb_attrs(flags)
        assert oracle.attrs_flags(attrs, size, ignore_ad=False) == flags
    a = Attrs(writable=True, exec=False, global_=True, cache=0b111, accessed=True)
    assert oracle.attrs_flags(a, SZ_4K) == "XG---CT-W"
    with pytest.raises(OracleError):
        oracle.tlb_attrs("XG")


def test_ambiguous_large_leaf():
    g = 0xFFFF_8880_4000_0000
    lone = [TlbLine(g, 0x4000_0000, "XGPDA---W")]
    assert oracle.resolve_sizes(lone)[0].page_size == AMBIGUOUS
    two = [*lone, TlbLine(g + SZ_2M, 0x4020_0000, "XGPDA---W")]
    assert [lf.page_size for lf in oracle.resolve_sizes(two)] == [SZ_2M, SZ_2M]
    off = [TlbLine(g, 0x4020_0000, "XGPDA---W")]  # PA not 1G aligned: 2M
    assert oracle.resolve_sizes(off)[0].page_size == SZ_2M
    q = oracle.qemu_leaves(lone)
    for size in (SZ_2M, SZ_1G):
        d = oracle.compare_leaves([TlbLeaf(g, 0x4000_0000, size, "XGP-----W")], q)
        assert d.equal and d.ambiguous == 1
    d = oracle.compare_leaves([TlbLeaf(g, 0x4000_0000, SZ_4K, "XGP-----W")], q)
    assert not d.equal


@pytest.mark.parametrize(
    "text",
    [
        "PG disabled\r\n",
        "No CPU available\r\n",
        "ffff888000000000: 0000000000000000 XG-DA---\r\n",
        "ffff888000000000: 00000000000000 XG-DA---W\r\n",
        "0000000000400000: 000000003fe68000 X---A--U-\r\nunknown command: 'info tlbx'\r\n",
    ],
)
def test_info_tlb_rejects_non_leaf_output(text):
    with pytest.raises(OracleError, match="not understood"):
        oracle.parse_info_tlb(text)


def test_info_tlb_wrapper_times_and_parses():
    text = "ffff888000000000: 0000000000000000 XG-DA---W\r\n"
    calls = []

    def hmp(cmd: str) -> str:
        calls.append(cmd)
        time.sleep(0.05)  # the monitor's time is what info_tlb reports
        return text

    lines, secs = oracle.info_tlb(hmp)
    assert calls == ["info tlb"] and 0.05 <= secs < 5
    assert lines == [TlbLine(0xFFFF_8880_0000_0000, 0, "XG-DA---W")]


def test_parse_gva2gpa():
    assert oracle.parse_gva2gpa("gpa: 0x3fe68123\r\n") == 0x3FE68123
    assert oracle.parse_gva2gpa("gpa: 0\r\n") == 0  # %#x prints a bare 0
    assert oracle.parse_gva2gpa("Unmapped\r\n") is None
    for bad in ("No cpu\r\n", "", "gpa: zz\r\n", "Unmapped\r\nUnmapped\r\n"):
        with pytest.raises(OracleError):
            oracle.parse_gva2gpa(bad)


def fake_gva2gpa(table: dict[int, int]):
    def hmp(cmd: str) -> str:
        verb, arg = cmd.split()
        assert verb == "gva2gpa"
        va = int(arg, 16)
        page = table.get(va & ~0xFFF)
        return "Unmapped\r\n" if page is None else f"gpa: {page + (va & 0xFFF):#x}\r\n"

    return hmp


def test_gva2gpa_many_and_disagreements():
    table = {0xFFFF_8880_0000_0000: 0x1000, 0xFFFF_8880_0000_1000: 0}
    hmp = fake_gva2gpa(table)
    vas = [0xFFFF_8880_0000_0008, 0xFFFF_8880_0000_1010, 0xFFFF_8880_0000_2000]
    def slow_hmp(cmd: str) -> str:
        time.sleep(0.01)
        return hmp(cmd)

    batch = oracle.gva2gpa_many(slow_hmp, vas)
    assert batch.gpas == [0x1008, 0x10, None] and batch.vas == vas
    assert 10_000 <= batch.per_call_us < 1_000_000  # 3 calls of >= 10 ms each, per call
    assert oracle.disagreements([0x1008, 0x10, None], batch) == []
    bad = oracle.disagreements([0x1008, None, 0x5000], batch)
    assert [d.va for d in bad] == vas[1:]
    assert "gva2gpa Unmapped" in str(bad[1])
    piped = SimpleNamespace(hmp_many=lambda cmds: [hmp(c) for c in cmds])
    assert oracle.gva2gpa_many(piped, vas).gpas == batch.gpas
    short = SimpleNamespace(hmp_many=lambda cmds: [])
    with pytest.raises(OracleError, match="replies"):
        oracle.gva2gpa_many(short, vas)


def test_read_virt_and_phys():
    def hmp(cmd: str) -> str:
        if cmd.startswith("x "):
            return "ffffffff8a01b2c8: 0xffff8adc40000000\r\n"
        return "0000000001062000: 0x0000000002a01067 0x0000000000000000\r\n"

    assert oracle.read_virt_u64(hmp, 0xFFFFFFFF8A01B2C8) == 0xFFFF8ADC40000000
    with pytest.raises(OracleError):
        oracle.read_virt_u64(hmp, 0xFFFFFFFF8A01B2D0)  # answer for another address
    with pytest.raises(OracleError):
        oracle.read_virt_u64(lambda c: "ffffffff81000000: Cannot access memory\r\n", 1)
    assert oracle.read_phys_u64s(hmp, 0x1062000, 2) == [0x2A01067, 0]
    with pytest.raises(OracleError):
        oracle.read_phys_u64s(hmp, 0x1062000, 3)


def build_tables(fmt, leaves: list[TlbLeaf]):
    """A SparseMemory page table holding exactly ``leaves`` (attrs from their flags)."""
    from ptlab.memory.sparse import SparseMemory

    level_of = {SZ_4K: 0, SZ_2M: 1, SZ_1G: 2}
    mem = SparseMemory()
    root = 1 << 48  # tables far above every leaf PA
    nxt = [root + SZ_4K]
    tables: dict[tuple[int, int], int] = {}  # (level, va prefix) -> table PA
    low_mask = fmt.va_span - 1
    for lf in leaves:
        va, leaf_level = lf.va & low_mask, level_of[lf.page_size]
        table = root
        for level in range(fmt.top_level, leaf_level, -1):
            key = (level - 1, va >> fmt.shift(level))
            child = tables.get(key)
            if child is None:
                child = tables[key] = nxt[0]
                nxt[0] += SZ_4K
                mem.write_u64(table + fmt.index(va, level) * 8, fmt.table(child, level))
            table = child
        entry = fmt.leaf(lf.pa, oracle.tlb_attrs(lf.flags), leaf_level)
        mem.write_u64(table + fmt.index(va, leaf_level) * 8, entry)
    return mem, root


@pytest.mark.parametrize("name,levels", [("4level", 4), ("la57", 5)])
def test_walker_leaves_of_real_layout(name, levels):
    """The real leaves re-encoded with ptlab's x86 format and walked by ptlab's walker come
    back, through walker_leaves, as exactly QEMU's lines (A/D kept: nothing normalised)."""
    from ptlab.formats.x86 import X86_64
    from ptlab.walk import Walker, translate

    fmt = X86_64(levels)
    lo = fmt.va_ranges()[1][0]
    q = oracle.qemu_leaves(oracle.parse_info_tlb(load(name)), lo, ignore_ad=False)
    mem, root = build_tables(fmt, q)
    runs = list(Walker(fmt, mem, root).runs(lo, 1 << 64))
    w = oracle.walker_leaves(runs, ignore_ad=False)
    d = oracle.compare_leaves(w, q)
    assert d.equal, d.summary()
    assert oracle.coalesce(w) == oracle.coalesce(q)
    as_runs = oracle.tlb_runs(oracle.parse_info_tlb(load(name)), lo, ignore_ad=False)
    assert oracle.walker_leaves(as_runs, ignore_ad=False) == q  # ptlab Run form round-trips
    # one flipped bit in one real leaf shows up as exactly one differing leaf
    target = q[len(q) // 3]
    t = translate(fmt, mem, root, target.va)
    mem.write_u64(t.steps[-1].entry_pa, t.steps[-1].raw ^ 0x2)  # RW
    w2 = oracle.walker_leaves(Walker(fmt, mem, root).runs(lo, 1 << 64), ignore_ad=False)
    d2 = oracle.compare_leaves(w2, q)
    assert [x.va for x, _ in d2.differ] == [target.va]


def test_real_hmp_replies():
    """Replies captured from QEMU 7.2 (tests/data/hmp-replies.json: x86_64 and arm64 guests,
    stopped in the kernel) parse, and direct-map answers agree with the direct map offset."""
    import json

    replies = json.loads((DATA / "hmp-replies.json").read_text())
    kinds = set()
    for r in replies:
        verb, arg = r["command"].split()[0], r["command"].split()[-1]
        addr = int(arg, 16)
        if verb == "gva2gpa":
            gpa = oracle.parse_gva2gpa(r["reply"])
            kinds.add("unmapped" if gpa is None else "gpa")
            if gpa is not None and addr >= r["direct_map_base"]:
                if addr - r["direct_map_base"] < 1 << 40:  # a direct-map VA
                    assert gpa == addr - r["direct_map_base"] + r["phys_offset"]
            if addr < 1 << 47:
                assert gpa is None  # nothing mapped at user VA 0x10 in the kernel's tables
        elif verb == "x" and "Cannot access" in r["reply"]:
            with pytest.raises(OracleError):
                oracle.read_virt_u64(lambda c, t=r["reply"]: t, addr)
            kinds.add("x-fault")
        elif verb == "x":
            value = oracle.read_virt_u64(lambda c, t=r["reply"]: t, addr)
            assert value == r["direct_map_base"]  # page_offset_base holds the direct map base
            kinds.add("x")
        else:
            assert len(oracle.read_phys_u64s(lambda c, t=r["reply"]: t, addr, 2)) == 2
            kinds.add("xp")
    assert kinds == {"gpa", "unmapped", "x", "x-fault", "xp"}
    assert any(r["reply"].strip() == "gpa: 0" for r in replies)


def test_covering_finds_the_leaf_each_va_lies_in():
    lines = [
        oracle.TlbLine(0xFFFF888000000000, 0, "--P-A---W"),  # 2M (a 4K line follows)
        oracle.TlbLine(0xFFFF888000200000, 0x200000, "--------W"),  # 4K
        oracle.TlbLine(0xFFFF888040000000, 0x40000000, "X-P-A---W"),  # 2M or 1G
    ]
    vas = [0xFFFF888000000000, 0xFFFF8880001FF000, 0xFFFF888000200000,
           0xFFFF888000201000,  # in no line
           0xFFFF888040100000,  # the first 2M of the ambiguous line: certain
           0xFFFF888040400000,  # past it: 1G or unmapped, unknown
           0xFFFF887FFFFFF000]  # below every line
    got = {va: leaf.va for va, leaf in oracle.covering(lines, vas).items()}
    assert got == {0xFFFF888000000000: 0xFFFF888000000000,
                   0xFFFF8880001FF000: 0xFFFF888000000000,
                   0xFFFF888000200000: 0xFFFF888000200000,
                   0xFFFF888040100000: 0xFFFF888040000000}

"""ptdump text: kernel-format rendering (x86-64 4/5-level, arm64), parse round trip, W+X audit
and semantic diff on hand-built tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from ptlab.dump import (
    DumpRun,
    PtdumpParseError,
    check_wx,
    detect_arch,
    diff,
    dump,
    format_runs,
    kernel_ranges,
    note_runs,
    parse,
    render,
    wx_runs,
    x86_markers,
)
from ptlab.dump.render import Header, Skipped
from ptlab.formats.arm64 import Arm64
from ptlab.formats.catalog import all_configs
from ptlab.formats.x86 import X86_64
from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder
from ptlab.walk import Walker, walk_runs

DATA = Path(__file__).resolve().parents[1] / "data"
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
X86_ROX = X86_PAGE_KERNEL.with_(writable=False, exec=True, uexec=True)
ARM_ROX = ARM64_PAGE_KERNEL.with_(writable=False, exec=True, dbm=False)


def x86_4level() -> TableBuilder:
    b = TableBuilder(X86_64(4))
    b.map(0xFFFF_8880_0000_0000, 0, 16 * K4, X86_PAGE_KERNEL)
    b.map(0xFFFF_8880_0020_0000, M2, 4 * M2, X86_PAGE_KERNEL, level=1)
    b.map(0xFFFF_FFFF_8100_0000, 0x100_0000, M2, X86_ROX, level=1)
    b.map(0x40_0000, 0x500_0000, 3 * K4, X86_PAGE_KERNEL.with_(user=True))
    return b


def x86_5level() -> TableBuilder:
    fmt = X86_64(5)
    b = TableBuilder(fmt)
    gone = X86_PAGE_KERNEL.with_(present=False, writable=False)
    b.map(0xFF11_0000_0000_0000, 0, 4 * K4, X86_PAGE_KERNEL)
    b.set_raw(0xFF11_0000_0000_1000, 0, fmt.leaf(0x1000, gone, 0))  # secretmem-style hole
    b.map(0xFF11_0000_4000_0000, G1, G1, X86_PAGE_KERNEL, level=2)
    b.map(0xFFFF_FFFF_8100_0000, 0x100_0000, K4, X86_ROX.with_(cache=4))
    b.map(0xFFFF_FFFF_8100_1000, 0x100_1000, K4, X86_PAGE_KERNEL.with_(cache=3))
    return b


def arm64_4k() -> TableBuilder:
    b = TableBuilder(Arm64(4096, 48))
    b.map(0xFFFF_0000_0000_0000, 0x4000_0000, 16 * K4, ARM64_PAGE_KERNEL)
    b.map(0xFFFF_0000_0020_0000, 0x4020_0000, 2 * M2, ARM64_PAGE_KERNEL, level=1)
    b.map(0xFFFF_8000_0800_0000, 0x5000_0000, 4 * K4, ARM_ROX)
    return b


SCENARIOS = {"x86_64-4level": x86_4level, "x86_64-5level": x86_5level,
             "arm64-4k-48": arm64_4k}


# --- rendering ---------------------------------------------------------------------------------
def c_x86_line(start: int, end: int, prot_words: set[str], level: str) -> str:
    """The line as dump_pagetables.c's format strings print it (written from the C source)."""
    delta, units, u = (end - start) % (1 << 64), "BKMGTPE", 0
    while not delta & 1023 and u < 6:
        delta >>= 10
        u += 1
    line = "0x%0*x-0x%0*x   " % (16, start, 16, end) + "%9d%c " % (delta, units[u])  # noqa: UP031
    if not prot_words:
        line += " " * 30
    else:
        w = prot_words
        line += "USR " if "USR" in w else "    "
        line += "RW " if "RW" in w else "ro "
        for name in ("PWT", "PCD", "PSE", "PAT", "GLB"):
            line += name + " " if name in w else "    "
        line += "NX " if "NX" in w else "x  "
    return line + "%s" % level  # noqa: UP031


def c_arm64_line(start: int, end: int, bits: list[str], level: str) -> str:
    """The line as arch/arm64/mm/ptdump.c prints it; ``bits`` = dump_prot's strings."""
    delta, units, u = ((end - start) % (1 << 64)) >> 10, "KMGTPE", 0
    while not delta & 1023 and u < 5:
        delta >>= 10
        u += 1
    line = "0x%016x-0x%016x   " % (start, end) + "%9d%c %s" % (delta, units[u], level)  # noqa: UP031
    return line + "".join(" %s" % s for s in bits)  # noqa: UP031


def test_x86_lines_match_kernel_format_strings():
    b = x86_4level()
    lines = dump(b.fmt, b.mem, b.root).splitlines()
    assert lines[0] == "---[ User Space ]---"
    assert c_x86_line(0x40_0000, 0x40_3000, {"RW", "USR", "GLB", "NX"}, "pte") in lines
    assert c_x86_line(0xFFFF_8880_0020_0000, 0xFFFF_8880_00A0_0000,
                      {"RW", "PSE", "GLB", "NX"}, "pmd") in lines
    assert c_x86_line(0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8120_0000,
                      {"ro", "PSE", "GLB", "x"}, "pmd") in lines
    # holes are printed at the level the walk met them; the top level as pgd (real_depth)
    assert c_x86_line(0x60_0000, 0x4000_0000, set(), "pmd") in lines
    assert c_x86_line(0x40_3000, 0x60_0000, set(), "pte") in lines
    # the walk skips the hypervisor hole: the last user line runs up to GUARD_HOLE_END_ADDR
    assert c_x86_line(0x80_0000_0000, 0xFFFF_8800_0000_0000, set(), "pgd") in lines
    # the first direct-map page is printed before its marker (one marker advance per call)
    i = lines.index("---[ LDT remap ]---")
    assert lines[i + 1] == c_x86_line(0xFFFF_8880_0000_0000, 0xFFFF_8880_0000_1000,
                                      {"RW", "GLB", "NX"}, "pte")
    assert lines[i + 2] == "---[ Low Kernel Mapping ]---"
    # the final flush ends at 0
    assert lines[-1] == c_x86_line(0xFFFF_FFFF_C000_0000, 0, set(), "pud")


def test_arm64_lines_match_kernel_format_strings():
    b = arm64_4k()
    lines = dump(b.fmt, b.mem, b.root).splitlines()
    assert lines[0] == "---[ Linear Mapping start ]---"
    kernel = [" ", "   ", "RW", "NX", "SHD", "AF", "NG", "   ", "   ", "UXN", "  ", "MEM/NORMAL"]
    assert lines[1] == c_arm64_line(0xFFFF_0000_0000_0000, 0xFFFF_0000_0001_0000, kernel, "PTE")
    block = kernel[:8] + ["BLK"] + kernel[9:]
    assert c_arm64_line(0xFFFF_0000_0020_0000, 0xFFFF_0000_0060_0000, block, "PMD") in lines
    rox = [" ", "   ", "ro", "x ", "SHD", "AF", "NG", "   ", "   ", "UXN", "  ", "MEM/NORMAL"]
    assert c_arm64_line(0xFFFF_8000_0800_0000, 0xFFFF_8000_0800_4000, rox, "PTE") in lines
    assert c_arm64_line(0xFFFF_0000_0001_0000, 0xFFFF_0000_0020_0000, [], "PTE") in lines
    # two markers at one address: both headers, back to back
    i = lines.index("---[ Linear Mapping end ]---")
    assert lines[i + 1] == "---[ Modules start ]---"
    assert lines[-1] == c_arm64_line(0xFFFF_FE00_0000_0000, 0, [], "PGD")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dump_matches_fixture(name):
    """Regression golden: the fixtures are this renderer's own output, not kernel output (their
    lines are checked against the kernel's format strings in test_ptdump_kernel_format.py)."""
    b = SCENARIOS[name]()
    expected = (DATA / f"ptdump-{name}.txt").read_text()
    assert dump(b.fmt, b.mem, b.root) == expected


def test_x86_kaslr_bases_move_markers():
    b = x86_4level()
    moved = dump(b.fmt, b.mem, b.root, x86_markers(4, page_offset_base=0xFFFF_9000_0000_0000,
                                                    vmalloc_base=0xFFFF_B000_0000_0000))
    lines = moved.splitlines()
    i = lines.index("---[ Low Kernel Mapping ]---")
    assert lines[i - 1].startswith("0xffff890000000000-0xffff900000000000")
    assert "---[ vmalloc() Area ]---" in lines


def test_espfix_max_lines_and_skip_note():
    fmt = X86_64(4)
    b = TableBuilder(fmt)
    esp = 0xFFFF_FF00_0000_0000
    for i in range(20):  # 20 single pages with 19 holes between them
        b.map(esp + 2 * i * K4, 0x10_0000 + i * K4, K4, X86_PAGE_KERNEL)
    # a mapping above makes the walk reach the EFI marker at pud granularity
    b.map(0xFFFF_FFFF_8100_0000, 0x100_0000, K4, X86_ROX)
    items = note_runs(Walker(fmt, b.mem, b.root, include_holes=True).runs(), fmt)
    start = items.index(Header("ESPfix Area"))
    end = items.index(Header("EFI Runtime Services"))
    section = items[start + 1:end]
    assert sum(isinstance(x, DumpRun) for x in section) == 16
    # 39 lines for pages and holes, then pte, pmd and pud holes up to the EFI marker: 42 lines
    assert section[-1] == Skipped(42 - 16)
    text = render(Walker(fmt, b.mem, b.root, include_holes=True).runs(), fmt)
    assert "... 26 entries skipped ... \n---[ EFI Runtime Services ]---\n" in text


# --- parse ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_parse_round_trip(name):
    b = SCENARIOS[name]()
    text = dump(b.fmt, b.mem, b.root)
    runs = parse(text)
    assert detect_arch(text) == b.fmt.arch
    assert parse(format_runs(runs, b.fmt.arch)) == runs
    # lines are contiguous (the kernel's last line ends at 0) and carry their section
    assert all(a.end == c.va for a, c in zip(runs, runs[1:], strict=False))
    assert runs[-1].end == 0
    assert runs[0].section in ("User Space", "Linear Mapping start")
    mapped = [r for r in runs if r.mapped]
    walked, _ = walk_runs(b.fmt, b.mem, b.root)
    assert sum(r.size for r in mapped) == sum(r.size for r in walked)


def test_format_runs_reproduces_text_without_empty_sections():
    b = x86_4level()
    text = dump(b.fmt, b.mem, b.root)
    assert format_runs(parse(text), "x86_64") == text


def test_parse_errors_name_the_line():
    b = arm64_4k()
    lines = dump(b.fmt, b.mem, b.root).splitlines()
    with pytest.raises(PtdumpParseError, match="line 3"):
        parse("\n".join([*lines[:2], "hello world", *lines[2:]]))
    bad = lines[1].replace("64K", "32K")
    with pytest.raises(PtdumpParseError, match="does not match"):
        parse(bad)
    with pytest.raises(PtdumpParseError):
        parse("0x0000000000000000-0x0000000000001000           4K nonsense")
    with pytest.raises(TypeError):
        parse(b"bytes")  # type: ignore[arg-type]
    assert parse("") == []


# --- W+X ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [X86_64(4), X86_64(5), Arm64(4096, 48)], ids=lambda f: f.name)
def test_wx_audit_finds_planted_page_only(fmt):
    x86 = fmt.arch == "x86_64"
    rw, rox = (X86_PAGE_KERNEL, X86_ROX) if x86 else (ARM64_PAGE_KERNEL, ARM_ROX)
    wx = rox.with_(writable=True)
    base = 0xFFFF_FFFF_8100_0000 if x86 else 0xFFFF_8000_0800_0000
    b = TableBuilder(fmt)
    b.map(base, 0x100_0000, 8 * K4, rox)
    b.map(base + 8 * K4, 0x100_8000, 8 * K4, rw)
    clean = check_wx(fmt, b.mem, b.root)
    assert clean.passed and clean.runs == [] and "passed, no W+X pages found" in clean.message
    b.map(base + 4 * M2, 0x200_0000, K4, wx)
    report = check_wx(fmt, b.mem, b.root)
    assert [(r.va, r.size) for r in report.runs] == [(base + 4 * M2, K4)]
    assert report.wx_pages == 1 and not report.passed
    assert "FAILED, 1 W+X pages found" in report.message
    parsed = wx_runs(parse(dump(fmt, b.mem, b.root)))
    assert [(r.va, r.end) for r in parsed] == [(base + 4 * M2, base + 4 * M2 + K4)]


# --- diff ---------------------------------------------------------------------------------------
def test_diff_finds_planted_changes_and_coalesces():
    fmt = X86_64(4)
    base = 0xFFFF_8880_0000_0000
    old = TableBuilder(fmt)
    old.map(base, 0, 64 * K4, X86_PAGE_KERNEL)
    new = TableBuilder(fmt)
    new.map(base, 0, 64 * K4, X86_PAGE_KERNEL)
    new.map(base + 8 * K4, 8 * K4, 3 * K4, X86_ROX)  # protect 3 pages
    new.mem.write_u64(new.entry_pa(base + 20 * K4, 0), 0)  # unmap one page
    new.map(base + 64 * K4, 64 * K4, 2 * K4, X86_PAGE_KERNEL)  # add two pages
    new.map(base + 30 * K4, 0x900_0000, K4, X86_PAGE_KERNEL)  # remap one page elsewhere
    a, _ = walk_runs(fmt, old.mem, old.root)
    c, _ = walk_runs(fmt, new.mem, new.root)
    changes = diff(a, c)
    assert [(x.va - base, x.size, x.kind) for x in changes] == [
        (8 * K4, 3 * K4, "changed"), (20 * K4, K4, "removed"), (30 * K4, K4, "changed"),
        (64 * K4, 2 * K4, "added")]
    assert changes[0].old == X86_PAGE_KERNEL and changes[0].new == X86_ROX
    assert changes[0].old_pa == changes[0].new_pa == 8 * K4
    assert (changes[2].old_pa, changes[2].new_pa) == (30 * K4, 0x900_0000)
    assert changes[3].old is None and changes[3].new == X86_PAGE_KERNEL
    assert diff(a, c, compare_pa=False)[2].kind == "added"
    assert diff(a, a) == []
    # the same diff from parsed ptdump text (no PAs there)
    ta, tc = parse(dump(fmt, old.mem, old.root)), parse(dump(fmt, new.mem, new.root))
    text_changes = diff(ta, tc)
    assert [(x.va - base, x.size, x.kind) for x in text_changes] == [
        (8 * K4, 3 * K4, "changed"), (20 * K4, K4, "removed"), (64 * K4, 2 * K4, "added")]
    assert text_changes[0].new == ("ro", "GLB", "x")


def test_diff_split_is_not_a_change_unless_page_size_compared():
    fmt = X86_64(4)
    base = 0xFFFF_8880_0000_0000
    big = TableBuilder(fmt)
    big.map(base, 0, M2, X86_PAGE_KERNEL, level=1)
    small = TableBuilder(fmt)
    small.map(base, 0, M2, X86_PAGE_KERNEL)
    a, _ = walk_runs(fmt, big.mem, big.root)
    c, _ = walk_runs(fmt, small.mem, small.root)
    assert diff(a, c) == []
    (ch,) = diff(a, c, compare_page_size=True)
    assert (ch.va, ch.size, ch.kind) == (base, M2, "split")
    assert (ch.old_page_size, ch.new_page_size) == (M2, 4096)
    (ch,) = diff(c, a, compare_page_size=True)
    assert (ch.va, ch.size, ch.kind) == (base, M2, "merged")
    small.map(base + M2, M2, 4096, X86_ROX)  # a permission change stays a change
    c, _ = walk_runs(fmt, small.mem, small.root)
    assert [x.kind for x in diff(a, c, compare_page_size=True)] == ["split", "added"]


@pytest.mark.parametrize("fmt", all_configs(), ids=lambda f: f.name)
def test_every_format_dumps_and_round_trips(fmt):
    b = TableBuilder(fmt)
    attrs = fmt.normalize(X86_PAGE_KERNEL if fmt.arch == "x86_64" else ARM64_PAGE_KERNEL)
    start = kernel_ranges(fmt)[-1][0]  # x86: past the hypervisor hole the kernel skips
    g = fmt.page_sizes()[0]
    b.map(start + 5 * g, 0x4000_0000, 7 * g, attrs)
    b.map(start + 2 * fmt.entry_size(1), 0x8000_0000, fmt.entry_size(1), attrs, level=1)
    text = dump(fmt, b.mem, b.root)
    runs = parse(text, fmt.arch)
    assert parse(format_runs(runs, fmt.arch)) == runs
    assert all(a.end == c.va for a, c in zip(runs, runs[1:], strict=False))
    mapped = [(r.va, r.size) for r in runs if r.mapped]
    assert mapped == [(start + 5 * g, 7 * g), (start + 2 * fmt.entry_size(1), fmt.entry_size(1))]


def test_arm64_invalid_entry_prints_f():
    fmt = Arm64(4096, 48)
    b = TableBuilder(fmt)
    base = 0xFFFF_0000_0000_0000
    b.map(base, 0x4000_0000, 3 * K4, ARM64_PAGE_KERNEL)
    # set_direct_map_invalid_noflush(): PTE_VALID cleared, the other bits kept
    b.set_raw(base + K4, 0, fmt.leaf(0x4000_1000, ARM64_PAGE_KERNEL.with_(present=False), 0))
    runs = parse(dump(fmt, b.mem, b.root))
    assert [(r.va - base, r.flags[0], r.mapped) for r in runs[:3]] == [
        (0, "RW", True), (K4, "F", False), (2 * K4, "RW", True)]
    assert runs[1].flags == ("F", "RW", "NX", "SHD", "AF", "NG", "UXN", "MEM/NORMAL")


def test_wx_counts_like_the_kernel():
    fmt = X86_64(4)
    b = TableBuilder(fmt)
    wx = X86_ROX.with_(writable=True)
    b.map(0xFFFF_8000_0000_0000, 0x100_0000, K4, wx)  # in the hypervisor hole: not walked
    assert check_wx(fmt, b.mem, b.root).passed
    assert len(wx_runs(walk_runs(fmt, b.mem, b.root)[0])) == 1
    b.map(0xFFFF_8880_0000_0000, 0x200_0000, 3 * K4, wx)
    b.set_raw(0xFFFF_8880_0000_1000, 0, fmt.leaf(0x200_1000, wx.with_(present=False), 0))
    report = check_wx(fmt, b.mem, b.root)
    assert report.wx_pages == 3  # the kernel reads RW/NX of the non-present entry too
    arm = Arm64(4096, 48)
    b = TableBuilder(arm)
    b.map(0xFFFF_0000_0000_0000, 0x4000_0000, 2 * K4, ARM64_PAGE_KERNEL.with_(uexec=True))
    report = check_wx(arm, b.mem, b.root)
    assert (report.wx_pages, report.uxn_pages) == (0, 2)
    assert report.message == ("Checked W+X mappings: FAILED, 0 W+X pages found, "
                              "2 non-UXN pages found")


def test_wx_judges_effective_bits_on_x86_and_own_bits_on_arm64():
    """x86 note_wx() sees effective permissions (an NX pud hides a W+X pte); arm64's
    note_page() masks the leaf's own bits only (arch/arm64/mm/ptdump.c), so a W+X leaf under
    a PXNTable entry still counts."""
    x86 = X86_64(4)
    b = TableBuilder(x86)
    va = 0xFFFF_8880_0000_0000
    b.map(va, 0x200_0000, 2 * K4, X86_ROX.with_(writable=True))
    assert check_wx(x86, b.mem, b.root).wx_pages == 2
    b.set_table_attrs(va, 2, x86.table_attrs().with_(exec=False, uexec=False))
    assert check_wx(x86, b.mem, b.root).passed
    arm = Arm64(4096, 48)
    b = TableBuilder(arm)
    va = 0xFFFF_0000_0000_0000
    b.map(va, 0x4000_0000, 2 * K4, ARM64_PAGE_KERNEL.with_(exec=True))
    assert check_wx(arm, b.mem, b.root).wx_pages == 2
    b.set_table_attrs(va, 1, arm.table_attrs().with_(exec=False))
    assert walk_runs(arm, b.mem, b.root)[0][0].attrs.exec is False  # effective: not executable
    report = check_wx(arm, b.mem, b.root)
    assert (report.wx_pages, report.uxn_pages) == (2, 0)

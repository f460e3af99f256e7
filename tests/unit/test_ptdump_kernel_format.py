"""The ptdump fixtures against the kernel's own printf formats, line by line.

tests/data/ptdump-*.txt were written by ptlab's renderer (pylib/ptlab/dump/render.py) from the
hand-built tables of test_dump.py; test_dump.py keeps them as regression goldens. They are not
kernel output (the Debian guests have no PTDUMP_DEBUGFS), so they prove nothing about the
kernel's format by themselves. The witness here is the kernel source: the format strings, the
protection-word tables and the level and marker names below are quoted from Linux 6.1
arch/x86/mm/dump_pagetables.c (``note_page()``, ``printk_prot()``, ``address_markers[]``) and
arch/arm64/mm/ptdump.c (``note_page()``, ``dump_prot()``, ``pte_bits[]``, ``pg_level[]``,
``address_markers[]``), and applied with C printf semantics. Every line of every fixture must
be exactly what those ``seq_printf`` calls print for the addresses the line names; nothing
here comes from ptlab.dump.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURES = sorted(DATA.glob("ptdump-*.txt"))

# --- quoted from the kernel (6.1) ----------------------------------------------------------------
HEADER = "---[ %s ]---\n"                          # both note_page()s
X86_RANGE = "0x%0*lx-0x%0*lx   "                   # x86 note_page(), width = 2 * sizeof(long)
X86_SIZE = "%9lu%c "                               # x86 note_page()
X86_UNITS = "BKMGTPE"                              # x86 note_page() units[]
X86_SKIPPED = "... %lu entr%s skipped ... \n"      # x86 note_page(), markers with max_lines
X86_NOT_PRESENT = "                              "  # printk_prot(), !_PAGE_PRESENT
X86_PROT = (("USR ", "    "), ("RW ", "ro "), ("PWT ", "    "), ("PCD ", "    "),
            ("PSE ", "    "), ("PAT ", "    "), ("GLB ", "    "), ("NX ", "x  "))  # printk_prot()
X86_LEVEL = "%s\n"                                 # printk_prot(), level_name[]
X86_LEVEL_NAMES = ("pgd", "p4d", "pud", "pmd", "pte")
X86_MARKERS = ("User Space", "Kernel Space", "LDT remap", "Low Kernel Mapping", "vmalloc() Area",
               "Vmemmap", "KASAN shadow", "KASAN shadow end", "CPU entry Area", "ESPfix Area",
               "EFI Runtime Services", "High Kernel Mapping", "Modules", "End Modules",
               "Fixmap Area")

ARM64_RANGE = "0x%016lx-0x%016lx   "              # arm64 note_page()
ARM64_SIZE = "%9lu%c %s"                           # arm64 note_page(): delta >> 10, level name
ARM64_UNITS = "KMGTPE"
ARM64_BIT = " %s"                                  # dump_prot(), for each pte_bits[] entry
ARM64_PTE_BITS = ((" ", "F"), ("USR", "   "), ("ro", "RW"), ("NX", "x "), ("SHD", "   "),
                  ("AF", "  "), ("NG", "  "), ("CON", "   "), ("   ", "BLK"), ("UXN", "   "),
                  ("GP", "  "))                    # pte_bits[]: .set, .clear
ARM64_MEMTYPES = ("DEVICE/nGnRnE", "DEVICE/nGnRE", "MEM/NORMAL-NC", "MEM/NORMAL",
                  "MEM/NORMAL-TAGGED")             # pte_bits[] PTE_ATTRINDX_MASK: .set only
ARM64_LEVEL_NAMES = ("PGD", "P4D", "PUD", "PMD", "PTE")  # pg_level[].name
ARM64_MARKERS = ("Linear Mapping start", "Linear Mapping end", "Kasan shadow start",
                 "Kasan shadow end", "Modules start", "Modules end", "vmalloc() area",
                 "vmalloc() end", "Fixmap start", "Fixmap end", "PCI I/O start", "PCI I/O end",
                 "vmemmap start", "vmemmap end")
U64 = 1 << 64


def c_printf(fmt: str, *args: object) -> str:
    """C printf for the conversions above: drop the ``l`` length modifier, keep the rest."""
    return re.sub(r"%([-0-9*]*)l([xud])", r"%\1\2", fmt) % args


def scaled(delta: int, units: str) -> tuple[int, str]:
    """``while (!(delta & 1023) && unit[1]) { delta >>= 10; unit++; }``"""
    i = 0
    while not delta & 1023 and i + 1 < len(units):
        delta >>= 10
        i += 1
    return delta, units[i]


def take(rest: str, choices: tuple[str, ...], what: str) -> str:
    for c in choices:
        if rest.startswith(c):
            return rest[len(c):]
    raise AssertionError(f"{what}: none of {choices} at {rest!r}")


def check_x86_range(line: str, start: int, end: int) -> tuple[str, bool]:
    """(level name, mapped) of an x86 range line, which must be the kernel's printf output."""
    prefix = c_printf(X86_RANGE, 16, start, 16, end) + c_printf(X86_SIZE,
                                                                *scaled((end - start) % U64,
                                                                        X86_UNITS))
    assert line.startswith(prefix), f"{line!r} != {prefix!r}..."
    rest = line[len(prefix):] + "\n"
    mapped = not rest.startswith(X86_NOT_PRESENT)
    if mapped:
        for word in X86_PROT:
            rest = take(rest, word, line)
    else:
        rest = rest[len(X86_NOT_PRESENT):]
    assert rest in {c_printf(X86_LEVEL, n) for n in X86_LEVEL_NAMES}, line
    return rest.strip(), mapped


def check_arm64_range(line: str, start: int, end: int) -> tuple[str, bool]:
    """(level name, mapped) of an arm64 range line, which must be the kernel's printf output."""
    delta, unit = scaled(((end - start) % U64) >> 10, ARM64_UNITS)
    for level in ARM64_LEVEL_NAMES:
        prefix = c_printf(ARM64_RANGE, start, end) + c_printf(ARM64_SIZE, delta, unit, level)
        if line.startswith(prefix):
            break
    else:
        raise AssertionError(f"{line!r}: not the kernel's range, size and level")
    rest = line[len(prefix):]
    if rest:  # a mapping: every pte_bits[] word, then exactly one memory type
        for set_, clear in ARM64_PTE_BITS:
            rest = take(rest, (c_printf(ARM64_BIT, set_), c_printf(ARM64_BIT, clear)), line)
        assert rest in {c_printf(ARM64_BIT, m) for m in ARM64_MEMTYPES}, line
    return level, bool(line[len(prefix):])


def check_dump(text: str) -> dict[str, int]:
    """Check every line of a ptdump text; returns counts of what was seen."""
    assert text.endswith("\n")
    arm64 = text.startswith(c_printf(HEADER, ARM64_MARKERS[0]))
    markers = ARM64_MARKERS if arm64 else X86_MARKERS
    seen = {"ranges": 0, "mapped": 0, "headers": 0, "skipped": 0}
    prev_end = None
    for line in text.splitlines():
        if m := re.fullmatch(r"---\[ (.*) \]---", line):
            assert c_printf(HEADER, m[1]) == line + "\n" and m[1] in markers, line
            seen["headers"] += 1
        elif m := re.fullmatch(r"\.\.\. (\d+) entr(?:y|ies) skipped \.\.\. ", line):
            n = int(m[1])
            assert not arm64 and c_printf(X86_SKIPPED, n, "y" if n == 1 else "ies") == line + "\n"
            seen["skipped"] += 1
            prev_end = None  # the skipped lines' addresses are not printed
        else:
            m = re.match(r"0x([0-9a-f]{16})-0x([0-9a-f]{16})", line)
            assert m, f"not a kernel ptdump line: {line!r}"
            start, end = int(m[1], 16), int(m[2], 16)
            assert prev_end is None or start == prev_end, f"{line!r} does not continue"
            _, mapped = (check_arm64_range if arm64 else check_x86_range)(line, start, end)
            seen["ranges"] += 1
            seen["mapped"] += mapped
            prev_end = end
    assert prev_end == 0  # the final flush ends at the top of the address space (wraps to 0)
    return seen


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_lines_are_kernel_printf_output(path: Path):
    seen = check_dump(path.read_text())
    assert seen["ranges"] >= 10 and seen["mapped"] >= 3 and seen["headers"] >= 8, seen


def test_fixtures_cover_both_architectures():
    names = {p.stem for p in FIXTURES}
    assert {"ptdump-x86_64-4level", "ptdump-x86_64-5level", "ptdump-arm64-4k-48"} <= names


# The checker itself rejects what the kernel cannot print (it is not vacuous).
@pytest.mark.parametrize("bad", [
    "0x0000000000400000-0x0000000000403000          12K USR RW                 GLB NX  pte",
    "0x0000000000400000-0x0000000000403000         12K USR RW                 GLB NX pte",
    "0x0000000000400000-0x0000000000403000        3072B USR RW                 GLB NX pte",
    "0x0000000000400000-0x0000000000403000          12K USR RW                 GLB    pte",
    "0x0000000000400000-0x0000000000403000          12K usr RW                 GLB NX pte",
    "0x0000000000400000-0x0000000000403000          12K USR RW                 GLB NX PTE",
    "0x400000-0x403000          12K USR RW                 GLB NX pte",
])
def test_checker_rejects_non_kernel_x86_lines(bad):
    good = "0x0000000000400000-0x0000000000403000          12K USR RW                 GLB NX pte"
    assert check_x86_range(good, 0x400000, 0x403000) == ("pte", True)
    with pytest.raises(AssertionError):
        check_dump(f"---[ User Space ]---\n{bad}\n"
                   "0x0000000000403000-0x0000000000000000 16777215T                               "
                   "pgd\n")


@pytest.mark.parametrize("bad", [
    "0xffff000000000000-0xffff000000010000          64K PTE       RW NX SHD AF NG         UXN",
    "0xffff000000000000-0xffff000000010000          64K PTE       RW NX SHD AF NG         UXN "
    "   MEM/NORMAL MEM/NORMAL-NC",
    "0xffff000000000000-0xffff000000010000          64K PTE      RW NX SHD AF NG         UXN    "
    "MEM/NORMAL",
    "0xffff000000000000-0xffff000000010000          64K pte       RW NX SHD AF NG         UXN    "
    "MEM/NORMAL",
])
def test_checker_rejects_non_kernel_arm64_lines(bad):
    good = ("0xffff000000000000-0xffff000000010000          64K PTE       RW NX SHD AF NG         "
            "UXN    MEM/NORMAL")
    assert check_arm64_range(good, 0xFFFF_0000_0000_0000, 0xFFFF_0000_0001_0000) == ("PTE", True)
    with pytest.raises(AssertionError):
        check_arm64_range(bad, 0xFFFF_0000_0000_0000, 0xFFFF_0000_0001_0000)


def test_renderer_output_beyond_the_fixtures():
    """Fresh renderer output (ESPfix's skipped lines, cache and user bits, arm64 contiguous
    and device pages) passes the same kernel-format check."""
    from ptlab.dump import dump
    from ptlab.formats.arm64 import Arm64
    from ptlab.formats.x86 import X86_64
    from ptlab.testing import ARM64_PAGE_KERNEL, X86_PAGE_KERNEL, TableBuilder

    x86 = TableBuilder(X86_64(4))
    for i in range(20):  # 20 single ESPfix pages: more lines than the marker's max_lines
        x86.map(0xFFFF_FF00_0000_0000 + 2 * i * 4096, 0x10_0000 + i * 4096, 4096,
                X86_PAGE_KERNEL)
    x86.map(0xFFFF_FFFF_8100_0000, 0x100_0000, 4096, X86_PAGE_KERNEL.with_(cache=3, user=True))
    seen = check_dump(dump(x86.fmt, x86.mem, x86.root))
    # ESPfix prints max_lines = 16 lines (8 pages, 8 holes), then one "skipped"; + the text page
    assert seen["skipped"] == 1 and seen["mapped"] == 9, seen

    arm = TableBuilder(Arm64(4096, 48))
    arm.map(0xFFFF_0000_0000_0000, 0x4000_0000, 16 * 4096,
            ARM64_PAGE_KERNEL.with_(contiguous=True))
    arm.map(0xFFFF_8000_0800_0000, 0x900_0000, 4096, ARM64_PAGE_KERNEL.with_(cache=1))
    seen = check_dump(dump(arm.fmt, arm.mem, arm.root))
    assert seen["mapped"] == 2, seen
